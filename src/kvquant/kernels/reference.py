"""PyTorch references for the fused kernels. All quantization math goes through :mod:`kvquant.core.codec` (via the
storage's codec); these functions only arrange tensors and compute attention in float32."""

from __future__ import annotations

import torch

from ..core.rope import apply_rope


def reference_dequantize(storage) -> tuple[torch.Tensor, torch.Tensor]:
    """All held tokens of ``storage`` in cache order -> float32 post-RoPE keys and values [B, H, T, D]."""
    st = storage
    parts_k, parts_v = [st.sink_k.float()], [st.sink_v.float()]
    if st.n_q:
        k = st.codec.decode_keys(st.packed_keys())  # core.codec
        if getattr(st, "pre_rope", True):
            cos, sin = st.rope.cos_sin(st.q_pos[:, : st.n_q])
            k = apply_rope(k, cos, sin)
        parts_k.append(k.float())
        parts_v.append(st.codec.decode_values(st.packed_values()).float())
    parts_k.append(st.win_k.float())
    parts_v.append(st.win_v.float())
    return torch.cat(parts_k, 2), torch.cat(parts_v, 2)


def reference_attention(query, k, v, scaling, attention_mask=None) -> torch.Tensor:
    """float32 decode attention: query [B, Hq, 1, D], k/v [B, H, T, D] -> [B, Hq, 1, D] in query's dtype."""
    from . import mask_bias

    B, Hq, _, D = query.shape
    rep = Hq // k.shape[1]
    kf = k.float().repeat_interleave(rep, 1)
    vf = v.float().repeat_interleave(rep, 1)
    s = (query.float() @ kf.transpose(-1, -2)) * scaling  # [B, Hq, 1, T]
    bias = mask_bias(attention_mask, B, k.shape[2], query.device)
    if bias is not None:
        s = s + bias[:, None, None, :]
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vf).to(query.dtype)


def reference_decode_attention(query, storage, scaling, attention_mask=None) -> torch.Tensor:
    k, v = reference_dequantize(storage)
    return reference_attention(query, k, v, scaling, attention_mask)


def reference_quantize_append(storage, k_post, v, positions, codec=None, pre_rope=False):
    """The storage's own codec path (core.codec encode on whatever device the tensors live)."""
    st = storage
    if pre_rope:
        raise NotImplementedError("the reference path takes post-RoPE keys.")
    st.append_quantized(k_post, v, positions)
    return st
