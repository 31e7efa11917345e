"""The ``"kvquant"`` transformers attention function used with :class:`~kvquant.cache.KVQuantCache`.

``KVQuantCache.update`` may leave a per-layer note in a thread-local (``set_pending``) that this function pops:

* ``("kernel", storage)``: decode step (q_len == 1) on a device where :mod:`kvquant.kernels` is available; the
  fused kernel reads the compressed :class:`~kvquant.cache.storage.LayerStorage` directly and the key/value tensors
  handed to attention are placeholders.
* ``("graph", storage, k, v, positions, ring)``: a steady decode step on CUDA (:mod:`kvquant.kernels.graphs`): the
  new token is not appended yet (``ring``: a full sliding window's step, where it takes the oldest token's row,
  ``LayerStorage.ring_replace``); the append and the attention run here, as one CUDA-graph replay when the call
  qualifies (a fused kernel serves the storage), else eagerly.
* ``("band", k_fp, v_fp, R)``: a multi-token step with an fp16 recent window R: each query sees the unquantized
  keys/values of its R most recent positions and the quantized ones before (what decoding token by token gives).

Without a note it is plain SDPA. The mask function is transformers' SDPA mask, so padding and sliding windows are
applied as usual.
"""

from __future__ import annotations

import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

try:  # transformers >= 5: the mask interface lives in masking_utils
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError:  # pragma: no cover
    AttentionMaskInterface = sdpa_mask = None

ATTENTION_NAME = "kvquant"
_pending = threading.local()


def set_pending(layer_idx: int, note: tuple | None) -> None:
    """Hand ``note`` from the cache's ``update`` to the attention call of the same layer (None clears it)."""
    store = getattr(_pending, "notes", None)
    if store is None:
        store = _pending.notes = {}
    if note is None:
        store.pop(layer_idx, None)
    else:
        store[layer_idx] = note


def pop_pending(layer_idx: int) -> tuple | None:
    store = getattr(_pending, "notes", None)
    return store.pop(layer_idx, None) if store else None


def _band_attention(query, key, value, k_fp, v_fp, window, attention_mask, scaling):
    """Attention where each query uses ``k_fp``/``v_fp`` for its ``window`` most recent positions (queries are the
    last q_len positions of the key sequence)."""
    rep = query.shape[1] // key.shape[1]
    kq, vq = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    kf, vf = k_fp.repeat_interleave(rep, 1), v_fp.repeat_interleave(rep, 1)
    tq, tk = query.shape[2], key.shape[2]
    qpos = torch.arange(tk - tq, tk, device=query.device)[:, None]
    kpos = torch.arange(tk, device=query.device)[None, :]
    band = (qpos - kpos < window) & (qpos >= kpos)
    qf = query.float()
    s = torch.where(band, qf @ kf.float().transpose(-1, -2), qf @ kq.float().transpose(-1, -2)) * scaling
    if attention_mask is not None:
        m = attention_mask[..., :tk]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
    else:
        s = s.masked_fill(qpos < kpos, float("-inf"))
    p = s.softmax(-1).nan_to_num(0.0)
    out = (p * band) @ vf.float() + (p * ~band) @ vq.float()
    return out.to(query.dtype).transpose(1, 2).contiguous()


def kvquant_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function (``AttentionInterface``): returns ``(attn_output [B, T, Hq, D], None)``."""
    note = pop_pending(getattr(module, "layer_idx", -1))
    if note is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if note[0] in ("kernel", "graph"):
            from .. import kernels

            st, out = note[1], None
            if note[0] == "graph":  # steady decode step: append + attention as one CUDA-graph replay, or eagerly
                from ..kernels.graphs import LayerDecodeGraph

                k, v, pos, ring = note[2:]
                graph = LayerDecodeGraph.for_storage(st)
                if graph.applies(st, query, attention_mask):
                    out = graph.step(st, k, v, pos, query, scale, attention_mask, ring=ring)
                elif ring:
                    st.ring_replace(k, v, pos)
                else:
                    st.append(k, v, pos)
            if out is None:  # (a sliding layer's rows may be a rotation of cache order: LayerStorage.ring_replace)
                out = kernels.decode_attention(query, st, scale, st.ring_mask(attention_mask))  # [B, Hq, 1, D]
            return out.transpose(1, 2).contiguous(), None
        if note[0] == "band" and note[1].shape[2] == key.shape[2]:
            _, k_fp, v_fp, window = note
            return _band_attention(query, key, value, k_fp, v_fp, window, attention_mask, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> None:
    """Register the ``"kvquant"`` attention (and its mask: SDPA's) with transformers; idempotent."""
    AttentionInterface.register(ATTENTION_NAME, kvquant_attention_forward)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


register()
