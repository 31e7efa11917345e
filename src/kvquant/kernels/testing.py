"""Synthetic quantizers, storages and keys for kernel tests and GPU benchmarks (random codebooks and ranges; no
calibration). Keys get outlier channels (large per-channel scale) and a few per-token outliers beyond the range."""

from __future__ import annotations

import torch

from ..core.codec import Codebook, LayerCodec, outlier_capacity
from ..core.rope import RopeSpec, apply_rope


def synthetic_codec(heads: int, head_dim: int, bits: int, outlier_fraction: float = 0.01,
                    value_group: str = "token", seed: int = 0, n_outlier_channels: int = 4,
                    value_fraction: float | None = None) -> LayerCodec:
    g = torch.Generator().manual_seed(seed)
    L = 2**bits

    def cb():
        lv = torch.sort(torch.rand(L, generator=g) * 2 - 1).values
        lv[0], lv[-1] = -1.0, 1.0
        dl = lv + 0.01 * torch.randn(L, generator=g)  # Q-Norm-like shifted decode levels
        return Codebook(lv, dl)

    zero = 0.2 * torch.randn(heads, head_dim, generator=g)
    scale = 0.5 + 1.5 * torch.rand(heads, head_dim, generator=g)
    idx = torch.randperm(head_dim, generator=g)[:n_outlier_channels]
    scale[:, idx] *= 8.0
    nv = head_dim if value_group == "head" else heads * head_dim
    return LayerCodec(
        cb(), cb(), heads=heads, head_dim=head_dim, key_mode="channel", key_zero=zero, key_scale=scale,
        key_capacity=outlier_capacity(outlier_fraction, head_dim),
        value_capacity=outlier_capacity(outlier_fraction if value_fraction is None else value_fraction, nv),
        value_group=value_group,
    )


def synthetic_rope(head_dim: int, base: float = 10000.0, attention_scaling: float = 1.0) -> RopeSpec:
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    return RopeSpec(inv, attention_scaling)


def synthetic_kv(codec: LayerCodec, rope: RopeSpec, batch: int, tokens: int, positions: torch.Tensor,
                 dtype=torch.bfloat16, device="cpu", seed: int = 0):
    """Post-RoPE keys (pre-RoPE keys follow the codec's channel ranges, 0.5% of elements 3x outside them) and values
    (a few large elements), [B, H, T, D] in ``dtype``."""
    g = torch.Generator(device=device).manual_seed(seed)
    H, D = codec.heads, codec.head_dim
    z = codec.key_zero.to(device)[None, :, None, :]
    s = codec.key_scale.to(device)[None, :, None, :]
    u = torch.randn(batch, H, tokens, D, generator=g, device=device) * 0.45
    spike = torch.rand(batch, H, tokens, D, generator=g, device=device) < 0.005
    u = torch.where(spike, u.sign() * 3.0, u)
    k_pre = u * s + z
    cos, sin = rope.cos_sin(positions.to(device))
    k_post = apply_rope(k_pre, cos, sin).to(dtype)
    v = torch.randn(batch, H, tokens, D, generator=g, device=device)
    vspike = torch.rand(batch, H, tokens, D, generator=g, device=device) < 0.003
    v = torch.where(vspike, v * 8, v).to(dtype)
    return k_post, v
