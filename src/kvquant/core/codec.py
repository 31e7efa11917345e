"""The one quantization core: encode/decode of keys and values into the packed KVQuant format.

Calibration statistics, simulated evaluation, the compressed cache and the GPU kernels' reference all call these
functions, so the number we report is the number users get.

Tensors are ``[B, H, T, D]`` (batch, KV heads, tokens, head_dim), as transformers hands them to a cache.

Keys ("channel" mode, the KVQuant way): each channel has an offline-calibrated ``zero``/``scale`` ([H, D]); the
element is normalised to [-1, 1], clamped, and mapped to the nearest codebook level. Each (token, head) vector then
keeps its ``capacity`` worst-quantized elements exactly in fp16 (calibrated outliers that fall outside the range come
first; remaining slots are topped up with the largest residual errors, so every slot is always valid and storage is
fixed-size).

Values ("token" mode): per vector (one token's head, or one token across all heads: ``group``), the ``capacity``
outliers are removed from the range by choosing how many to take from each end so that the remaining range is smallest;
the dense part is normalised by its own min/max (stored as fp16 zero/scale) and quantized; the outliers are kept
exactly. Keys can also use token mode (for ablations and per-token baselines).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .codebook import boundaries_of, nearest_code
from .packing import check_bits, pack_codes, unpack_codes


def outlier_capacity(fraction: float, n: int) -> int:
    """Fixed number of exact fp16 slots per vector of ``n`` elements for an outlier ``fraction`` (0 -> 0, else >= 1)."""
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"outlier fraction must be in [0, 0.5), got {fraction!r} (e.g. 0.01 for 1%).")
    if fraction == 0:
        return 0
    return max(1, round(fraction * n))


def index_dtype(n: int) -> torch.dtype:
    """Smallest dtype that indexes a vector of ``n`` elements (uint8 up to 256, else int16)."""
    return torch.uint8 if n <= 256 else torch.int16


#: Token-group value vectors (one token across all KV heads) with at least this many outlier slots store them sorted
#: by element, plus per KV head the end of its run of slots (``PackedBlock.out_ends``), so that a GPU program working
#: on one head reads only that head's slots. With fewer slots a program simply reads them all.
HEAD_ENDS_MIN_SLOTS = 5


def uses_head_ends(group: str, heads: int, capacity: int) -> bool:
    """Whether token-mode vectors of ``group`` over ``heads`` KV heads with ``capacity`` slots store ``out_ends``."""
    return group == "token" and heads > 1 and capacity >= HEAD_ENDS_MIN_SLOTS


def head_ends(idx: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """For slot elements ``idx`` [..., C] sorted ascending in vectors of ``heads * head_dim`` elements: [..., heads],
    entry h = the number of slots in heads 0..h (head h's slots are columns [ends[h - 1], ends[h]))."""
    bounds = torch.arange(1, heads + 1, device=idx.device) * head_dim
    ends = (idx.long()[..., None, :] < bounds[:, None]).sum(-1)
    return ends.to(index_dtype(idx.shape[-1] + 1))


@dataclass
class Codebook:
    """``levels`` [2^bits] sorted encode levels on [-1, 1]; ``decode_levels`` [2^bits] (Q-Norm corrected or equal)."""

    levels: torch.Tensor
    decode_levels: torch.Tensor

    @property
    def bits(self) -> int:
        return int(self.levels.numel()).bit_length() - 1

    @property
    def boundaries(self) -> torch.Tensor:
        return boundaries_of(self.levels)

    @classmethod
    def fixed(cls, levels: torch.Tensor) -> Codebook:
        lv = torch.sort(levels.float()).values
        return cls(lv, lv.clone())


@dataclass
class PackedBlock:
    """A block of tokens of one tensor (K or V) of one layer in storage form.

    ``codes`` uint8 [B, H, T, D*bits/8]: each head's D codes packed on their own, whatever the grouping (so a GPU
    program working on one head reads contiguous codes); ``out_idx`` [B, G, T, C] (uint8/int16) and ``out_val`` fp16
    [B, G, T, C] index and hold elements of a vector; ``zero``/``scale`` fp16 [B, G, T, 1] in token mode, None in
    channel mode (they live in the quantizer). G is H (per-head vectors) or 1 (token-wide vectors of n = H*D).
    ``out_ends`` [B, 1, T, H] (uint8/int16): token-wide vectors with >= HEAD_ENDS_MIN_SLOTS slots only (else None);
    their slots are then sorted by element and head h's run ends at column out_ends[..., h] (:func:`head_ends`).
    """

    codes: torch.Tensor
    out_idx: torch.Tensor
    out_val: torch.Tensor
    zero: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    out_ends: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.out_idx, self.out_val, self.zero, self.scale, self.out_ends)
                if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def to_vectors(x: torch.Tensor, group: str) -> torch.Tensor:
    """[B, H, T, D] -> [B, G, T, n]: per-head vectors (G=H) or token-wide vectors (G=1, n=H*D)."""
    if group == "head":
        return x
    if group == "token":
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b, t, h * d).unsqueeze(1)
    raise ValueError(f"group must be 'head' or 'token', got {group!r}.")


