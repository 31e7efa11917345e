"""Per-layer storage of the compressed KV cache, exactly as described in ``docs/storage-format.md``.

One :class:`LayerStorage` holds one decoder layer's keys and values in cache order::

    [ sinks (model dtype, n_s tokens) | quantized (n_q tokens) | recent window (model dtype, n_w tokens) ]

The storage only *places* what :class:`~kvquant.core.codec.LayerCodec` produces (packed codes, outliers, scales);
all quantization math lives in the codec. Keys of the quantized region are stored pre-RoPE with their RoPE position
(``q_pos``); sinks and window hold post-RoPE keys as transformers hands them over.
"""

from __future__ import annotations

import torch

from ..core.codec import LayerCodec, PackedBlock
from ..core.rope import RopeSpec, apply_rope, unapply_rope

# Quantized-region fields, per tensor: (storage name, PackedBlock attribute). The k_zero/k_scale pair only exists for
# token-mode keys (ablations); channel-mode keys (KVQuant) keep their ranges in the quantizer / ``key_lut``.
_K_FIELDS = (("k_codes", "codes"), ("k_out_idx", "out_idx"), ("k_out_val", "out_val"), ("k_zero", "zero"),
             ("k_scale", "scale"))
_V_FIELDS = (("v_codes", "codes"), ("v_out_idx", "out_idx"), ("v_out_val", "out_val"), ("v_zero", "zero"),
             ("v_scale", "scale"), ("v_out_ends", "out_ends"))

