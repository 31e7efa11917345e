"""``KVQuantCache``: a transformers :class:`~transformers.Cache` that really stores the KVQuant-compressed KV cache.

Usage::

    cache = KVQuantCache(quantizer, model)            # checks the quantizer against the model
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=256)
    print(cache.memory_report())

transformers hands the cache post-RoPE keys and no positions, so the cache reads each forward's RoPE positions with a
forward pre-hook on the model's rotary-embedding module (one hook per module, shared by all caches), un-rotates the
keys that get quantized, stores their positions and re-rotates on decoding.
"""

from __future__ import annotations

import os
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from ..core.rope import find_rotary_module, rope_specs
from ..models import model_identity, sliding_window_layers
from ..quantizer import Quantizer, QuantizerError, load_quantizer
from . import attention as _attention
from .storage import COMPONENTS, LayerStorage


class ContextLengthError(ValueError):
    """A token position would exceed the model's maximum context (``max_position_embeddings``)."""


# ---- RoPE positions from the rotary module ------------------------------------------------------------------------
_POS_ATTR = "_kvquant_position_ids"
_HOOK_ATTR = "_kvquant_position_hook"


def _capture_positions(module, args, kwargs):
    x = args[0] if args else kwargs.get("x")
    if isinstance(x, torch.Tensor) and x.numel() == 0:
        return  # a RopeSpec.cos_sin call (empty input), not the model's forward: keep the forward's positions
    pos = kwargs.get("position_ids")
    if pos is None and len(args) > 1:
        pos = args[1]
    setattr(module, _POS_ATTR, pos if isinstance(pos, torch.Tensor) else None)


def install_position_hook(rotary: torch.nn.Module) -> None:
    """Register (once per module) the pre-hook that records the ``position_ids`` of each forward."""
    if getattr(rotary, _HOOK_ATTR, None) is None:
        handle = rotary.register_forward_pre_hook(_capture_positions, with_kwargs=True)
        setattr(rotary, _HOOK_ATTR, handle)
        setattr(rotary, _POS_ATTR, None)


# ---- kernels ------------------------------------------------------------------------------------------------------
_KERNEL_OK: dict[str, bool] = {}
#: decode steps of sliding-window layers (Gemma 3's local layers) through the fused kernel (until the window is full
#: launched eagerly; then see SLIDING_RING); False: dequantized and attended with SDPA, as before the fifteenth GPU
#: session (kept for benchmarks/gpu_suite.py's side-by-side rows)
SLIDING_LAYER_KERNELS = True
#: True: a full sliding-window layer's kernel step quantizes the new token into the oldest token's row
#: (LayerStorage.ring_replace) instead of dropping the front (which moves every field: two launches each) and
#: appending. Run 125 (benchmarks/gpu_sliding_steps.md, Gemma-3-4B shape, batch 1): 1.16x the front drop per decode
#: step at 32K and 128K. False: the front drop (kept for the benchmark's side-by-side rows)
SLIDING_RING = True
#: With SLIDING_RING on CUDA: a full window's ring steps are CUDA-graph replays (kvquant.kernels.graphs), like the
#: global layers' steps; False: launched eagerly (kept for benchmarks/gpu_sliding_steps.py's side-by-side rows)
SLIDING_RING_GRAPHS = True


def _steady_decode(storage, t: int) -> bool:
    from ..kernels.graphs import LayerDecodeGraph

    return LayerDecodeGraph.steady(storage, t)


def kernels_available(device: torch.device) -> bool:
    """Whether decode steps (and encoding) go through the fused Triton kernels.

    On by default on CUDA devices (benchmarks/gpu_generate.md: faster end to end than the reference path);
    ``KVQUANT_FUSED_DECODE=0`` or ``KVQUANT_DISABLE_KERNELS=1`` turns it off. On CPU the reference path runs, unless
    ``KVQUANT_FUSED_DECODE=1`` under ``TRITON_INTERPRET=1`` (tests)."""
    flag = os.environ.get("KVQUANT_FUSED_DECODE")
    if os.environ.get("KVQUANT_DISABLE_KERNELS") == "1" or flag == "0":
        return False
    if torch.device(device).type != "cuda" and flag != "1":
        return False
    key = str(device)
    if key not in _KERNEL_OK:
        try:
            from .. import kernels

            _KERNEL_OK[key] = bool(kernels.available(device))
        except Exception:  # noqa: BLE001 - any import/probe failure means "use the reference path"
            _KERNEL_OK[key] = False
    return _KERNEL_OK[key]


