"""A layer's decode step replayed as a CUDA graph.

In eager mode a decode step is host-bound: per layer, Python and three Triton launches with 60+ arguments each
(quantize-and-append of the new token, fused attention, reduce) cost about 0.35 ms of host time on the H200's host,
several times their GPU time (benchmarks/gpu_notes.md). :class:`LayerDecodeGraph` records those launches once in a
CUDA graph and replays them: per step, four small copies into static buffers and one replay.

What makes that possible: the kernels read the quantized length from an int32 device tensor (``lengths=``) instead
of a launch argument, so the recorded arguments stay valid from one step to the next; the attention runs over a fixed
number of splits, each deriving its share from that length; the graph itself advances the length.

It applies to the steady state of a decode step (one token, no fp16 recent window, the sinks filled, a fused
kernel) and is re-recorded when the storage reallocates (its capacity doubles). A full sliding window's step
(``ring``: ``LayerStorage.ring_replace``) writes the new token into the oldest token's row, read from a device
tensor, and attends over a length that stays the window's. A padded batch's attention mask is
turned into an additive bias once per step, in a buffer shared by every layer's graph (:func:`_static_bias`).
Anything else takes the eager path. ``KVQUANT_CUDA_GRAPHS=0`` turns it off.
"""

from __future__ import annotations

import os

import torch

from .. import kernels as _k  # the package's functions looked up at call time (tests may replace them)

__all__ = ["LayerDecodeGraph", "graphs_enabled"]


GRAPH_KERNELS = ("pairs", "natural", "fields", "tiles")  # decode kernels whose steps are replayed as graphs


def graphs_enabled() -> bool:
    return os.environ.get("KVQUANT_CUDA_GRAPHS", "1") != "0"


def _on_cuda(storage) -> bool:
    return storage.k_codes.is_cuda


