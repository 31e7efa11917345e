"""Fused GPU kernels for the compressed KV cache (Triton), with PyTorch references in :mod:`.reference`.

Public API (all take/return torch tensors on the storage's device):

- :func:`available` (device) -> bool: CUDA + triton importable, and not disabled by ``KVQUANT_DISABLE_KERNELS=1``.
- :func:`decode_attention` (query [B, Hq, 1, D], storage, scaling, attention_mask=None) -> [B, Hq, 1, D]:
  Flash-Decoding split-K attention over a :class:`~kvquant.cache.storage.LayerStorage` (fp16 sinks + quantized
  region + fp16 recent window); GQA/MQA, batch with a key-padding mask ([B, T] keep-flags or the HF 4-D mask).
- :func:`quantize_append` (storage, k_post, v, positions): GPU encode of post-RoPE keys / values [B, H, T, D]
  (positions [B, T]) written straight into the storage at ``n_q`` (no host synchronisation).
- :func:`fp16_decode_attention` (query, k, v, scaling): the fp16/bf16 split-K baseline of the same design.

Storage fields read are exactly those of docs/storage-format.md; the codec (for encoding) comes from
``storage.codec`` or the ``codec`` argument. Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors
(slowly; used by the tests).
"""

from __future__ import annotations

import math
import os

import torch