def from_vectors(v: torch.Tensor, group: str, h: int) -> torch.Tensor:
    if group == "head":
        return v
    b, _, t, n = v.shape
    return v.squeeze(1).reshape(b, t, h, n // h).transpose(1, 2)


def _top_error_slots(x: torch.Tensor, deq: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = (x - deq).abs().topk(capacity, dim=-1).indices
    return idx, x.gather(-1, idx)


def encode_channel(
    x: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, cb: Codebook, capacity: int
) -> PackedBlock:
    """Per-channel (calibrated) quantization of ``x`` [B, H, T, D] with ``zero``/``scale`` [H, D]."""
    x = x.float()
    z, s = zero.to(x.device, torch.float32)[None, :, None, :], scale.to(x.device, torch.float32)[None, :, None, :]
    codes = nearest_code(((x - z) / s).clamp(-1.0, 1.0), cb.boundaries)
    d = x.shape[-1]
    if capacity:
        deq = cb.decode_levels.to(x.device)[codes] * s + z
        idx, val = _top_error_slots(x, deq, capacity)
    else:
        idx = torch.empty(*x.shape[:-1], 0, dtype=torch.long, device=x.device)
        val = torch.empty(*x.shape[:-1], 0, device=x.device)
    return PackedBlock(pack_codes(codes, cb.bits), idx.to(index_dtype(d)), val.half())


def decode_channel(blk: PackedBlock, zero: torch.Tensor, scale: torch.Tensor, cb: Codebook) -> torch.Tensor:
    """Inverse of :func:`encode_channel` -> fp32 [B, H, T, D]."""
    d = zero.shape[-1]
    codes = unpack_codes(blk.codes, cb.bits, d)
    z = zero.to(codes.device, torch.float32)[None, :, None, :]
    s = scale.to(codes.device, torch.float32)[None, :, None, :]
    out = cb.decode_levels.to(codes.device)[codes] * s + z
    if blk.out_val.shape[-1]:
        out.scatter_(-1, blk.out_idx.long(), blk.out_val.float())
    return out


def token_range(v: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For vectors ``v`` [..., n]: choose ``capacity`` outliers (i from the bottom, capacity-i from the top, i chosen
    to minimise the remaining range). Returns (lo [..., 1], hi [..., 1], outlier positions [..., capacity])."""
    n = v.shape[-1]
    if capacity == 0:
        return v.amin(-1, keepdim=True), v.amax(-1, keepdim=True), v.new_empty(*v.shape[:-1], 0).long()
    sv, order = v.sort(dim=-1)
    i = torch.arange(capacity + 1, device=v.device)
    los = sv[..., i]  # keep ranks i .. n-1-capacity+i
    his = sv[..., n - 1 - capacity + i]
    best = (his - los).argmin(-1, keepdim=True)  # [..., 1]
    lo, hi = los.gather(-1, best), his.gather(-1, best)
    j = torch.arange(capacity, device=v.device)
    ranks = torch.where(j < best, j, n - capacity + j)
    return lo, hi, order.gather(-1, ranks)


def encode_token(x: torch.Tensor, cb: Codebook, capacity: int, group: str = "head") -> PackedBlock:
    """Per-token (online) quantization of ``x`` [B, H, T, D]; vectors per head or per token (``group``)."""
    h = x.shape[1]
    v = to_vectors(x.float(), group)
    n = v.shape[-1]
    lo, hi, pos = token_range(v, capacity)  # lo/hi: range of the dense (non-outlier) part
    zero = ((hi + lo) * 0.5).half()
    scale = ((hi - lo) * 0.5).clamp_min(1e-5).half()
    codes = nearest_code(((v - zero.float()) / scale.float()).clamp(-1.0, 1.0), cb.boundaries)
    ends = None
    if uses_head_ends(group, h, capacity):
        pos = pos.sort(-1).values
        ends = head_ends(pos, h, n // h)
    val = v.gather(-1, pos)
    packed = pack_codes(from_vectors(codes, group, h), cb.bits)  # per head, whatever the grouping
    blk = PackedBlock(packed, pos.to(index_dtype(n)), val.half(), zero, scale, ends)
    blk.meta["heads"] = h
    return blk


def decode_token(blk: PackedBlock, cb: Codebook, group: str, heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`encode_token` -> fp32 [B, H, T, D]."""
    codes = to_vectors(unpack_codes(blk.codes, cb.bits, head_dim), group)
    out = cb.decode_levels.to(codes.device)[codes] * blk.scale.float() + blk.zero.float()
    if blk.out_val.shape[-1]:
        out.scatter_(-1, blk.out_idx.long(), blk.out_val.float())
    return from_vectors(out, group, heads)


@dataclass
class LayerCodec:
    """Everything needed to encode/decode one layer's keys and values (one layer of a :class:`~kvquant.Quantizer`).

    key_mode: "channel" (calibrated per-channel ranges, KVQuant) or "token" (online per-token ranges).
    key_zero/key_scale: [H, D] fp32, channel mode only. *_capacity: exact fp16 slots per vector.
    value_group: "head" (scale/zero per token and head) or "token" (per token across all KV heads).
    """

    key_cb: Codebook
    value_cb: Codebook
    heads: int
    head_dim: int
    key_mode: str = "channel"
    key_zero: torch.Tensor | None = None
    key_scale: torch.Tensor | None = None
    key_capacity: int = 0
    value_capacity: int = 0
    value_group: str = "token"
    key_group: str = "head"

    def __post_init__(self) -> None:
        check_bits(self.key_cb.bits)
        check_bits(self.value_cb.bits)
        if self.key_mode == "channel" and (self.key_zero is None or self.key_scale is None):
            raise ValueError("channel-mode keys need calibrated key_zero and key_scale [H, D].")

    def encode_keys(self, k: torch.Tensor) -> PackedBlock:
        if self.key_mode == "channel":
            return encode_channel(k, self.key_zero, self.key_scale, self.key_cb, self.key_capacity)
        return encode_token(k, self.key_cb, self.key_capacity, self.key_group)

    def decode_keys(self, blk: PackedBlock) -> torch.Tensor:
        if self.key_mode == "channel":
            return decode_channel(blk, self.key_zero, self.key_scale, self.key_cb)
        return decode_token(blk, self.key_cb, self.key_group, self.heads, self.head_dim)

    def encode_values(self, v: torch.Tensor) -> PackedBlock:
        return encode_token(v, self.value_cb, self.value_capacity, self.value_group)

    def decode_values(self, blk: PackedBlock) -> torch.Tensor:
        return decode_token(blk, self.value_cb, self.value_group, self.heads, self.head_dim)

    def key_lut(self) -> torch.Tensor:
        """Per-channel lookup table [H, D, 2^bits] (fp32): code -> dequantized pre-RoPE key (channel mode)."""
        dl = self.key_cb.decode_levels.float()
        s, z = self.key_scale.float().to(dl.device), self.key_zero.float().to(dl.device)
        return dl[None, None, :] * s[..., None] + z[..., None]