# ---- one layer ----------------------------------------------------------------------------------------------------
class KVQuantLayer(CacheLayerMixin):
    """One decoder layer of :class:`KVQuantCache`: a :class:`LayerStorage` plus transformers' layer protocol.

    ``sliding_window`` (Gemma 3 ``sliding_attention`` layers) keeps transformers' ``DynamicSlidingWindowLayer``
    semantics: ``update`` returns the previous ``sliding_window - 1`` tokens plus the new ones, and only those
    ``sliding_window - 1`` are kept afterwards (older ones, sinks included, are dropped). A decode step through the
    fused kernel reads the storage after ``update`` returns, so there the drop waits for the next ``update`` (the
    storage holds ``sliding_window`` tokens between steps).
    """

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, cache: KVQuantCache, layer_idx: int, sliding_window: int | None = None):
        super().__init__()
        self._cache = weakref.proxy(cache)
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.cumulative_length = 0
        self.storage: LayerStorage | None = None

    def __repr__(self) -> str:
        return f"KVQuantLayer({self.layer_idx}, sliding_window={self.sliding_window}, {self.storage!r})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        c = self._cache
        self.device, self.dtype = key_states.device, key_states.dtype
        self.storage = LayerStorage(
            c.quantizer.layers[self.layer_idx],
            c.rope[self.layer_idx],
            c.n_sinks,
            c.recent_window,
            key_states.shape[0],
            key_states.dtype,
            key_states.device,
            pre_rope=c.quantizer.config.pre_rope,
            key_lut=c._key_lut(self.layer_idx, key_states.device),
        )
        self.is_initialized = True

    @property
    def batch_size(self) -> int:
        return self.storage.batch

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        c = self._cache
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        st = self.storage
        b, h, t, d = key_states.shape
        if (h, d) != (st.heads, st.head_dim):
            raise QuantizerError(
                f"layer {self.layer_idx}: the model produced keys with {h} heads x {d} dims, the quantizer has "
                f"{st.heads} x {st.head_dim}."
            )
        if b != st.batch:
            raise ValueError(
                f"layer {self.layer_idx}: batch size changed from {st.batch} to {b} without reorder/select; use a "
                "new KVQuantCache (or cache.reset()) for a new batch."
            )
        pos = c._positions(b, t, self.cumulative_length, key_states.device)
        c._check_limit(pos, self.cumulative_length + t, t)
        self.cumulative_length += t
        R = st.recent_window
        # prefill="exact": a multi-token step attends its own tokens unquantized (plain SDPA over the prompt) and
        # earlier tokens as stored; its tokens are compressed in the same step
        exact = t > 1 and c.prefill == "exact"
        band = R > 0 and t > 1 and not exact and c._uses_kvquant_attention()
        kernel = (t == 1 and (SLIDING_LAYER_KERNELS or not self.is_sliding) and c._uses_kvquant_attention()
                  and kernels_available(key_states.device))
        if (kernel and self.is_sliding and SLIDING_RING and st.n_q == len(st) == self.sliding_window
                and R == 0):
            # a full window of quantized tokens: the new token takes the oldest one's row (the front drop's result
            # without moving the storage); the kernel reads the rows in any order, the mask rotated to match. The
            # rows stay where they are, so on CUDA the step is a graph replay like a global layer's
            if SLIDING_RING_GRAPHS and _steady_decode(st, t):
                _attention.set_pending(self.layer_idx, ("graph", st, key_states, value_states, pos, True))
            else:
                st.ring_replace(key_states, value_states, pos)
                _attention.set_pending(self.layer_idx, ("kernel", st))
            return key_states, value_states  # placeholders: the kernel reads the storage
        if self.is_sliding:  # a kernel step's deferred drop (a no-op after any other step)
            st.drop_front(len(st) - (self.sliding_window - 1))
        if kernel and not self.is_sliding and _steady_decode(st, t):
            # steady decode step: the append runs with the attention, both as one CUDA-graph replay
            # (kvquant.kernels.graphs), or eagerly when the attention call does not qualify (no fused kernel for
            # this storage, graphs off, a layer whose recordings churn)
            _attention.set_pending(self.layer_idx, ("graph", st, key_states, value_states, pos, False))
            return key_states, value_states  # placeholders: the kernel reads the storage
        if exact:
            old = st.dequantize() if len(st) else None
        elif band:
            old_win_k, old_win_v, n_old = st.win_k, st.win_v, st.n_s + st.n_q
        st.append(key_states, value_states, pos)
        if kernel:
            # a sliding layer's storage now holds exactly the tokens its window attends to (its drop waits for the
            # next update), in cache order, as the sliding mask's columns have them
            _attention.set_pending(self.layer_idx, ("kernel", st))
            return key_states, value_states  # placeholders: the kernel reads the storage
        pending = None
        if exact and old is None:
            keys, values = key_states, value_states
        elif exact:
            keys = torch.cat((old[0], key_states.to(old[0].dtype)), 2)
            values = torch.cat((old[1], value_states.to(old[1].dtype)), 2)
        else:
            keys, values = st.dequantize()
            if band:
                k_fp = torch.cat((keys[:, :, :n_old], old_win_k, key_states.to(keys.dtype)), 2)
                v_fp = torch.cat((values[:, :, :n_old], old_win_v, value_states.to(values.dtype)), 2)
                pending = ("band", k_fp, v_fp, R)
        _attention.set_pending(self.layer_idx, pending)
        if self.is_sliding:
            st.drop_front(len(st) - (self.sliding_window - 1))
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_sliding:
            return self.cumulative_length + query_length, 0
        # Exactly DynamicSlidingWindowLayer's sizes.
        kv_offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        if self.cumulative_length >= self.sliding_window:
            return self.sliding_window - 1 + query_length, kv_offset
        return self.cumulative_length + query_length, kv_offset

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def reset(self) -> None:
        self.storage = None
        self.is_initialized = False
        self.cumulative_length = 0
        self._cache._top_memo = None

    def offload(self):  # the storage stays where it is
        pass

    def prefetch(self):
        pass

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "KVQuantCache cannot be cropped (quantized tokens cannot be un-quantized); assisted/speculative decoding "
            "is not supported with it."
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.storage is not None:
            self.storage.index_select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.storage is not None:
            self.storage.repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.storage is not None:
            self.storage.index_select(torch.as_tensor(indices))


