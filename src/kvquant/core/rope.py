"""Rotary position embeddings (RoPE): compute cos/sin, apply, and undo.

KVQuant quantizes keys *before* RoPE. transformers hands the cache keys *after* RoPE, so we rotate them back
(RoPE is a rotation of channel pairs, scaled by ``attention_scaling`` for yarn/longrope) and apply RoPE again after
dequantization. Everything here follows transformers' convention: ``cos``/``sin`` have shape ``[B, T, R]`` where
``R = rotary_dim`` and the two halves of the last dim are equal (``emb = cat(freqs, freqs)``); rotation acts on the
first ``R`` channels, and the remaining ``head_dim - R`` channels (partial rotary, e.g. Phi-3 variants) pass through.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (transformers' convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _split(x: torch.Tensor, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :rotary_dim], x[..., rotary_dim:]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by ``cos``/``sin`` [B, T, R] (R <= D). Computed in fp32, returned in x's dtype."""
    r = cos.shape[-1]
    xr, xp = _split(x.float(), r)
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    out = xr * c + rotate_half(xr) * s
    if xp.shape[-1]:
        out = torch.cat((out, xp), dim=-1)
    return out.to(x.dtype)


def unapply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`apply_rope`, also when cos/sin carry an attention scaling factor (cos^2+sin^2 != 1)."""
    r = cos.shape[-1]
    xr, xp = _split(x.float(), r)
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    out = (xr * c - rotate_half(xr) * s) / (c * c + s * s)
    if xp.shape[-1]:
        out = torch.cat((out, xp), dim=-1)
    return out.to(x.dtype)


class RopeSpec:
    """RoPE of one layer: cos/sin for any positions, exactly as the model computes them.

    ``cos_sin`` calls the model's own rotary module (so dynamic-NTK and longrope, whose frequencies depend on the
    sequence length, match the model bit for bit); ``inv_freq`` [R/2] and ``attention_scaling`` are read live from the
    module for kernels that compute cos/sin themselves.
    """

    def __init__(self, inv_freq: torch.Tensor | None = None, attention_scaling: float = 1.0, *,
                 module: torch.nn.Module | None = None, layer_type: str | None = None):
        if module is None and inv_freq is None:
            raise ValueError("RopeSpec needs either inv_freq or the model's rotary module.")
        self.module = module
        self.layer_type = layer_type
        self._inv_freq = inv_freq
        self._scaling = attention_scaling

    @property
    def inv_freq(self) -> torch.Tensor:
        if self.module is None:
            return self._inv_freq
        name = f"{self.layer_type}_inv_freq" if self.layer_type else "inv_freq"
        return getattr(self.module, name).detach().float()

    @property
    def attention_scaling(self) -> float:
        if self.module is None:
            return self._scaling
        name = f"{self.layer_type}_attention_scaling" if self.layer_type else "attention_scaling"
        return float(getattr(self.module, name, 1.0))

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    @torch.no_grad()
    def cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, T, R] in fp32."""
        if self.module is not None:
            x = torch.empty(0, device=position_ids.device, dtype=torch.float32)
            args = (x, position_ids) if self.layer_type is None else (x, position_ids, self.layer_type)
            cos, sin = self.module(*args)
            return cos.float(), sin.float()
        inv = self._inv_freq.to(position_ids.device, torch.float32)
        freqs = position_ids[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self._scaling, emb.sin() * self._scaling


def find_rotary_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's rotary-embedding module (``model.model.rotary_emb`` for every RoPE model in transformers 5)."""
    for name, mod in model.named_modules():
        if type(mod).__name__.endswith("RotaryEmbedding") and not name.endswith("vision_rotary_emb"):
            return mod
    return None


def rope_specs(model: torch.nn.Module) -> list[RopeSpec]:
    """One :class:`RopeSpec` per decoder layer, read from the model's rotary module (handles Gemma 3's per-layer-type
    RoPE, linear/yarn/llama3 scaling through the module's own ``inv_freq`` and ``attention_scaling``)."""
    rot = find_rotary_module(model)
    if rot is None:
        raise ValueError(
            f"{type(model).__name__} has no rotary embedding module: KVQuant quantizes keys before RoPE and needs a "
            "RoPE model (Llama, Mistral, Qwen2/3, Gemma 3, Phi-3, ...)."
        )
    cfg = model.config.get_text_config()
    n_layers = cfg.num_hidden_layers
    layer_types = getattr(cfg, "layer_types", None)
    specs = []
    for i in range(n_layers):
        lt = layer_types[i] if layer_types is not None else None
        per_type = lt is not None and hasattr(rot, f"{lt}_inv_freq")
        specs.append(RopeSpec(module=rot, layer_type=lt if per_type else None))
    return specs