__all__ = ["available", "decode_attention", "decode_kernel", "quantize_append", "fp16_decode_attention", "interpreting"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def available(device=None) -> bool:
    """True if the fused kernels can run on ``device`` (CUDA device + triton, not disabled by the environment)."""
    if os.environ.get("KVQUANT_DISABLE_KERNELS", "0") == "1":
        return False
    if not _triton_ok():
        return False
    if device is None:
        return torch.cuda.is_available()
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available()
    return dev.type == "cpu" and interpreting()


def _pairs_available(dev, default: bool = False) -> bool:
    """Whether the Gluon pairs kernel can run on ``dev`` (``default``: and is the default there, i.e. a GPU it was
    measured on); KVQUANT_PAIRS=0 turns it off."""
    if dev.type != "cuda" or interpreting() or os.environ.get("KVQUANT_PAIRS", "1") == "0":
        return False
    try:
        from . import _gluon
    except Exception:  # noqa: BLE001 -- another Triton's Gluon API: the Triton kernels serve
        return False
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return _gluon.default_here(index) if default else _gluon.available(index)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
_SM_COUNT: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _cached(storage, key, fn, stamp=None):
    """Per-storage cache of derived device tensors (inv_freq, codec tensors) and launch plans. A value cached with a
    ``stamp`` (the storage's ``k_codes`` tensor for launch plans) is rebuilt once the storage holds another stamp
    object: its tensors were reallocated (capacity growth, batch reordering)."""
    cache = getattr(storage, "_kernel_cache", None)
    if cache is None:
        cache = {}
        try:
            storage._kernel_cache = cache
        except Exception:  # frozen/slotted object: no caching
            return fn()
    hit = cache.get(key)
    if hit is None or hit[0] is not stamp:
        hit = cache[key] = (stamp, fn())
    return hit[1]


def planned_kernels(storage) -> set[str]:
    """The decode kernels ("pairs", "natural", ...) of the launch plans built so far for ``storage`` (the plans
    :func:`decode_attention` cached on it; the reference path builds none): what a generation actually ran."""
    cache = getattr(storage, "_kernel_cache", None) or {}
    return {v[1].kernel for k, v in cache.items() if k[0] == "plan" and v[1] is not None}


def _n_tokens(t) -> int:
    return 0 if t is None else int(t.shape[2])


def _bits_of(n_levels: int) -> int:
    return int(n_levels).bit_length() - 1


def mask_bias(attention_mask, batch: int, total: int, device) -> torch.Tensor | None:
    """Normalise a key-padding mask to an additive fp32 bias [B, total] (0 keep, -inf drop).

    Accepts [B, T] keep-flags (bool / 0-1 ints or floats) or transformers' 4-D mask [B, 1, q, T] (bool keep-flags or
    additive floats); the last query row is used; the first ``total`` key columns are the cache's tokens."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 4:
        m = m[:, 0, -1, :]
        if m.dtype == torch.bool:
            bias = torch.where(m, 0.0, float("-inf"))
        else:
            bias = m.float()
    elif m.dim() == 2:
        if m.dtype == torch.bool:
            bias = torch.where(m, 0.0, float("-inf"))
        else:
            bias = torch.where(m != 0, 0.0, float("-inf"))
    else:
        raise ValueError(f"attention_mask must be [B, T] or [B, 1, q, T], got shape {tuple(m.shape)}.")
    if bias.shape[-1] < total:
        raise ValueError(f"attention_mask covers {bias.shape[-1]} keys but the cache holds {total}.")
    bias = bias[:, :total].to(device=device, dtype=torch.float32)
    if bias.shape[0] != batch:
        bias = bias.expand(batch, total)
    return bias.contiguous()


def _splits(n_tokens: int, programs: int, device, block_t: int, min_chunk: int = 256, target_waves: float = 4.0,
            min_splits: int = 1):
    if n_tokens <= 0:
        return 0, block_t
    want = max(min_splits, math.ceil(target_waves * _num_sms(device) / max(programs, 1)))
    return _block_splits(n_tokens, want, min_chunk, block_t)


def _block_splits(n_tokens: int, want: int, min_chunk: int, block_t: int) -> tuple[int, int]:
    """(splits, chunk) of ``n_tokens`` > 0 into about ``want`` splits of whole blocks of ``block_t``, at most one per
    ``min_chunk`` tokens, rounded up: 4095 tokens (4K less a sink) in 16 splits of 8 blocks, not 15 of 9 (one wave
    either way: the longest split sets the time; benchmarks/gpu_runs/run105 for the Triton kernels, run69 for the
    pairs kernel's one-block splits). The split rules of the Triton kernels (_splits) and of the pairs kernel
    (_gluon.splits) choose ``want``."""
    want = min(want, max(1, math.ceil(n_tokens / min_chunk)))
    chunk = math.ceil(math.ceil(n_tokens / want) / block_t) * block_t
    return math.ceil(n_tokens / chunk), chunk


# ----------------------------------------------------------------------------------------------------------------
# decode attention
# ----------------------------------------------------------------------------------------------------------------
def decode_attention(query, storage, scaling, attention_mask=None, num_splits=None, block_t=None, use_dot=None,
                     num_warps=None, kernel=None, value_correction=None, maxnreg=None, prefetch=None, lutx=None,
                     reload=None, wide_loads=None, lengths=None, bias=None):
    """Fused decode attention over a compressed layer. ``query`` [B, Hq, 1, D] (post-RoPE) -> [B, Hq, 1, D].

    ``kernel``: ``"pairs"`` (the Gluon kernel of :mod:`kvquant.kernels._gluon`: 2-, 3- or 4-bit storage, head_dim
    64 or 128 with <= 1 outlier slot per key vector, or 256 with <= 3, head-group or token-group values with any
    number of slots, <= 8 query heads per KV head, on sm_80+ with Triton 3.6; the default at PAIRS_DEFAULT_HEAD_DIMS
    in CUDA-graph steps on the GPUs it was measured on (sm_90), KVQUANT_PAIRS=0 turns it off),
    ``"natural"`` (register lookup of the levels, field tiles interleaved back into channel order, two key dots and
    one value dot per block; a per-channel affine key table, at most 4 key outlier slots per vector, and at most 4
    value slots per head vector or token-group value rows with any number of slots: each KV head applies the
    ones that fall in it), ``"fields"`` (the head-group conditions and head_dim >= 128; twelve narrow dots per block,
    one per bit field),
    ``"tiles"`` (interleave unpack; any slot count) or None (pairs where it applies and no natural/fields option is
    given, in CUDA-graph steps and, launched eagerly, from EAGER_PAIRS_MIN_TOKEN_HEADS quantized token-heads of
    head_dim 128; else natural for 3/4-bit storage, and for 2-bit at head_dim 64 and 256;
    fields for 2-bit at head_dim 128; else tiles; :func:`decode_kernel` says which).
    ``value_correction=True``: the tiles kernel's value-slot correction (a one-hot dot after P@V) instead of the
    per-slot overwrite (slower on the H200).
    ``prefetch`` (natural and fields kernels): ``"l2"`` (the default, None) or ``"l1"``: each block asks for the next
    block's rows (codes, zero/scale, slots, positions) with a PTX prefetch into that cache level, so they arrive while
    it computes (3-12% faster per call on the H200, benchmarks/gpu_decode.md); False: no prefetch; ``"registers"``
    (or True; fields kernel only): block i + 1 is loaded into registers while block i computes (no faster on the
    H200).
    ``lutx`` (fields kernel): levels from a register lookup table (PRMT through inline PTX; the interpreter gathers
    from an fp16 table instead) and fp16 dequantisation/RoPE arithmetic; None = the default (on).
    ``maxnreg``: register cap per thread (0 = none; None = the measured default).
    ``reload`` (natural kernel): re-read the loop invariants (query, RoPE table, key scale/zero) from L1 every block
    instead of holding them in registers (fewer registers per thread, more resident warps). ``wide_loads`` (natural
    kernel): read the packed codes as 32-bit words and split them into bytes in registers (off by default: slower
    on the H200 at the default launch, benchmarks/gpu_decode.md).
    ``lengths`` (CUDA graphs, :mod:`kvquant.kernels.graphs`): the quantized length is read from this int32 device
    tensor instead of ``storage.n_q``, over exactly ``num_splits`` splits; ``bias`` (same use): the additive fp32
    mask bias [B, >= keys] itself (a buffer at a fixed address), in place of ``attention_mask``.

    A decode step is host-bound end to end, so everything that only changes when the storage is reallocated (the
    launch configuration, derived tables, tensor arguments and strides) is computed once and cached on the storage
    (:func:`_decode_plan`); a call only reads the current lengths, the mask and the query."""
    from . import _triton as K

    B, Hq, q_len, D = query.shape
    if q_len != 1:
        raise ValueError("decode_attention handles one query token; run prefill with SDPA.")
    st = storage
    dev = query.device
    plan = _decode_plan(st, B, Hq, D, dev, _launch_options(num_splits, block_t, use_dot, num_warps, kernel,
                                                           value_correction, maxnreg, prefetch, lutx, reload,
                                                           wide_loads, graph=lengths is not None))
    if plan is None:
        from .reference import reference_decode_attention

        return reference_decode_attention(query, st, scaling, attention_mask)
    H, bt = plan.H, plan.bt
    n_q = int(st.n_q) if st.k_codes is not None else 0
    n_s, n_w = _n_tokens(st.sink_k), _n_tokens(st.win_k)
    if bias is None:
        bias = _mask_bias_memo(attention_mask, B, n_s + n_q + n_w, dev)
    elif attention_mask is not None:
        raise ValueError("pass attention_mask or bias, not both.")
    if lengths is not None:
        if not num_splits:
            raise ValueError("lengths= needs a fixed num_splits.")
        nsq, chunk = int(num_splits), bt  # chunk: computed in the kernel from the device length
    elif num_splits is None:
        nsq, chunk = _kernel_splits(plan.kernel, n_q, B * H, dev, bt, D)
    else:
        nsq = min(num_splits, max(1, math.ceil(n_q / bt))) if n_q else 0
        chunk = math.ceil(math.ceil(max(n_q, 1) / max(nsq, 1)) / bt) * bt
        nsq = math.ceil(n_q / chunk) if n_q else 0
    nsplit = nsq + 1
    q = query[:, :, 0, :]
    if q.stride(-1) != 1:
        q = q.contiguous()
    n = B * Hq * nsplit
    part = torch.empty(n * (D + 2), device=dev, dtype=torch.float32)  # one allocation: acc | max | sum
    pacc, pm, pl = part[: n * D], part[n * D: n * (D + 1)], part[n * (D + 1):]
    sk, sv = (st.sink_k, st.sink_v) if n_s else (q, q)
    wk, wv = (st.win_k, st.win_v) if n_w else (q, q)
    for t in (sk, sv, wk, wv):
        if t is not q and t.stride(-1) != 1:
            raise ValueError("sink/window tensors must have a contiguous last dimension.")
    first = 0
    if plan.kernel == "pairs":  # the quantized splits by the pairs kernel, the sinks/window split below
        from . import _gluon

        tb, group, ck, cv, quant, voe, bits = plan.pairs
        if nsq:
            _gluon.launch(q, pacc, pm, pl, quant, tb, bias, lengths, float(scaling) * K.LOG2E * plan.rope_scale,
                          n_s, n_q, chunk, nsq, group, ck, cv, voe, bits)
        first = nsq
    plan.fn[(B * H, nsplit - first)](
        q, pacc, pm, pl, *plan.tensors, sk, sv, wk, wv, bias if bias is not None else pm,
        float(scaling) * K.LOG2E, plan.rope_scale, q.stride(0), q.stride(1), *plan.strides,
        *_s3(sk, n_s), *_s3(sv, n_s), *_s3(wk, n_w), *_s3(wv, n_w), bias.stride(0) if bias is not None else 0,
        n_s, n_q, n_w, chunk, nsq, HAS_MASK=bias is not None, **plan.consts,
        **({} if lengths is None else dict(LENS=lengths, DEVLEN=True)), **({"split0": first} if first else {}),
    )
    return _reduce(pacc, pm, pl, B, Hq, nsplit, D, query.dtype, dev)


def decode_kernel(query, storage, graph: bool = False, **options) -> str:
    """Which kernel :func:`decode_attention` runs for ``query``, ``storage`` and its keyword ``options`` (``graph``:
    in a CUDA-graph decode step, i.e. with ``lengths=``): ``"pairs"``, ``"natural"``, ``"fields"``, ``"tiles"`` or
    ``"reference"`` (the PyTorch path: no fused kernel for this storage). Raises like decode_attention on invalid
    options."""
    B, Hq, _, D = query.shape
    plan = _decode_plan(storage, B, Hq, D, query.device, _launch_options(**options, graph=graph))
    return "reference" if plan is None else plan.kernel


def graph_splits(storage, query) -> int:
    """The fixed split count of a CUDA-graph decode step (the kernels derive each split's share from the device
    length): sized for the storage's capacity, by the rule of the kernel that serves ``query``."""
    st = storage
    return _kernel_splits(decode_kernel(query, st, graph=True), st.capacity, st.batch * st.heads, query.device, 32,
                          int(query.shape[-1]))[0]


def _kernel_splits(kernel: str, n_tokens: int, programs: int, device, block_t: int,
                   head_dim: int = 128) -> tuple[int, int]:
    """(splits, chunk) by the rule of ``kernel``: the pairs kernel fills one wave of one-warp programs
    (_gluon.splits), the Triton kernels about four waves (_splits); the natural kernel at head_dim 256 about two
    waves and at least 64 splits (H200 sweep, Gemma-3-4B shape, benchmarks/gpu_runs/run101: with reload, 66 splits
    against the four-wave rule's 128 at batch 1: 482.6 against 504.5 us at 128K, 133.5 against 149.6 at 32K; against
    its 17 at batch 8: 3599.8 against 4518.7 at 128K, 934.1 against 1088.4 at 32K)."""
    if kernel == "natural" and head_dim == 256:
        return _splits(n_tokens, programs, device, block_t, target_waves=2.0, min_splits=64)
    if kernel == "pairs":
        from ._gluon import splits

        return splits(n_tokens, programs, _num_sms(device), head_dim)
    return _splits(n_tokens, programs, device, block_t)


def _launch_options(num_splits=None, block_t=None, use_dot=None, num_warps=None, kernel=None, value_correction=None,
                    maxnreg=None, prefetch=None, lutx=None, reload=None, wide_loads=None, graph=False) -> tuple:
    """decode_attention's launch options (same names and defaults; ``graph``: a CUDA-graph step, lengths= given) as
    the tuple that keys its cached launch plan."""
    return (num_splits, block_t, use_dot, num_warps, kernel, value_correction, maxnreg, prefetch, lutx, reload,
            wide_loads, bool(graph))


def _s3(t, n):
    return (t.stride(0), t.stride(1), t.stride(2)) if n else (0, 0, 0)


class _Plan:
    """The per-storage constant part of a decode launch (see :func:`_decode_plan`)."""

    __slots__ = ("H", "bt", "fn", "kernel", "tensors", "strides", "consts", "rope_scale", "pairs")


#: Launched eagerly (an fp16 window R > 0, or KVQUANT_CUDA_GRAPHS=0), the default takes the pairs kernel where it
#: applies once the storage holds at least this many quantized token-heads of head_dim 128 (batch x KV heads x
#: quantized tokens x head_dim / 128 when the launch plan is built: again each time the storage doubles); None: never.
#: An eager Gluon launch costs the host 200-400 us (run 71's and run 93's eager_us) and an eager step is host-bound,
#: so it pays only where the GPU work is large. Measured with generate, eager, nuq3-1% head-group, batch 8:
#: benchmarks/gpu_runs/run84 (Llama-3-8B shape, head_dim 128, 8 layers): 2.1M token-heads (32K): pairs 20.6 / 17.7 ms
#: per step against 18.2 / 14.5 for the natural kernel; 4.2M (64K): 12.3 / 12.7 against 20.1 / 19.6. run99
#: (Llama-3.2-1B shape, head_dim 64, 16 layers; in head_dim-128 token-heads): 2.1M (64K): 39.1 / 33.0 against 22.3 /
#: 28.1; 4.2M (128K): 23.1 / 21.9 against 36.3 / 35.8. The threshold lies between them at both head_dims.
EAGER_PAIRS_MIN_TOKEN_HEADS: int | None = 3_000_000

#: head_dims the pairs kernel compiles for (kernel="pairs"; _gluon.HEAD_DIMS), and those where the default takes it
#: (measured on the H200 against the natural kernel as graph replays; head_dim 64: benchmarks/gpu_runs/run91,
#: Llama-3.2-1B's heads (32 query, 8 KV), nuq3-1% at 128K: head-group values 102.0 against 216.7 us at batch 1, 682.0
#: against 1890.8 at batch 8; token-group values 121.9 against 265.0 and 817.1 against 2298.0)
PAIRS_HEAD_DIMS = (64, 128, 256)
#: (head_dim 256, Gemma-3-4B's heads: token-group values and 4-bit storage 1.14-2.06x the natural kernel in every
#: cell, 4K-128K, batch 1 and 8, from runs 106-107; head-group 2/3-bit storage from run 136, once the scores were
#: computed once per block: 1.04-2.23x with 1% slots (1.03-2.59x without) in every cell, 1K-24K, batch 1 and 8,
#: e.g. 1K batch 1 (a sliding window) nuq3-1% 45.2 against 52.8 us, 16K batch 1 64.0 against 71.5, nuq2-1% 57.1
#: against 62.8; runs 106-107 and 122 had the one-launch kernel behind at 16K batch 1, so the natural kernel kept
#: storages below 100K token-heads until then)
PAIRS_DEFAULT_HEAD_DIMS = (64, 128, 256)
#: key outlier slots per vector the pairs kernel merges, by head_dim (1% of the channels: round(0.01 D) = 1, 1, 3)
PAIRS_MAX_KEY_SLOTS = {64: 1, 128: 1, 256: 3}
#: head_dims where eager launches take it from EAGER_PAIRS_MIN_TOKEN_HEADS (measured at 64 and 128; at 256 from run
#: 142, Gemma-3-4B shape, generate eagerly at batch 8, 16K (1.05M token-heads of head_dim 128 in each global layer):
#: nuq3-1% head-group even (58.0 / 61.1 ms per step against 58.4 / 57.4 with the natural kernel), token-group values
#: 56.2 / 65.3 against 89.5 / 74.3; 64K did not fit its prefill. Per call, launched eagerly (run 138's eager_us), the
#: pairs kernel is 2.4x (head-group) and 3.6x (token-group) the natural kernel at 64K batch 8 (4.2M), and at 128K
#: batch 1 (1.05M) already 1.31x / 1.98x)
EAGER_PAIRS_HEAD_DIMS = (64, 128, 256)


def _decode_plan(st, B, Hq, D, dev, options) -> _Plan | None:
    """The launch configuration, derived tables and tensor arguments of :func:`decode_attention` for ``st``, or None
    when the reference path must run. Cached on the storage; rebuilt when its quantized tensors are reallocated
    (capacity growth, batch reordering) or the options change. Raises on invalid options / shapes."""
    has_q = st.k_codes is not None and int(st.n_q) > 0
    return _cached(st, ("plan", dev, B, Hq, D, has_q, options),
                   lambda: _build_decode_plan(st, B, Hq, D, dev, options, has_q), stamp=st.k_codes)


def _build_decode_plan(st, B, Hq, D, dev, options, has_q) -> _Plan | None:
    from . import _triton as K

    (num_splits, block_t, use_dot, num_warps, kernel, value_correction, maxnreg, prefetch, lutx, reload,
     wide_loads, graph) = options
    codec = getattr(st, "codec", None)
    if (st.key_lut is None or not getattr(st, "pre_rope", True)
            or (codec is not None and codec.key_mode != "channel")):
        return None
    H = int(st.key_lut.shape[0])
    if Hq % H:
        raise ValueError(f"{Hq} query heads are not a multiple of {H} KV heads.")
    group = Hq // H
    bits = _bits_of(st.key_lut.shape[-1])
    if _bits_of(st.value_levels.numel()) != bits:
        raise NotImplementedError("the fused kernel needs the same bit width for keys and values.")
    inv_freq = st.rope.inv_freq
    if 2 * inv_freq.numel() != D or D not in (64, 128, 256):
        return None
    invf = _cached(st, ("inv_freq", dev), lambda: inv_freq.to(dev, torch.float32).contiguous())
    klut = _cached(st, ("key_lut", dev), lambda: st.key_lut.to(dev, torch.float32).contiguous())
    vlev = _cached(st, ("value_levels", dev), lambda: st.value_levels.to(dev, torch.float32).contiguous())
    vlevh = _cached(st, ("value_levels_h", dev), lambda: vlev.to(torch.float16).contiguous())
    kaff = _cached(st, ("key_affine", dev), lambda: _key_affine(klut))
    if has_q:
        quant = (st.k_codes, st.k_out_idx, st.k_out_val, st.v_codes, st.v_zero, st.v_scale, st.v_out_idx,
                 st.v_out_val, st.q_pos)
        G = int(st.v_zero.shape[1])  # value vectors per token (the codes are stored per head either way)
        ck, cv = int(st.k_out_idx.shape[-1]), int(st.v_out_idx.shape[-1])
    else:
        dummy = torch.zeros(1, 1, 1, 1, device=dev, dtype=torch.uint8)
        quant = (dummy,) * 9
        G, ck, cv = H, 0, 0
    v_token = G == 1 and H > 1
    voe = getattr(st, "v_out_ends", None) if has_q else None
    if use_dot is None:
        use_dot = group > 1
    if not use_dot and group != 1:
        raise ValueError("use_dot=False needs MHA (one query head per KV head).")
    fields_ok = D >= 128 and kaff is not None and cv <= 4
    # the natural kernel also takes token-group value rows with more than 4 slots (they span every KV head; each head
    # reads and applies only its own run of them, _overwrite_run)
    runs = v_token and voe is not None
    natural_ok = kaff is not None and (cv <= 4 or runs) and ck <= 4 and lutx is not False  # D: 64/128/256
    # the pairs kernel (Gluon, _gluon.py): 2-, 3- or 4-bit storage at head_dim 64/128 with <= 1 key slot per vector
    # (256: <= 3), head-group or token-group values with any number of slots; the natural kernel's sinks/window split
    # completes it (and is all that runs while no token is quantized yet)
    pairs_ok = (natural_ok and bits in (2, 3, 4) and D in PAIRS_HEAD_DIMS and (v_token or G == H)
                and ck <= PAIRS_MAX_KEY_SLOTS.get(D, 0) and group <= 8 and _pairs_available(dev))
    natural_options = (block_t, options[2], num_warps, value_correction, maxnreg, prefetch, lutx, reload, wide_loads)
    eager_pairs = (EAGER_PAIRS_MIN_TOKEN_HEADS is not None and has_q and D in EAGER_PAIRS_HEAD_DIMS
                   and B * H * int(st.n_q) * D // 128 >= EAGER_PAIRS_MIN_TOKEN_HEADS)
    if (kernel is None and (graph or eager_pairs) and pairs_ok and D in PAIRS_DEFAULT_HEAD_DIMS
            and all(o is None for o in natural_options)
            and _pairs_available(dev, True)):
        # H200, Llama-3-8B shape, nuq3-1%, graph replays (benchmarks/gpu_decode.md, run 62; 4K and 16K run 70):
        # head-group values 156.9 vs 324.0 us at 128K batch 1 against the natural kernel, 1106.5 vs 3766.1 at batch
        # 8, 88.5 vs 170.7 at 64K, 25.3 vs 43.7 at 4K; token-group values (the calibration default) 185.4 vs 458.5 us
        # at 128K batch 1, 1326.2 vs 5071.1 at batch 8, 40.7 vs 78.7 at 16K, 26.5 vs 57.6 at 4K. nuq2-1% (run 71):
        # 133.0 vs 286.8 us against the fields kernel; nuq4-1% (run 77): 173.4 vs 422.5 us against the natural
        # kernel at 128K batch 1, 24.2 vs 49.2 at 4K. In CUDA-graph steps; launched eagerly, the Gluon kernel
        # costs the host 270-500 us per call (run 53's eager_us), against 110-330 us for the natural kernel's whole
        # call, so eager launches take it only for large storages (EAGER_PAIRS_MIN_TOKEN_HEADS)
        kernel = "pairs"
    if kernel is None:
        # H200, Llama-3-8B shape at 128K (benchmarks/gpu_decode.md: natural in run 13, fields in run 4): per layer
        # nuq4 425 vs 514 us, nuq3 372 vs 435 us, but nuq2 371 vs 291 us (the natural kernel's cost does not shrink
        # with the width), so 2-bit storage keeps the fields kernel at head_dim 128. At 256 (Gemma-3-4B shape, run
        # 98) the natural kernel is ahead for nuq2 too, in every cell: 525 vs 799 us at 128K batch 1, 2398 vs 3653 at
        # 64K batch 8, 63.9 vs 89.1 at 4K batch 1
        fields_default = fields_ok and bits < 3 and D == 128
        kernel = "natural" if natural_ok and not fields_default else "fields" if fields_ok else "tiles"
    if kernel not in ("pairs", "fields", "natural", "tiles"):
        raise ValueError(f"kernel must be 'pairs', 'fields', 'natural', 'tiles' or None, got {kernel!r}.")
    pairs = kernel == "pairs"
    if pairs:
        if not pairs_ok:
            raise ValueError("the pairs kernel needs a CUDA GPU of sm_80 or newer, Triton 3.6 (its Gluon API; "
                             "kernels/_gluon.py SUPPORTED_TRITON), KVQUANT_PAIRS unset or 1, 2-, 3- or 4-bit keys "
                             "and values, head_dim 64 or 128 with at most 1 outlier slot per key vector or 256 with at "
                             "most 3, channel-mode keys, and at most 8 query heads per KV head; use kernel='natural'.")
        if any(o is not None for o in natural_options):
            raise ValueError("the pairs kernel takes no natural/fields launch options (block_t, use_dot, "
                             "num_warps, value_correction, maxnreg, prefetch, lutx, reload, wide_loads).")
        kernel = "natural"  # the sinks/window split's kernel
    if kernel == "fields" and not fields_ok:
        raise ValueError("the fields kernel needs head_dim >= 128, an affine key table and <= 4 value slots.")
    if kernel == "natural" and not natural_ok:
        raise ValueError("the natural kernel needs head_dim 64/128/256, an affine key table, <= 4 key outlier "
                         "slots, <= 4 value slots (any number for token-group values), and the register lookup "
                         "table (lutx).")
    if reload is None and kernel == "natural" and D == 256 and not v_token:
        # H200 sweeps at head_dim 256 (Gemma-3-4B shape, benchmarks/gpu_runs/run100-101, nuq3-1% head-group): the
        # loop invariants re-read from L1 every block, 504.5 against 609.2 us at 128K batch 1, 4518.7 against
        # 5447.8 at batch 8, 149.6 against 230.2 at 32K batch 1. Token-group values keep them in registers: there
        # reload was neutral (run 103: 742.4 against 745.9 us at 128K batch 1, 5642.9 against 5624.9 at batch 8, both
        # with the split rule of _kernel_splits; run 102's 4K-16K gap was a split count, run 104)
        reload = True
    if prefetch is True:  # the fields kernel's register double buffering, by its former name
        prefetch = "registers"
    if prefetch is None:
        prefetch = PREFETCH_DEFAULT
    if prefetch not in (False, "l1", "l2", "registers") or prefetch == "registers" and kernel != "fields":
        raise ValueError(f"prefetch must be None, False, 'l1' or 'l2' (or 'registers' / True for the fields kernel), "
                         f"got {prefetch!r} for the {kernel} kernel.")
    use_dot = use_dot or kernel in ("fields", "natural")
    gp = max(16, triton_next_pow2(group)) if use_dot else 1
    gr = triton_next_pow2(group)
    # H200 launch sweeps (benchmarks/gpu_decode.md): natural at d128 BT 32 / 2 warps (run 13); at d64 (SmolLM2-135M
    # shape, 128K, nuq3) BT 128 / 4 warps: batch 1 112 vs 197 us at BT 32 / 2 warps (run 16), 105 vs 105 (run 17);
    # batch 8 615 vs 631 us (run 17); the tiles kernel 166-167 and 1188 us
    nat64 = kernel == "natural" and D == 64
    bt = block_t or (128 if nat64 else 32 if kernel in ("fields", "natural") or D > 128 else 64)
    num_warps = num_warps or (2 if kernel == "natural" and D == 128 else 4)
    lutx = bool(kernel == "natural" or kernel == "fields" and (LUTX_DEFAULT and ck <= 4 if lutx is None else lutx))
    if lutx and ck > 4:
        raise ValueError(f"lutx=True handles <= 4 key outlier slots per vector (this storage has {ck}); "
                         "pass lutx=False.")
    if kernel == "fields" and maxnreg is None and bt == 32 and num_warps == 4:
        # H200 launch sweep at 128K, Llama-3-8B shape, nuq3 (benchmarks/gpu_decode.md): lutx 435 us with a cap of 128
        # registers vs 522 us without (more resident warps hide more latency); the gather path 611 vs 631 us
        maxnreg = 128
    # tiles kernel: value slots as a post-P@V correction (factorised one-hot dot [VA, BT] @ [BT, GR * D / VA]; tl.dot
    # needs >= 16); off by default: on the H200 the overwrite is faster (819 vs 1785 us at 128K, gpu_decode.md)
    va = 16
    vcorr = bool(value_correction and use_dot and cv and gr * D // va >= 16 and bt >= 16)
    consts = dict(H_KV=H, GROUP=group, GP=gp, BITS=bits, D=D, CK=ck, CV=cv, V_TOKEN=v_token, BT=bt,
                  USE_DOT=use_dot, F32=interpreting(), K_AFFINE=kaff is not None, GR=gr, VCORR=vcorr, VA=va,
                  num_warps=num_warps, num_stages=1)
    if maxnreg and not interpreting():  # 0: no register cap
        consts["maxnreg"] = int(maxnreg)
    if kernel in ("fields", "natural"):
        consts.update(NATURAL=kernel == "natural", PREFETCH=prefetch == "registers", LUTX=lutx,
                      PF=_PREFETCH_LEVEL.get(prefetch, 0))
        if kernel == "natural":
            if bt < 32:
                raise ValueError(f"the natural kernel needs block_t >= 32, got {bt}.")
            consts.update(RELOAD=bool(reload), WIDE=bool(wide_loads),
                          TAU=_cached(st, ("tau", dev, bt), lambda: _tau_table(inv_freq, bt, dev)))
            if cv > 4:
                consts.update(VOE=voe, soe_b=voe.stride(0), soe_t=voe.stride(2))
        if lutx:
            consts["KW"] = _cached(st, ("key_words", dev), lambda: _lut_words(kaff[0]))
            consts["VW"] = _cached(st, ("value_words", dev), lambda: _lut_words(vlev))
            consts["KDLH"] = _cached(st, ("key_levels_h", dev), lambda: kaff[0].to(torch.float16).contiguous())
    plan = _Plan()
    plan.H, plan.bt = H, bt
    plan.fn = K._kvq_decode_fields_kernel if kernel in ("fields", "natural") else K._kvq_decode_kernel
    plan.kernel = "pairs" if pairs else kernel
    plan.pairs = None
    if pairs:
        from . import _gluon

        plan.pairs = (_cached(st, ("pairs_tables", dev), lambda: _gluon.tables(kaff[0], kaff[1], kaff[2], vlev, invf)),
                      group, ck, cv, quant, voe, bits)
    plan.tensors = (*quant, klut, vlev, invf, *(kaff if kaff is not None else (klut, klut, klut)), vlevh)
    plan.strides = (*quant[0].stride()[:3], *quant[1].stride()[:3], *quant[3].stride()[:3], *quant[4].stride()[:3],
                    *quant[6].stride()[:3], quant[8].stride(0))
    plan.consts = consts
    plan.rope_scale = float(st.rope.attention_scaling)
    return plan


_MASK_MEMO: list = [None]


def _mask_bias_memo(attention_mask, batch: int, total: int, device):
    """:func:`mask_bias`, computed once for all layers of a step: transformers hands every layer the same mask
    tensor (the memo checks identity and the in-place version counter)."""
    if attention_mask is None:
        return None
    memo = _MASK_MEMO[0]
    if (memo is not None and memo[0] is attention_mask and memo[1] == attention_mask._version
            and memo[2] == (batch, total, device)):
        return memo[3]
    bias = mask_bias(attention_mask, batch, total, device)
    _MASK_MEMO[0] = (attention_mask, attention_mask._version, (batch, total, device), bias)
    return bias


LUTX_DEFAULT = True
# decode_attention's prefetch default for the natural and fields kernels: the next block's rows into L2 (PTX
# prefetch). H200, 128K, nuq3 (run 31, benchmarks/gpu_decode.md): Llama-3-8B batch 1 head-group values 322.8 vs
# 334.3 us, token-group 464.1 vs 493.3; batch 8 3770 vs 3914 and 5106 vs 5560; Llama-2-7B 1986 vs 2096 and 2851 vs
# 2958 (L1 within 1% of L2 in every row)
PREFETCH_DEFAULT = "l2"
_PREFETCH_LEVEL = {"l1": 1, "l2": 2}  # the kernels' PF constexpr


def _tau_table(inv_freq: torch.Tensor, bt: int, dev) -> torch.Tensor:
    """fp16 [2, bt, D/2]: cos and sin of tau * inv_freq for tau = 0..bt-1 (the natural kernel's RoPE table)."""
    ang = torch.arange(bt, dtype=torch.float64)[:, None] * inv_freq.detach().double().cpu()[None, :]
    return torch.stack([ang.cos(), ang.sin()]).to(dev, torch.float16).contiguous()


def _lut_words(levels: torch.Tensor) -> torch.Tensor:
    """The <= 16 fp16 levels as 8 int32 words for the kernels' PRMT lookup: [lo bytes of entries 0-3, 4-7, hi bytes
    of 0-3, 4-7, lo bytes of 8-11, 12-15, hi bytes of 8-11, 12-15] (byte i of a word = entry 4 k + i)."""
    n = levels.numel()
    if n > 16:
        raise ValueError(f"a register lookup table holds at most 16 levels, got {n}.")
    h = levels.detach().reshape(-1).to(torch.float16).view(torch.int16).to(torch.int64).cpu() & 0xFFFF
    h = torch.cat([h, torch.zeros(16 - n, dtype=torch.int64)])
    lo, hi = (h & 0xFF).reshape(4, 4), (h >> 8).reshape(4, 4)
    sh = torch.tensor([0, 8, 16, 24])
    wl, wh = (lo << sh).sum(1), (hi << sh).sum(1)
    words = torch.stack([wl[0], wl[1], wh[0], wh[1], wl[2], wl[3], wh[2], wh[3]])
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    return words.to(torch.int32).to(levels.device)


def _key_affine(klut: torch.Tensor):
    """(levels [L], scale [H, D], zero [H, D]) with klut[h, c, i] == levels[i] * scale[h, c] + zero[h, c], or None.

    ``key_lut`` is ``codec.key_lut()`` = decode_levels * key_scale + key_zero per channel; it is recovered from the
    table alone (levels = the widest channel's row, every other row an affine map of it) and verified (one host sync
    per storage; the result is cached). A non-affine table keeps the per-channel gather."""
    H, D, L = klut.shape
    flat = klut.reshape(H * D, L).double()
    rng = flat[:, -1] - flat[:, 0]
    ref = flat[int(rng.abs().argmax())]
    if float(ref[-1] - ref[0]) == 0.0:
        return None
    scale = rng / (ref[-1] - ref[0])
    zero = flat[:, 0] - scale * ref[0]
    err = (ref[None, :] * scale[:, None] + zero[:, None] - flat).abs().max()
    if float(err) > 1e-5 * max(float(flat.abs().max()), 1e-30):
        return None
    return (ref.float().contiguous(), scale.float().reshape(H, D).contiguous(),
            zero.float().reshape(H, D).contiguous())


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


#: the split merge: one program per query head and REDUCE_DC channels, reading 4096 / REDUCE_DC splits at a time;
#: False: one program per query head reading all splits in one load, as before 8508785 (an experiment knob; the same
#: reads, not the same code: at head_dim 256 over 257 splits the old kernel took 115 us,
#: benchmarks/gpu_runs/run131, and two passes 337 us per call in run 130 against 294 with this setting in run 132)
REDUCE_CHUNKS = True
#: the split merge's channels per program (with REDUCE_CHUNKS; it reads 4096 / REDUCE_DC splits per load): fewer
#: channels make more programs, each with fewer dependent loads. benchmarks/gpu_runs/run139 (nuq3-1% head-group, 128K,
#: graph replays): 16 against 64 channels, Gemma-3-4B heads batch 1 (257 splits) 225.0 against 232.4 us, Llama-3-8B
#: batch 1 (129 splits) 155.6 against 157.7; batch 8 (33 splits) within 0.2%
REDUCE_DC = 16


def _reduce(pacc, pm, pl, B, Hq, nsplit, D, dtype, dev):
    from . import _triton as K

    out = torch.empty(B, 1, Hq, D, device=dev, dtype=dtype).transpose(1, 2)  # [B, Hq, 1, D], stored as the
    sp = triton_next_pow2(nsplit)
    dc = min(D, REDUCE_DC) if REDUCE_CHUNKS else D
    K._reduce_kernel[(B * Hq, D // dc)](  # attention output layout [B, 1, Hq, D] (no transpose copy afterwards)
        pacc, pm, pl, out, out.stride(0), out.stride(1), Hq, nsplit, SP=sp, D=D, DC=dc,
        CS=min(sp, 4096 // dc) if REDUCE_CHUNKS else sp, num_warps=4)
    return out


def fp16_decode_attention(query, k, v, scaling, attention_mask=None, num_splits=None, block_t=None, use_dot=None):
    """Split-K fp16/bf16 decode attention (same design as the compressed kernel). k, v [B, H, T, D] post-RoPE."""
    from . import _triton as K

    B, Hq, _, D = query.shape
    H, T = int(k.shape[1]), int(k.shape[2])
    group = Hq // H
    dev = query.device
    if use_dot is None:
        use_dot = group > 1
    gp = max(16, triton_next_pow2(group)) if use_dot else 1
    bt = block_t or (64 if D <= 128 else 32)
    if num_splits is None:
        ns, chunk = _splits(T, B * H, dev, bt)
    else:
        ns = num_splits
        chunk = math.ceil(math.ceil(T / ns) / bt) * bt
        ns = math.ceil(T / chunk)
    ns = max(ns, 1)
    bias = mask_bias(attention_mask, B, T, dev)
    q = query[:, :, 0, :]
    pacc = torch.empty(B * Hq * ns * D, device=dev, dtype=torch.float32)
    pm = torch.empty(B * Hq * ns, device=dev, dtype=torch.float32)
    pl = torch.empty(B * Hq * ns, device=dev, dtype=torch.float32)
    K._fp16_decode_kernel[(B * H, ns)](
        q, pacc, pm, pl, k, v, bias if bias is not None else pm, float(scaling) * K.LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        bias.stride(0) if bias is not None else 0,
        T, chunk, ns,
        H_KV=H, GROUP=group, GP=gp, D=D, BT=bt, HAS_MASK=bias is not None, USE_DOT=use_dot, F32=interpreting(),
        num_warps=4,
    )
    return _reduce(pacc, pm, pl, B, Hq, ns, D, query.dtype, dev)


# ----------------------------------------------------------------------------------------------------------------
# quantize-and-append
# ----------------------------------------------------------------------------------------------------------------
def _shape_blocks(storage, codec, batch: int):
    """Zero-length PackedBlocks with the codec's shapes/dtypes (for LayerStorage._reserve)."""
    from ..core.codec import PackedBlock, index_dtype, uses_head_ends

    H, D = codec.heads, codec.head_dim
    dev = storage.device if hasattr(storage, "device") else storage.key_lut.device
    kbits, vbits = codec.key_cb.bits, codec.value_cb.bits
    ck, cv = codec.key_capacity, codec.value_capacity
    e = lambda *shape, dt: torch.empty(*shape, dtype=dt, device=dev)  # noqa: E731
    kb = PackedBlock(e(batch, H, 0, D * kbits // 8, dt=torch.uint8), e(batch, H, 0, ck, dt=index_dtype(D)),
                     e(batch, H, 0, ck, dt=torch.float16))
    G, nv = (H, D) if codec.value_group == "head" else (1, H * D)
    ends = (e(batch, G, 0, H, dt=index_dtype(cv + 1)) if uses_head_ends(codec.value_group, H, cv) else None)
    vb = PackedBlock(e(batch, H, 0, D * vbits // 8, dt=torch.uint8), e(batch, G, 0, cv, dt=index_dtype(nv)),
                     e(batch, G, 0, cv, dt=torch.float16), e(batch, G, 0, 1, dt=torch.float16),
                     e(batch, G, 0, 1, dt=torch.float16), ends)
    return kb, vb


def _ensure_capacity(storage, codec, batch: int, needed: int) -> None:
    cap = 0 if getattr(storage, "k_codes", None) is None else int(storage.k_codes.shape[2])
    if needed <= cap:
        return
    if hasattr(storage, "_reserve"):  # kvquant.cache.storage.LayerStorage
        storage._reserve(needed, *_shape_blocks(storage, codec, batch))
        return
    for name in ("reserve", "ensure_capacity"):
        fn = getattr(storage, name, None)
        if callable(fn):
            fn(needed)
            return
    raise ValueError(f"storage capacity {cap} < {needed} tokens and it exposes no way to grow.")


def encodes(storage, codec, head_dim: int) -> bool:
    """Whether :func:`quantize_append`'s kernel encodes for ``storage`` (else the codec's PyTorch path): channel-mode
    keys stored pre-RoPE with a per-channel table, and a power-of-2 head_dim (the kernel's tiles)."""
    return (codec.key_mode == "channel" and getattr(storage, "pre_rope", True) and storage.key_lut is not None
            and head_dim & (head_dim - 1) == 0)


def quantize_append(storage, k_post, v, positions, codec=None, pre_rope: bool = False, lengths=None):
    """Encode ``k_post``/``v`` [B, H, T, D] on the GPU and append them to the quantized region of ``storage``.

    Keys are post-RoPE (``pre_rope=True``: already pre-RoPE) at ``positions`` [B, T] (or [T]; any integer dtype).
    Matches ``core.codec`` (channel-mode keys, token-mode values); writes codes/outliers/zero/scale/q_pos at
    ``storage.n_q`` and advances it. No host synchronisation; the launch constants are cached on the storage.

    ``lengths`` (CUDA graphs, :mod:`kvquant.kernels.graphs`): an int32 device tensor whose first element is the
    write offset; the caller has reserved the capacity and advances both that tensor and ``storage.n_q``."""
    from . import _triton as K

    st = storage
    codec = codec if codec is not None else getattr(st, "codec", None)
    if codec is None:
        raise ValueError("quantize_append needs the layer codec (storage.codec or codec=...).")
    B, H, T, D = k_post.shape
    if T == 0:
        return st
    dev = k_post.device
    if positions.dim() == 1:
        positions = positions[None, :].expand(B, T)
    n_q = int(st.n_q)
    if not encodes(st, codec, D):
        from .reference import reference_quantize_append

        return reference_quantize_append(st, k_post, v, positions, codec, pre_rope)
    if lengths is None:
        _ensure_capacity(st, codec, B, n_q + T)
    if k_post.stride(-1) != 1:
        k_post = k_post.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    p = _quant_plan(st, codec, dev, D)
    bt, btv = p["consts"]["BTK"], p["consts"]["BTV"]
    n_tk, n_tv = triton.cdiv(T, bt), triton.cdiv(T, btv)
    n_key_progs = B * H * n_tk
    # one launch per layer step: key blocks and value blocks are programs of the same grid
    K._quant_kv_kernel[(n_key_progs + B * p["G"] * n_tv,)](
        k_post, positions, *p["key_tensors"], k_post.stride(0), k_post.stride(1), k_post.stride(2),
        positions.stride(0), positions.stride(1), *p["key_strides"],
        v, *p["value_tensors"], v.stride(0), v.stride(1), v.stride(2), *p["value_strides"],
        T, n_q, p["n_freq"], n_key_progs, n_tk, n_tv, UNDO_ROPE=not pre_rope, **p["consts"],
        **({} if lengths is None else dict(LENS=lengths, DEVLEN=True)),
    )
    if lengths is None:
        st.n_q = n_q + T
    return st


def _quant_plan(st, codec, dev, D) -> dict:
    """Constant arguments of :func:`quantize_append` for ``st`` (cached; rebuilt when the storage reallocates)."""
    return _cached(st, ("quant-plan", dev), lambda: _build_quant_plan(st, codec, dev, D), stamp=st.k_codes)


def _build_quant_plan(st, codec, dev, D) -> dict:
    H = codec.heads
    kz = _cached(st, ("kz", dev), lambda: codec.key_zero.to(dev, torch.float32).contiguous())
    ks = _cached(st, ("ks", dev), lambda: codec.key_scale.to(dev, torch.float32).contiguous())
    klut = _cached(st, ("key_lut", dev), lambda: st.key_lut.to(dev, torch.float32).contiguous())
    kbnd = _cached(st, ("kbnd", dev), lambda: codec.key_cb.boundaries.to(dev, torch.float32).contiguous())
    vbnd = _cached(st, ("vbnd", dev), lambda: codec.value_cb.boundaries.to(dev, torch.float32).contiguous())
    invf = _cached(st, ("inv_freq", dev), lambda: st.rope.inv_freq.to(dev, torch.float32).contiguous())
    G = int(st.v_zero.shape[1])
    token = G == 1 and H > 1
    nv = H * D if token else D
    nvp = triton_next_pow2(nv)
    cv = int(st.v_out_idx.shape[-1])
    voe = getattr(st, "v_out_ends", None)
    ends = dict(VOE=voe, soe_b=voe.stride(0), soe_t=voe.stride(2), ENDS=True) if voe is not None else {}
    return dict(
        G=G, n_freq=st.rope.inv_freq.numel(),
        key_tensors=(kz, ks, klut, kbnd, invf, float(st.rope.attention_scaling), st.k_codes, st.k_out_idx,
                     st.k_out_val, st.q_pos),
        key_strides=(st.k_codes.stride(0), st.k_codes.stride(1), st.k_codes.stride(2), st.k_out_idx.stride(0),
                     st.k_out_idx.stride(1), st.k_out_idx.stride(2), st.q_pos.stride(0)),
        value_tensors=(vbnd, st.v_codes, st.v_zero, st.v_scale, st.v_out_idx, st.v_out_val),
        value_strides=(st.v_codes.stride(0), st.v_codes.stride(1), st.v_codes.stride(2), st.v_zero.stride(0),
                       st.v_zero.stride(1), st.v_zero.stride(2), st.v_out_idx.stride(0), st.v_out_idx.stride(1),
                       st.v_out_idx.stride(2)),
        consts=dict(H=H, D=D, KBITS=codec.key_cb.bits, CK=int(st.k_out_idx.shape[-1]), BTK=max(1, min(64, 4096 // D)),
                    F32=interpreting(), G=G, NV=nv, NVP=nvp, VBITS=codec.value_cb.bits, CV=cv,
                    CVP=triton_next_pow2(cv + 1), BTV=max(1, min(32, 4096 // nvp)), TOKEN=token,
                    HP=triton_next_pow2(H), num_warps=8 if nvp >= 2048 else 4, **ends),
    )


try:  # the module stays importable without triton (available() is then False)
    import triton
except Exception:  # pragma: no cover
    triton = None