# Component of every field in the memory report.
COMPONENT = {
    "k_codes": "codes", "v_codes": "codes",
    "k_out_idx": "outliers", "k_out_val": "outliers", "v_out_idx": "outliers", "v_out_val": "outliers",
    "v_out_ends": "outliers",
    "k_zero": "scales", "k_scale": "scales", "v_zero": "scales", "v_scale": "scales",
    "q_pos": "positions", "win_pos": "positions",
    "sink_k": "sinks", "sink_v": "sinks",
    "win_k": "window", "win_v": "window",
}
COMPONENTS = ("codes", "scales", "outliers", "sinks", "window", "positions")


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _held(tensors) -> dict[str, int]:
    """Bytes of the buffers behind ``tensors`` (name -> tensor): what they keep allocated, views included; a buffer
    shared by several tensors counts once (for the first)."""
    seen, out = set(), {}
    for name, t in tensors.items():
        s = t.untyped_storage()
        key = (s.data_ptr(), t.device) if s.nbytes() else None
        out[name] = 0 if key in seen or key is None else s.nbytes()
        seen.add(key)
    return out


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor that owns exactly its bytes. A slice, even an empty or contiguous one, keeps the whole buffer
    it came from alive: an empty window sliced off a prompt-sized concatenation would hold an fp16 copy of the prompt
    per layer for as long as the window stays empty (always, with R = 0)."""
    if t.storage_offset() == 0 and t.is_contiguous() and t.untyped_storage().nbytes() == _nbytes(t):
        return t
    return t.clone(memory_format=torch.contiguous_format)


_RING_MASK: dict = {}  # LayerStorage.ring_mask's last result: {"last": (mask, key, rolled mask)}


class LayerStorage:
    """Compressed keys/values of one layer for a batch of ``batch`` sequences.

    Args:
        codec: the layer's :class:`LayerCodec` (from the quantizer).
        rope: the layer's :class:`RopeSpec` (un-rotation before quantization, re-rotation after decoding).
        n_sinks: the first ``n_sinks`` tokens ever appended stay unquantized.
        recent_window: R, the most recent tokens kept unquantized; older ones are quantized once when they leave.
        batch, dtype, device: batch size, dtype of the sink/window tensors (the model's), device.
        pre_rope: quantize keys before RoPE (the KVQuant method); False stores post-RoPE keys (ablation).
        key_lut: optional precomputed ``codec.key_lut()`` shared by the layer's storages.
        initial_capacity: first allocation of the quantized region (it then doubles as needed).
    """

    def __init__(
        self,
        codec: LayerCodec,
        rope: RopeSpec,
        n_sinks: int,
        recent_window: int,
        batch: int,
        dtype: torch.dtype,
        device: torch.device | str,
        pre_rope: bool = True,
        key_lut: torch.Tensor | None = None,
        initial_capacity: int = 64,
    ):
        self.codec = codec
        self.rope = rope
        self.n_sinks = int(n_sinks)
        self.recent_window = int(recent_window)
        self.batch = int(batch)
        self.dtype = dtype
        self.device = torch.device(device)
        self.pre_rope = pre_rope
        self.initial_capacity = max(1, int(initial_capacity))
        H, D = codec.heads, codec.head_dim
        self.heads, self.head_dim = H, D
        if key_lut is None and codec.key_mode == "channel":
            key_lut = codec.key_lut()
        self.key_lut = None if key_lut is None else key_lut.to(self.device, torch.float32)
        self.value_levels = codec.value_cb.decode_levels.to(self.device, torch.float32)
        empty = torch.empty(self.batch, H, 0, D, dtype=dtype, device=self.device)
        self.sink_k, self.sink_v = empty, empty.clone()
        self.win_k, self.win_v = empty.clone(), empty.clone()
        self.win_pos = torch.empty(self.batch, 0, dtype=torch.int32, device=self.device)
        # Quantized region: allocated on first use with the codec's shapes; ``capacity`` tokens, ``n_q`` used.
        self.capacity = 0
        self.n_q = 0
        self.q_pos: torch.Tensor | None = None
        for name, _ in _K_FIELDS + _V_FIELDS:
            setattr(self, name, None)
        self.n_seen = 0  # tokens ever appended (decides which ones are sinks)
        self.n_dropped = 0  # tokens dropped from the front (sliding-window layers)
        # sliding-window decode steps (ring_replace): quantized row r holds the token (r - ring_start) % n_q in cache
        # order; every other operation first puts the rows back in cache order (_unring)
        self.ring_start = 0

    # ---- sizes ---------------------------------------------------------------------------------------------------
    @property
    def n_s(self) -> int:
        return self.sink_k.shape[2]

    @property
    def n_w(self) -> int:
        return self.win_k.shape[2]

    def __len__(self) -> int:
        """Tokens held, in cache order (sinks + quantized + window)."""
        return self.n_s + self.n_q + self.n_w

    def _fields(self) -> list[str]:
        return [n for n, _ in _K_FIELDS + _V_FIELDS if getattr(self, n) is not None]

    # ---- appending -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> int:
        """Append new post-RoPE keys ``k`` and values ``v`` [B, H, T, D] at RoPE ``positions`` [B, T].

        The first ``n_sinks`` tokens ever appended become sinks; the rest enter the recent window, and whatever
        exceeds R tokens there is quantized (once) into the packed region. Returns the number of tokens quantized.
        """
        b, h, t, d = k.shape
        self._unring()
        if (b, h, d) != (self.batch, self.heads, self.head_dim) or v.shape != k.shape:
            raise ValueError(
                f"append expects keys/values [B={self.batch}, H={self.heads}, T, D={self.head_dim}], got "
                f"{tuple(k.shape)} and {tuple(v.shape)}."
            )
        if t == 0:  # (nothing to place; a fresh storage has no quantized fields to write into yet)
            return 0
        R = self.recent_window
        if self.n_seen >= self.n_sinks and self.n_w == R and (R == 0 or t <= R):
            # Steady state (every decode step): no sink left to fill and the window full (or R = 0), so the t oldest
            # of window + new tokens leave the window. Fewer launches than the general path below (a decode step is
            # host-bound: benchmarks/gpu_notes.md); the same result.
            self.n_seen += t
            positions = positions.to(self.device).expand(b, t)
            k, v = k.to(self.dtype), v.to(self.dtype)
            if R == 0:
                self._quantize(k, v, positions)
                return t
            self._quantize(self.win_k[:, :, :t], self.win_v[:, :, :t], self.win_pos[:, :t])
            self.win_k = torch.cat((self.win_k[:, :, t:], k), 2)
            self.win_v = torch.cat((self.win_v[:, :, t:], v), 2)
            self.win_pos = torch.cat((self.win_pos[:, t:], positions.to(torch.int32)), 1)
            return t
        positions = positions.to(self.device, torch.int32).expand(b, t)
        k, v = k.to(self.dtype), v.to(self.dtype)
        a = min(t, max(0, self.n_sinks - self.n_seen))
        if a:
            self.sink_k = torch.cat((self.sink_k, k[:, :, :a]), 2)
            self.sink_v = torch.cat((self.sink_v, v[:, :, :a]), 2)
        self.n_seen += t
        if a == t:
            return 0
        wk = torch.cat((self.win_k, k[:, :, a:]), 2)
        wv = torch.cat((self.win_v, v[:, :, a:]), 2)
        wp = torch.cat((self.win_pos, positions[:, a:]), 1)
        over = wk.shape[2] - self.recent_window
        if over > 0:
            self._quantize(wk[:, :, :over], wv[:, :, :over], wp[:, :over])
            wk, wv, wp = wk[:, :, over:], wv[:, :, over:], wp[:, over:]
        # Own copies, so that the window never keeps the larger concatenation alive.
        self.win_k, self.win_v, self.win_pos = _own(wk), _own(wv), _own(wp)
        return max(0, over)

    def append_quantized(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Quantize post-RoPE ``k``/``v`` [B, H, T, D] at ``positions`` [B, T] straight into the packed region
        (bypassing sinks and window; used to fill storage for measurements)."""
        self._unring()
        self.n_seen += k.shape[2]
        self._quantize(k.to(self.dtype), v.to(self.dtype), positions.to(self.device, torch.int32).expand(
            k.shape[0], k.shape[2]))

    @torch.no_grad()
    def ring_replace(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """A full sliding-window layer's decode step: the new token [B, H, 1, D] (post-RoPE, at ``positions`` [B, 1])
        is quantized into the row of the oldest quantized token, which is dropped, instead of dropping it from the
        front (which moves every field) and appending. Only for a storage of quantized tokens alone (no sinks left,
        no recent window). The rows are then a rotation of cache order (``ring_start``): the fused decode kernels
        read tokens in any order (each row has its position), and the attention mask is rotated to match
        (:func:`ring_mask`); every other operation first restores cache order."""
        if k.shape[2] != 1 or self.n_s or self.n_w or self.recent_window or not self.n_q:
            raise ValueError("ring_replace takes one token into a storage of quantized tokens only (no sinks, no "
                             f"recent window); got {k.shape[2]} tokens, {self.n_s} sinks, window {self.n_w} / "
                             f"{self.recent_window}, {self.n_q} quantized.")
        n, row = self.n_q, self.ring_start
        positions = positions.to(self.device, torch.int32).expand(k.shape[0], 1)
        self.n_q = row  # the encoders write at n_q
        try:
            self._quantize(k.to(self.dtype), v.to(self.dtype), positions)
        finally:
            self.n_q = n
        self.ring_advance()

    def ring_advance(self) -> int:
        """The bookkeeping of one ring step (ring_replace, or its CUDA-graph replay in kvquant.kernels.graphs): the
        oldest token's row, which the new token takes, is returned; the rotation, tokens seen and tokens dropped
        move on by one."""
        row = self.ring_start
        self.ring_start = (row + 1) % self.n_q
        self.n_seen += 1
        self.n_dropped += 1
        return row

    def ring_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """``mask`` (last dim: the held tokens in cache order) with its quantized columns in row order. The sliding
        layers of a model rotate in step, so the last result is reused for the same mask (tensor and version): the
        kernels' mask-bias memo then hits for every layer of the step, as without the ring."""
        if mask is None or not self.ring_start:
            return mask
        s, n = self.n_s, self.n_q
        key = (mask._version, self.ring_start, s, n)
        hit = _RING_MASK.get("last")
        if hit is not None and hit[0] is mask and hit[1] == key:
            return hit[2]
        rolled = mask.clone()
        rolled[..., s : s + n] = torch.roll(mask[..., s : s + n], self.ring_start, dims=-1)
        _RING_MASK["last"] = (mask, key, rolled)
        return rolled

    def _unring(self) -> None:
        """Put the quantized rows back in cache order (after ring_replace steps): one roll per field."""
        r = self.ring_start
        if not r:
            return
        n = self.n_q
        for name in self._fields() + ["q_pos"]:
            dim = 1 if name == "q_pos" else 2
            rows = getattr(self, name).narrow(dim, 0, n)
            rows.copy_(torch.roll(rows, -r, dims=dim))
        self.ring_start = 0

    def _fused_encode(self, k_post: torch.Tensor) -> bool:
        """Encode on the GPU with ``kernels.quantize_append`` (same format; on with the fused decode kernel)."""
        from .kvquant_cache import kernels_available

        d = k_post.shape[-1]
        if self.rope.rotary_dim != d or not kernels_available(self.device):
            return False
        from .. import kernels

        return kernels.encodes(self, self.codec, d)

    def _quantize(self, k_post: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        if self._fused_encode(k_post):
            from .. import kernels

            kernels.quantize_append(self, k_post, v, pos, codec=self.codec)
            return
        if self.pre_rope:
            cos, sin = self.rope.cos_sin(pos)
            k = unapply_rope(k_post.float(), cos, sin)
        else:
            k = k_post.float()
        kb = self.codec.encode_keys(k)
        vb = self.codec.encode_values(v)
        t = k.shape[2]
        self._reserve(self.n_q + t, kb, vb)
        s = slice(self.n_q, self.n_q + t)
        for fields, blk in ((_K_FIELDS, kb), (_V_FIELDS, vb)):
            for name, attr in fields:
                src = getattr(blk, attr)
                if src is not None:
                    getattr(self, name)[:, :, s] = src
        self.q_pos[:, s] = pos
        self.n_q += t

    def _reserve(self, needed: int, kb: PackedBlock, vb: PackedBlock) -> None:
        """Make room for ``needed`` quantized tokens, doubling the capacity (amortised O(1) appends)."""
        if needed <= self.capacity:
            return
        cap = max(needed, 2 * self.capacity, self.initial_capacity)
        for fields, blk in ((_K_FIELDS, kb), (_V_FIELDS, vb)):
            for name, attr in fields:
                src = getattr(blk, attr)
                if src is None:
                    continue
                new = torch.zeros(*src.shape[:2], cap, src.shape[3], dtype=src.dtype, device=self.device)
                old = getattr(self, name)
                if old is not None and self.n_q:
                    new[:, :, : self.n_q] = old[:, :, : self.n_q]
                setattr(self, name, new)
        q_pos = torch.zeros(self.batch, cap, dtype=torch.int32, device=self.device)
        if self.q_pos is not None and self.n_q:
            q_pos[:, : self.n_q] = self.q_pos[:, : self.n_q]
        self.q_pos = q_pos
        self.capacity = cap

    # ---- reading -------------------------------------------------------------------------------------------------
    def packed_keys(self) -> PackedBlock:
        """The used part of the quantized keys as a :class:`PackedBlock` (views, no copy)."""
        return self._packed(_K_FIELDS)

    def packed_values(self) -> PackedBlock:
        return self._packed(_V_FIELDS)

    def _packed(self, fields) -> PackedBlock:
        self._unring()
        n = self.n_q
        return PackedBlock(**{attr: (None if getattr(self, name) is None else getattr(self, name)[:, :, :n])
                              for name, attr in fields})

    @torch.no_grad()
    def dequantize_quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode the quantized region only -> post-RoPE keys and values [B, H, n_q, D] in the storage dtype."""
        if self.n_q == 0:
            e = self.win_k[:, :, :0]
            return e, e
        k = self.codec.decode_keys(self.packed_keys())
        if self.pre_rope:
            cos, sin = self.rope.cos_sin(self.q_pos[:, : self.n_q])
            k = apply_rope(k, cos, sin)
        v = self.codec.decode_values(self.packed_values())
        return k.to(self.dtype), v.to(self.dtype)

    @torch.no_grad()
    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All held tokens in cache order -> post-RoPE keys and values [B, H, n_s + n_q + n_w, D] (storage dtype)."""
        kq, vq = self.dequantize_quantized()
        if self.n_q == 0:
            return torch.cat((self.sink_k, self.win_k), 2), torch.cat((self.sink_v, self.win_v), 2)
        return torch.cat((self.sink_k, kq, self.win_k), 2), torch.cat((self.sink_v, vq, self.win_v), 2)

    # ---- dropping (sliding-window layers) ------------------------------------------------------------------------
    @torch.no_grad()
    def drop_front(self, m: int) -> None:
        """Forget the ``m`` oldest tokens (sinks first, then quantized, then window): sliding-window layers."""
        m = min(int(m), len(self))
        if m <= 0:
            return
        self._unring()
        self.n_dropped += m
        a = min(m, self.n_s)
        if a:
            self.sink_k = _own(self.sink_k[:, :, a:])
            self.sink_v = _own(self.sink_v[:, :, a:])
            m -= a
        q = min(m, self.n_q)
        if q:
            keep = self.n_q - q
            for name in self._fields():
                buf = getattr(self, name)
                buf[:, :, :keep] = buf[:, :, q : self.n_q].clone()
            self.q_pos[:, :keep] = self.q_pos[:, q : self.n_q].clone()
            self.n_q = keep
            m -= q
        if m:
            self.win_k = _own(self.win_k[:, :, m:])
            self.win_v = _own(self.win_v[:, :, m:])
            self.win_pos = _own(self.win_pos[:, m:])

    # ---- batch operations (beam search, batch selection) ---------------------------------------------------------
    def _map_batch(self, fn) -> None:
        for name in self._fields() + ["q_pos"]:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        for name in ("sink_k", "sink_v", "win_k", "win_v", "win_pos"):
            setattr(self, name, fn(getattr(self, name)))
        self.batch = self.sink_k.shape[0]

    def index_select(self, idx: torch.Tensor) -> None:
        """Reorder / select batch rows (beam search ``reorder_cache``, ``batch_select_indices``)."""
        idx = idx.to(self.device)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        self._map_batch(lambda t: t.index_select(0, idx))

    def repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    # ---- accounting ----------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this storage allocated (quantized region at full capacity), by format field name."""
        out = {name: getattr(self, name) for name in self._fields()}
        if self.q_pos is not None:
            out["q_pos"] = self.q_pos
        for name in ("sink_k", "sink_v", "win_k", "win_v", "win_pos"):
            out[name] = getattr(self, name)
        return out

    def nbytes(self) -> int:
        """Bytes allocated for this storage: the buffers behind every tensor (capacity included), without the shared
        lookup tables."""
        return sum(_held(self.tensors()).values())

    def table_nbytes(self) -> int:
        return _nbytes(self.key_lut) + _nbytes(self.value_levels)

    def component_bytes(self, used: bool = True) -> dict[str, int]:
        """Bytes per component (codes, scales, outliers, sinks, window, positions); ``used`` counts only the tokens
        in use, else the whole allocation."""
        out = dict.fromkeys(COMPONENTS, 0)
        tensors = self.tensors()
        held = _held(tensors)
        for name, t in tensors.items():
            if not used:
                n = held[name]  # the real allocation, whatever the tensor's own size
            elif name in COMPONENT and t.dim() >= 2 and name not in ("sink_k", "sink_v", "win_k", "win_v", "win_pos"):
                n = _nbytes(t) // max(1, self.capacity) * self.n_q
            else:
                n = _nbytes(t)
            out[COMPONENT[name]] += n
        return out

    def numel(self) -> int:
        """Key + value elements held (what an fp16 cache of the same tokens stores)."""
        return 2 * self.batch * self.heads * self.head_dim * len(self)

    def __repr__(self) -> str:
        return (f"LayerStorage(B={self.batch}, H={self.heads}, D={self.head_dim}, sinks={self.n_s}, "
                f"quantized={self.n_q}/{self.capacity}, window={self.n_w}, bytes={self.nbytes()})")