class LayerDecodeGraph:
    """The decode step of one :class:`~kvquant.cache.storage.LayerStorage` as a CUDA graph (see the module doc).
    Held by the storage (:func:`for_storage`), which every method takes as an argument: no reference back to it, so
    a dropped cache is freed at once (a cycle would keep its GPU memory until the garbage collector runs)."""

    def __init__(self):
        self.graph = None
        self.stamp = None  # the storage's k_codes tensor when the graph was recorded
        self.key = None  # (shapes, dtypes, scaling) the graph was recorded for
        self.kernel_ok = None  # (stamp, whether the natural/fields kernel serves this storage)
        self.lens = None  # int32 [1] on the device: the quantized length the kernels read
        self.dev_n_q = -1  # what self.lens holds (host mirror); -1: unknown
        self.row = None  # int32 [1] on the device: a ring step's write row
        self.bufs = None
        self.out = None
        self.failed = False
        self.replays = 0  # replays of the current recording
        self.bias = None  # the shared mask-bias buffer the current step reads (held: the recording points into it)

    @staticmethod
    def for_storage(storage) -> LayerDecodeGraph:
        g = getattr(storage, "_decode_graph", None)
        if g is None:
            g = storage._decode_graph = LayerDecodeGraph()
        return g

    @staticmethod
    def steady(storage, t: int) -> bool:
        """Whether a ``t``-token append to ``storage`` is a steady decode step (the cache's cheap pre-check)."""
        st = storage
        return (t == 1 and graphs_enabled() and st.recent_window == 0 and st.n_w == 0 and st.n_seen >= st.n_sinks
                and st.n_q > 0 and st.k_codes is not None and _on_cuda(st))

    def applies(self, st, query, attention_mask) -> bool:
        if self.failed or not self.steady(st, query.shape[2]):
            return False
        if self.kernel_ok is None or self.kernel_ok[0] is not st.k_codes:
            self.kernel_ok = (st.k_codes, _k.decode_kernel(query, st, graph=True) in GRAPH_KERNELS)
        return self.kernel_ok[1]

    def step(self, st, k, v, pos, query, scaling, attention_mask=None, ring: bool = False):
        """Append ``k``/``v`` [B, H, 1, D] at ``pos`` [B, 1] and return the attention output [B, Hq, 1, D] of
        ``query`` over the whole layer (``attention_mask``: as for ``decode_attention``, covering the new token);
        the storage's bookkeeping advances as in ``LayerStorage.append`` (``ring``: as in ``ring_replace``, the
        mask covering the window after it, in cache order)."""
        k, v = k.to(st.dtype), v.to(st.dtype)
        pos = pos.to(st.device).expand(k.shape[0], 1)
        dev = st.k_codes.device
        if ring:  # the oldest token's row; the mask is rotated to the rows as they will be after this step
            if self.row is None or self.row.device != dev:
                self.row = torch.zeros(1, dtype=torch.int32, device=dev)
            self.row.fill_(st.ring_advance())
            attention_mask = st.ring_mask(attention_mask)
            total = st.n_s + st.n_q
        else:
            _k._ensure_capacity(st, st.codec, st.batch, st.n_q + 1)
            total = st.n_s + st.n_q + 1
        self._sync_lens(st)
        self.bias = None if attention_mask is None else _static_bias(
            attention_mask, st.batch, total, st.n_s + st.capacity, dev)
        key = (tuple(k.shape), k.dtype, tuple(query.shape), query.dtype, tuple(pos.shape), pos.dtype, float(scaling),
               None if self.bias is None else self.bias.data_ptr(), ring)
        if self.graph is not None and self.stamp is st.k_codes and self.key == key:
            b = self.bufs
            b["k"].copy_(k)
            b["v"].copy_(v)
            b["pos"].copy_(pos)
            b["q"].copy_(query)
            self.graph.replay()
            self.replays += 1
            out = self.out
        else:  # first step, or the storage was reallocated: run this step eagerly (compiling the kernels), then record
            churn = self.graph is not None and self.replays < 8  # e.g. beam search reorders the storage every step
            self.bufs = dict(k=k.clone(), v=v.clone(), pos=pos.clone(), q=query.clone())
            self.key, self.graph, self.replays = key, None, 0
            self._body(st, scaling, ring)
            out = self.out
            if churn:
                self.failed = True  # recordings would not pay: this layer stays eager
            else:
                self._record(st, scaling, ring)
        if not ring:  # (a ring step's bookkeeping moved on above)
            st.n_q += 1
            st.n_seen += 1
            self.dev_n_q = st.n_q
        return out

    def _sync_lens(self, st):
        if self.lens is None or self.lens.device != st.k_codes.device:
            self.lens = torch.zeros(1, dtype=torch.int32, device=st.k_codes.device)
            self.dev_n_q = -1
        if self.dev_n_q != st.n_q:  # first use, or the eager path ran in between: one asynchronous fill
            self.lens.fill_(st.n_q)
            self.dev_n_q = st.n_q

    def _body(self, st, scaling, ring=False):
        b = self.bufs
        dev = st.k_codes.device
        splits = _k._cached(st, ("graph-splits", dev), lambda: _k.graph_splits(st, b["q"]), stamp=st.k_codes)
        _k.quantize_append(st, b["k"], b["v"], b["pos"], codec=st.codec, lengths=self.row if ring else self.lens)
        if not ring:  # (a ring step keeps the length: the new token replaced the oldest)
            self.lens.add_(1)
        self.out = _k.decode_attention(b["q"], st, scaling, None, num_splits=splits, lengths=self.lens,
                                       bias=self.bias)

    def _record(self, st, scaling, ring=False):
        try:
            g = self._capture(st, lambda: self._body(st, scaling, ring))
        except Exception as e:  # noqa: BLE001 -- never fail a generation over the graph: stay eager for this layer
            import warnings

            warnings.warn(f"kvquant: CUDA-graph recording failed ({e!r}); this layer stays on the eager path.",
                          stacklevel=3)
            self.failed = True
            return
        self.graph, self.stamp = g, st.k_codes

    @staticmethod
    def _capture(st, fn):
        """A CUDA graph of ``fn`` (nothing runs while recording). torch.cuda.graph() would also synchronise and
        collect garbage at every recording (per layer and reallocation), so the capture is begun and ended here."""
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device=st.k_codes.device)
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                g.capture_begin()
                try:
                    fn()
                finally:
                    g.capture_end()
        finally:
            torch.cuda.current_stream().wait_stream(stream)
        return g


_BIAS: dict = {}  # (device, batch, width) -> [fp32 bias buffer, the memoised bias it was last filled from]
#: widths kept at once, least recently used dropped first: a model's global layers grow while its sliding layers keep
#: the window's width, and a width dropped while its layers still step would have their graphs re-recorded
_BIAS_WIDTHS = 4


def _static_bias(attention_mask, batch: int, total: int, width: int, device) -> torch.Tensor:
    """The step's additive mask bias (``kernels.mask_bias`` of ``attention_mask`` over ``total`` keys) in a [batch,
    width] buffer at a fixed address, shared by the graphs of every layer of that width. The bias comes from the
    decode path's per-step memo (one per mask tensor and in-place version), so the buffer is filled by the first
    layer of a step and only read by the others. Graphs hold their buffer, so one dropped from this table stays
    valid for them."""
    key = (device, batch, width)
    ent = _BIAS.pop(key, None)
    if ent is None:
        while len(_BIAS) >= _BIAS_WIDTHS:  # the least recently used width: storages grew past it (their graphs keep
            del _BIAS[next(iter(_BIAS))]  # what they use)
        ent = [torch.zeros(batch, width, device=device, dtype=torch.float32), None]
    _BIAS[key] = ent  # (last: the most recently used)
    bias = _k._mask_bias_memo(attention_mask, batch, total, device)
    if ent[1] is not bias:
        ent[0][:, :total].copy_(bias)
        ent[1] = bias
    return ent[0]