class FP16SlidingLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer kept in the model's dtype (``KVQuantCache(sliding_layers="fp16")``): transformers' own
    ``DynamicSlidingWindowLayer``, attended with plain SDPA. It holds at most ``sliding_window - 1`` tokens whatever
    the context, so quantizing it saves little memory at long context."""

    storage = None  # no compressed storage (code that walks ``cache.layers`` reads ``layer.storage``)

    def __repr__(self) -> str:
        tokens = self.keys.shape[-2] if self.is_initialized else 0
        return f"FP16SlidingLayer(sliding_window={self.sliding_window}, tokens={tokens})"


SLIDING_LAYER_MODES = ("quantized", "fp16")


# ---- the cache ----------------------------------------------------------------------------------------------------
class KVQuantCache(Cache):
    """The KVQuant-compressed KV cache for ``model.generate(..., past_key_values=cache)``.

    Args:
        quantizer: a :class:`~kvquant.Quantizer` (or a name/path for :func:`~kvquant.load_quantizer`), calibrated
            for this model; a quantizer of another shape is refused (``QuantizerError``).
        model: the transformers causal LM the cache is used with.
        recent_window: R, the most recent tokens kept unquantized (default: the quantizer's ``recent_window``).
        n_sinks: the first tokens kept unquantized (default: the quantizer's ``n_sinks``).
        set_attention: route the model's attention through the ``"kvquant"`` function (SDPA, plus the fp16-window
            band for multi-token steps and the fused GPU kernel for decode steps when available). Note this changes
            ``model.config._attn_implementation`` for later forwards too (it behaves as SDPA without this cache).
        prefill: ``"exact"`` (default): a multi-token step (the prompt) attends over its own keys/values unquantized,
            with plain SDPA, and earlier tokens as stored; its tokens are compressed in the same step, so every later
            token sees them quantized. ``"quantized"``: the step attends over the quantized tokens, exactly as if
            they had been decoded one by one; this is what the perplexity evaluation measures
            (:mod:`kvquant.evaluation`), so use it to reproduce those numbers through the cache.
        sliding_layers: ``"quantized"`` (default): sliding-window layers (Gemma 3's local layers) are compressed like
            the others. ``"fp16"``: they keep their window in the model's dtype (:class:`FP16SlidingLayer`, plain
            SDPA). Their window is bounded (Gemma 3: 1024 tokens), so the memory this costs is bounded too, and it
            shrinks relative to the global layers as the context grows; the evaluation's
            ``KVQuantMethod(..., fp16_layers=...)`` gives the same numbers.

    Tokens are quantized once, when they leave the recent window; the first ``n_sinks`` tokens of each row stay in
    the model's dtype. With left padding the sinks are the first cache slots (pad tokens for the padded rows).
    """

    def __init__(
        self,
        quantizer: Quantizer | str | os.PathLike,
        model: torch.nn.Module,
        recent_window: int | None = None,
        n_sinks: int | None = None,
        set_attention: bool = True,
        prefill: str = "exact",
        sliding_layers: str = "quantized",
    ):
        if not isinstance(quantizer, Quantizer):
            quantizer = load_quantizer(quantizer)
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"KVQuantCache needs the transformers model, got {type(model).__name__}.")
        ident = model_identity(model)
        quantizer.check_model(ident)
        if len(quantizer.layers) != ident["num_hidden_layers"]:
            raise QuantizerError(
                f"quantizer {quantizer.name!r} has {len(quantizer.layers)} layers, the model "
                f"{ident['num_hidden_layers']}."
            )
        self.quantizer = quantizer
        cfg = quantizer.config
        self.recent_window = cfg.recent_window if recent_window is None else int(recent_window)
        self.n_sinks = cfg.n_sinks if n_sinks is None else int(n_sinks)
        if self.recent_window < 0 or self.n_sinks < 0:
            raise ValueError("recent_window and n_sinks must be >= 0.")
        if prefill not in ("exact", "quantized"):
            raise ValueError(f"prefill must be 'exact' or 'quantized', got {prefill!r}.")
        self.prefill = prefill
        if sliding_layers not in SLIDING_LAYER_MODES:
            raise ValueError(f"sliding_layers must be 'quantized' or 'fp16', got {sliding_layers!r}.")
        windows = sliding_window_layers(model)
        if sliding_layers == "fp16" and len(windows) == ident["num_hidden_layers"]:
            raise ValueError(
                "sliding_layers='fp16': every layer of this model is a sliding-window layer (window "
                f"{next(iter(windows.values()))}), so nothing would be compressed; use sliding_layers='quantized'."
            )
        self.sliding_layers = sliding_layers
        text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        self.max_positions = getattr(text, "max_position_embeddings", None)
        self._config = model.config
        self.rope = rope_specs(model)
        self._rotary = find_rotary_module(model)
        install_position_hook(self._rotary)
        self._luts: dict[tuple[int, str], torch.Tensor] = {}
        self._pos_from_arange = False
        self._top_memo: tuple[int, int] | None = None  # (cache length, max position + 1) of the last checked step
        layers = []
        for i in range(ident["num_hidden_layers"]):
            if i in windows and sliding_layers == "fp16":
                layers.append(FP16SlidingLayer(windows[i]))
            else:
                layers.append(KVQuantLayer(self, i, windows.get(i)))
        super().__init__(layers=layers)
        if set_attention:
            _attention.register()
            if getattr(model.config, "_attn_implementation", None) != _attention.ATTENTION_NAME:
                model.set_attn_implementation(_attention.ATTENTION_NAME)

    # ---- helpers used by the layers ------------------------------------------------------------------------------
    def _key_lut(self, layer: int, device: torch.device) -> torch.Tensor | None:
        lc = self.quantizer.layers[layer]
        if lc.key_mode != "channel":
            return None
        key = (layer, str(device))
        if key not in self._luts:
            self._luts[key] = lc.key_lut().to(device, torch.float32)
        return self._luts[key]

    def _uses_kvquant_attention(self) -> bool:
        return getattr(self._config, "_attn_implementation", None) == _attention.ATTENTION_NAME

    def _positions(self, b: int, t: int, start: int, device) -> torch.Tensor:
        """RoPE positions [B, T] of the tokens being added (captured from the rotary module's last call)."""
        pos = getattr(self._rotary, _POS_ATTR, None)
        if pos is not None and pos.dim() == 2 and pos.shape[-1] == t and pos.shape[0] in (1, b):
            self._pos_from_arange = False
            return pos.to(device).expand(b, t)
        self._pos_from_arange = True
        return torch.arange(start, start + t, device=device).unsqueeze(0).expand(b, t)

    def _position_top(self, pos: torch.Tensor, length: int, t: int | None) -> int:
        """max(pos) + 1 without a device->host sync on the decode path: arange positions end at ``length``; the
        first layer of a step reads the captured positions once and the other layers reuse it (same length); a
        one-token step right after a checked step advances the max by one (transformers' position_ids are the
        previous ones + 1). Anything else (prefill, chunked prefill, after a reset) reads the tensor."""
        if not pos.numel():
            return 0
        if self._pos_from_arange:
            top = length
        elif self._top_memo is not None and self._top_memo[0] == length:
            return self._top_memo[1]
        elif t == 1 and self._top_memo is not None and self._top_memo[0] == length - 1:
            top = self._top_memo[1] + 1
        else:
            top = int(pos.max()) + 1
        self._top_memo = (length, top)
        return top

    def _check_limit(self, pos: torch.Tensor, length: int, t: int | None = None) -> None:
        if not self.max_positions:
            return
        top = self._position_top(pos, length, t)
        if top > self.max_positions:
            raise ContextLengthError(
                f"position {top - 1} (cache length {length}) is past the model's context limit of "
                f"{self.max_positions} tokens (max_position_embeddings). Shorten the prompt or lower max_new_tokens "
                f"so that prompt + new tokens <= {self.max_positions}."
            )

    # ---- transformers Cache protocol extras ----------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            if layer.storage is not None:
                return layer.storage.batch
            if isinstance(layer, FP16SlidingLayer) and layer.is_initialized:
                return layer.keys.shape[0]
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            next(layer for layer in self.layers if isinstance(layer, KVQuantLayer)).crop(tokens_to_remove)

    # ---- memory --------------------------------------------------------------------------------------------------
    def memory_report(self) -> MemoryReport:
        """True bytes held (every allocated tensor, capacity included) versus fp16 for the same tokens.

        Keys: ``bytes_allocated`` (the buffers behind all storage tensors, unused capacity and anything a view keeps
        alive included, plus the per-layer lookup tables),
        ``bytes_used`` (the elements in use), ``fp16_bytes`` (2 bytes per key/value element of the tokens held),
        ``effective_bits`` (8 * bytes_used / elements), ``effective_bits_allocated``, ``compression_ratio``
        (fp16_bytes / bytes_used), ``components`` (used bytes of codes, scales, outliers, sinks, window, positions),
        ``components_allocated``, ``tables_bytes``, ``tokens`` (per-layer tokens held, max over layers), ``layers``.
        With ``sliding_layers="fp16"`` the components also have ``fp16_layers`` (those layers' keys and values).
        """
        names = COMPONENTS + (("fp16_layers",) if self.sliding_layers == "fp16" else ())
        used = dict.fromkeys(names, 0)
        alloc = dict.fromkeys(names, 0)
        elems = 0
        tables = sum(t.numel() * t.element_size() for t in self._luts.values())
        tokens = 0
        for layer in self.layers:
            if isinstance(layer, FP16SlidingLayer):
                if layer.is_initialized:
                    kv = (layer.keys, layer.values)
                    used["fp16_layers"] += sum(t.numel() * t.element_size() for t in kv)
                    alloc["fp16_layers"] += sum(t.untyped_storage().nbytes() for t in kv)
                    elems += sum(t.numel() for t in kv)
                    tokens = max(tokens, layer.keys.shape[-2])
                continue
            st = layer.storage
            if st is None:
                continue
            for k, v in st.component_bytes(used=True).items():
                used[k] += v
            for k, v in st.component_bytes(used=False).items():
                alloc[k] += v
            tables += st.value_levels.numel() * 4
            elems += st.numel()
            tokens = max(tokens, len(st))
        b_used, b_alloc = sum(used.values()), sum(alloc.values()) + tables
        fp16 = 2 * elems
        return MemoryReport(
            quantizer=self.quantizer.name,
            bits=self.quantizer.config.bits,
            outlier_fraction=self.quantizer.config.outlier_fraction,
            recent_window=self.recent_window,
            n_sinks=self.n_sinks,
            tokens=tokens,
            seq_length=self.get_seq_length(),
            layers=len(self.layers),
            bytes_allocated=b_alloc,
            bytes_used=b_used,
            fp16_bytes=fp16,
            effective_bits=8 * b_used / elems if elems else 0.0,
            effective_bits_allocated=8 * b_alloc / elems if elems else 0.0,
            compression_ratio=fp16 / b_used if b_used else 0.0,
            components=used,
            components_allocated=alloc,
            tables_bytes=tables,
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


class MemoryReport(dict):
    """The dict returned by :meth:`KVQuantCache.memory_report`; ``str()`` gives a readable summary."""

    def __str__(self) -> str:
        r = self
        lines = [
            f"KVQuant cache memory ({r['quantizer']}, R={r['recent_window']}, sinks={r['n_sinks']}): "
            f"{r['tokens']} tokens x {r['layers']} layers",
            f"  allocated   {_mib(r['bytes_allocated'])} (incl. capacity and {r['tables_bytes']} B of lookup tables)",
            f"  used        {_mib(r['bytes_used'])} = {r['effective_bits']:.3f} bits/element",
            f"  fp16        {_mib(r['fp16_bytes'])} -> compression x{r['compression_ratio']:.2f}",
            "  components (used): "
            + ", ".join(f"{k} {_mib(v)}" for k, v in r["components"].items()),
        ]
        return "\n".join(lines)
