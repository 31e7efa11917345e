"""KV-cache methods for simulated evaluation: KVQuant (from a quantizer) and the baselines, all through one interface.

A method turns one layer's new post-RoPE keys and values [B, H, T, D] into what attention will see, by really
encoding them into their storage form and decoding it again, and reports the bytes that storage holds. Bytes come from
the encoded tensors themselves (packed codes, fp16 scales/zeros, outlier values and indices, fp16 sinks/windows), so
effective bits are measured, not assumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..core.codebook import lloyd_max_gaussian_levels, nearest_code, normal_float_levels, uniform_levels
from ..core.codec import Codebook, PackedBlock, decode_token, encode_token, from_vectors, to_vectors
from ..core.packing import pack_codes, unpack_codes
from ..core.rope import RopeSpec, apply_rope, unapply_rope
from ..quantizer import Quantizer


def _fp16_bytes(x: torch.Tensor) -> int:
    return x.numel() * 2


@dataclass
class Method:
    """Base class. ``recent_window`` R > 0 means every query sees the R most recent keys/values in fp16."""

    name: str
    family: str  # "fp16" | "kvquant" | "baseline"
    bits: int | None = None
    outlier_fraction: float = 0.0
    recent_window: int = 0
    notes: str = ""
    nbytes: int = field(default=0, init=False)
    nelems: int = field(default=0, init=False)

    def reset_accounting(self) -> None:
        self.nbytes = 0
        self.nelems = 0

    def fake(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, rope: RopeSpec):
        """Return (k_hat, v_hat) post-RoPE, same shape/dtype as the inputs, and add the stored bytes/elements."""
        raise NotImplementedError

    def _account(self, k: torch.Tensor, v: torch.Tensor, nbytes: int) -> None:
        self.nbytes += nbytes
        self.nelems += k.numel() + v.numel()

    @property
    def effective_bits(self) -> float:
        return 8 * self.nbytes / max(1, self.nelems)


class FP16(Method):
    """The unquantized cache (2 bytes per element). The harness scores it from the reference forward itself."""

    def __init__(self):
        super().__init__("fp16", "fp16")

    @property
    def effective_bits(self) -> float:
        return 16.0

    def fake(self, layer, k, v, start, rope):
        self._account(k, v, _fp16_bytes(k) + _fp16_bytes(v))
        return k, v


def _split_window(x: torch.Tensor, start: int, n_sinks: int, recent: int):
    """Positions [start, start+T): sinks (< n_sinks) | quantized | recent window (last ``recent`` of the block).

    In simulated evaluation the whole window is one block; the recent part is what the cache would hold in fp16
    at the end of the sequence (queries see fp16 for their own recent keys through band attention)."""
    t = x.shape[2]
    a = min(t, max(0, n_sinks - start))
    b = max(a, t - recent)
    return a, b


class KVQuantMethod(Method):
    """KVQuant through a calibrated :class:`Quantizer` (the same codec the cache uses). ``fp16_layers``: layers kept
    unquantized, as ``KVQuantCache(sliding_layers="fp16")`` keeps the sliding-window layers
    (:func:`kvquant.models.sliding_window_layers` lists them)."""

    def __init__(self, q: Quantizer, name: str | None = None, recent_window: int | None = None,
                 fp16_layers=()):
        cfg = q.config
        super().__init__(
            name or q.name,
            "kvquant",
            cfg.bits,
            cfg.outlier_fraction,
            cfg.recent_window if recent_window is None else recent_window,
        )
        self.q = q
        self.fp16_layers = frozenset(int(i) for i in fp16_layers)
        bad = sorted(i for i in self.fp16_layers if not 0 <= i < len(q.layers))
        if bad:
            raise ValueError(f"fp16_layers {bad} are not layers of quantizer {q.name!r} ({len(q.layers)} layers).")

    def fake(self, layer, k, v, start, rope):
        if layer in self.fp16_layers:
            self._account(k, v, _fp16_bytes(k) + _fp16_bytes(v))
            return k, v
        cfg, lc = self.q.config, self.q.layers[layer]
        a, b = _split_window(k, start, cfg.n_sinks, self.recent_window)
        kq, vq = k[:, :, a:b], v[:, :, a:b]
        nbytes = _fp16_bytes(k[:, :, :a]) + _fp16_bytes(v[:, :, :a]) + _fp16_bytes(k[:, :, b:]) * 2
        if b > a:
            pos = torch.arange(start + a, start + b, device=k.device).unsqueeze(0).expand(k.shape[0], -1)
            cos, sin = rope.cos_sin(pos)
            ks = unapply_rope(kq.float(), cos, sin) if cfg.pre_rope else kq.float()
            kb, vb = lc.encode_keys(ks), lc.encode_values(vq)
            nbytes += kb.nbytes() + vb.nbytes()
            kh = lc.decode_keys(kb)
            kh = apply_rope(kh, cos, sin) if cfg.pre_rope else kh
            k = torch.cat((k[:, :, :a], kh.to(k.dtype), k[:, :, b:]), 2)
            v = torch.cat((v[:, :, :a], lc.decode_values(vb).to(v.dtype), v[:, :, b:]), 2)
        self._account(k, v, nbytes)
        return k, v


# ---- baselines ---------------------------------------------------------------------------------------------------
def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, G, T, group] vectors of ``group`` consecutive channels of each token (across heads)."""
    v = to_vectors(x, "token")  # [B, 1, T, H*D]
    b, _, t, n = v.shape
    return v.reshape(b, t, n // group, group).transpose(1, 2)


def _ungrouped(v: torch.Tensor, h: int) -> torch.Tensor:
    b, g, t, n = v.shape
    return from_vectors(v.transpose(1, 2).reshape(b, 1, t, g * n), "token", h)


class UniformPerToken(Method):
    """Asymmetric uniform (or NormalFloat) N-bit per token after RoPE, in channel groups (FlexGen/ATOM style).

    group=None quantizes each token over all KV heads at once (the paper's "intN per-token")."""

    def __init__(self, bits: int, group: int | None = None, levels: str = "uniform", recent_window: int = 0):
        lv = uniform_levels(bits) if levels == "uniform" else normal_float_levels(bits)
        self.cb = Codebook.fixed(lv)
        self.group = group
        label = {"uniform": "int", "nf": "nf"}[levels]
        g = f" g{group}" if group else ""
        super().__init__(f"{label}{bits} per-token{g}", "baseline", bits, 0.0, recent_window)

    def _q(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        h, d = x.shape[1], x.shape[3]
        g = self.group or h * d
        if (h * d) % g:
            raise ValueError(f"group {g} does not divide {h * d} channels")
        vec = _grouped(x.float(), g)
        blk = encode_token(vec, self.cb, 0, "head")
        out = decode_token(blk, self.cb, "head", vec.shape[1], g)
        return _ungrouped(out, h).to(x.dtype), blk.nbytes()

    def fake(self, layer, k, v, start, rope):
        t = k.shape[2]
        b = max(0, t - self.recent_window)
        kh, nk = self._q(k[:, :, :b])
        vh, nv = self._q(v[:, :, :b])
        k = torch.cat((kh, k[:, :, b:]), 2)
        v = torch.cat((vh, v[:, :, b:]), 2)
        self._account(k, v, nk + nv + 2 * _fp16_bytes(k[:, :, b:]))
        return k, v


class KIVI(Method):
    """KIVI-N: keys per channel over groups of 32 tokens (after RoPE), values per token in groups of 32 channels,
    asymmetric uniform, an fp16 window of the ``residual`` most recent tokens (and any incomplete key group)."""

    def __init__(self, bits: int, group: int = 32, residual: int = 128):
        super().__init__(f"KIVI-{bits} (g{group}, r{residual})", "baseline", bits, 0.0, residual)
        self.cb = Codebook.fixed(uniform_levels(bits))
        self.group = group

    def fake(self, layer, k, v, start, rope):
        bsz, h, t, d = k.shape
        g = self.group
        nq = max(0, (t - self.recent_window) // g * g)  # whole groups outside the residual window
        kq = k[:, :, :nq].float()
        nbytes = 2 * _fp16_bytes(k[:, :, nq:])
        if nq:
            # Keys: vectors are (head, group of 32 tokens, channel) -> 32 values along tokens.
            kv = kq.reshape(bsz, h, nq // g, g, d).permute(0, 1, 2, 4, 3).reshape(bsz, h, (nq // g) * d, g)
            kb = encode_token(kv, self.cb, 0, "head")
            kd = decode_token(kb, self.cb, "head", h, g)
            kd = kd.reshape(bsz, h, nq // g, d, g).permute(0, 1, 2, 4, 3).reshape(bsz, h, nq, d)
            vv = _grouped(v[:, :, :nq].float(), g)
            vb = encode_token(vv, self.cb, 0, "head")
            vd = _ungrouped(decode_token(vb, self.cb, "head", vv.shape[1], g), h)
            nbytes += kb.nbytes() + vb.nbytes()
            k = torch.cat((kd.to(k.dtype), k[:, :, nq:]), 2)
            v = torch.cat((vd.to(v.dtype), v[:, :, nq:]), 2)
        self._account(k, v, nbytes)
        return k, v


def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard matrix of size n (a power of two)."""
    if n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {n}")
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat((torch.cat((H, H), 1), torch.cat((H, -H), 1)), 0)
    return H / math.sqrt(n)


class Rotated(Method):
    """Hadamard rotation of each head vector (QuaRot / TurboQuant-style caches), then per-token quantization:
    ``levels="uniform"`` (asymmetric min/max) or ``"lloyd"`` (Lloyd-Max levels for a Gaussian, scaled by the vector's
    RMS). Post-RoPE keys; per head; fp16 scale (+ zero for uniform) per vector."""

    def __init__(self, bits: int, levels: str = "uniform"):
        super().__init__(f"Hadamard + {'int' if levels == 'uniform' else 'Lloyd-Max '}{bits}", "baseline", bits)
        self.levels = levels
        self.bits = bits
        self.cb = Codebook.fixed(uniform_levels(bits) if levels == "uniform" else lloyd_max_gaussian_levels(bits))

    def _q(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        d = x.shape[-1]
        R = hadamard(d).to(x.device)
        xr = x.float() @ R
        if self.levels == "uniform":
            blk = encode_token(xr, self.cb, 0, "head")
            out = decode_token(blk, self.cb, "head", x.shape[1], d)
            nbytes = blk.nbytes()
        else:
            scale = xr.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6).half()
            codes = nearest_code(xr / scale.float(), self.cb.boundaries)
            packed = pack_codes(codes, self.bits)
            out = self.cb.decode_levels.to(x.device)[unpack_codes(packed, self.bits, d)] * scale.float()
            nbytes = PackedBlock(packed, packed[..., :0], scale[..., :0], None, scale).nbytes()
        return (out @ R.T).to(x.dtype), nbytes

    def fake(self, layer, k, v, start, rope):
        kh, nk = self._q(k)
        vh, nv = self._q(v)
        self._account(k, v, nk + nv)
        return kh, vh
