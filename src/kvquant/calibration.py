"""Calibration: model + text -> streamed statistics -> quantizer artifacts.

Two passes over the calibration windows, with memory independent of the number of tokens x channels:

1. forward only: exact per-channel tails of the keys (pre- and post-RoPE), kept as running top-m / bottom-m buffers
   (m = half the largest outlier fraction x tokens), from which the per-channel ranges of every outlier fraction follow.
2. forward + backward of the LM loss: the diagonal Fisher information (squared gradient) of every pre-RoPE key and
   value element, streamed straight into weighted histograms of the *normalised* values (count, F and F*s^2 weights),
   per layer, per tensor and per outlier fraction.

:func:`build_quantizer` then fits each layer's codebooks from those histograms with exact 1-D weighted k-means
(:mod:`kvquant.core.kmeans`) and applies Q-Norm. One statistics run serves every bit width and option.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .core.codebook import uniform_levels
from .core.codec import Codebook, LayerCodec, outlier_capacity, to_vectors, token_range
from .core.kmeans import WeightedHistogram, weighted_kmeans_1d
from .core.rope import RopeSpec, apply_rope, rope_specs, unapply_rope
from .models import model_identity
from .quantizer import Quantizer, QuantizerConfig

WEIGHTINGS = ("none", "f", "fs2")


class NonFiniteActivationError(RuntimeError):
    """NaN or inf found in the model's keys or values; quantizing them would silently produce garbage."""


def check_finite(t: torch.Tensor, what: str, layer: int) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteActivationError(
            f"non-finite {what} in layer {layer} (NaN or inf). The model overflows on this input/dtype: run it in "
            "float32 or bfloat16, or check the input text."
        )


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the cache argument of ``model.forward`` (transformers 5.24 renamed ``past_key_values`` to ``cache``)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class TapCache(DynamicCache):
    """A DynamicCache that lets a callback replace each layer's new keys/values before they are stored and used.

    ``fn(layer_idx, key_states, value_states, start) -> (key_states, value_states)`` with post-RoPE keys [B, H, T, D]
    and ``start`` the position of the first new token. Sliding-window layers keep transformers' own semantics.
    """

    def __init__(self, config, fn):
        super().__init__(config=config)
        self._fn = fn

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        start = self.get_seq_length(layer_idx) if layer_idx < len(self.layers) else 0
        if layer_idx < len(self.layers) and hasattr(self.layers[layer_idx], "cumulative_length"):
            start = self.layers[layer_idx].cumulative_length
        key_states, value_states = self._fn(layer_idx, key_states, value_states, start)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def positions(start: int, t: int, batch: int, device) -> torch.Tensor:
    return torch.arange(start, start + t, device=device).unsqueeze(0).expand(batch, t)


def rope_transpose(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the pre-RoPE key from the gradient w.r.t. the post-RoPE key (the rotation's transpose)."""
    return unapply_rope(g, cos, sin) * (cos * cos + sin * sin).unsqueeze(1)


@dataclass
class CalibrationSettings:
    """n_windows x window tokens of calibration text; statistics for the given outlier fractions; the first
    ``n_sinks`` tokens of each window are left out of all statistics; histograms with ``bins`` bins on [-1, 1]."""

    outlier_fractions: tuple[float, ...] = (0.0, 0.01)
    n_sinks: int = 1
    value_groups: tuple[str, ...] = ("token",)
    bins: int = 2048
    post_rope_keys: bool = True  # also collect post-RoPE key ranges (ablation / baselines)

    def __post_init__(self) -> None:
        for f in self.outlier_fractions:
            outlier_capacity(f, 64)


@dataclass
class LayerStats:
    """Streaming statistics of one layer."""

    hi: dict[str, torch.Tensor] = field(default_factory=dict)  # space -> [m, H*D] running top-m (descending)
    lo: dict[str, torch.Tensor] = field(default_factory=dict)  # space -> [m, H*D] running bottom-m (ascending)
    hist: dict[tuple, WeightedHistogram] = field(default_factory=dict)  # (tensor, variant, fraction, weighting)
    fits: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)  # memoised codebook fits


@dataclass
class CalibrationStats:
    """Everything :func:`build_quantizer` needs, for every layer."""

    settings: CalibrationSettings
    identity: dict
    n_tokens: int
    layers: list[LayerStats]
    fingerprint: str

    def key_range(self, layer: int, space: str, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (lo, hi) [H*D] excluding ``fraction`` of the tokens (half from each tail)."""
        m = math.ceil(fraction / 2 * self.n_tokens)
        st = self.layers[layer]
        return st.lo[space][m], st.hi[space][m]


def _merge_top(buf: torch.Tensor | None, x: torch.Tensor, m: int, largest: bool) -> torch.Tensor:
    cat = x if buf is None else torch.cat((buf, x), 0)
    return cat.topk(min(m, cat.shape[0]), dim=0, largest=largest, sorted=True).values


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B*T, H*D]."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b * t, h * d)


def fingerprint(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.cpu().numpy().astype("int64").tobytes()).hexdigest()[:16]


@torch.no_grad()
def _pass_ranges(model, windows, specs, settings, n_tokens, progress) -> list[LayerStats]:
    m = max(1, math.ceil(max(settings.outlier_fractions) / 2 * n_tokens) + 1)
    stats = [LayerStats() for _ in specs]
    s = settings.n_sinks

    def tap(i, k, v, start):
        check_finite(k, "keys", i)
        check_finite(v, "values", i)
        cos, sin = specs[i].cos_sin(positions(start, k.shape[2], k.shape[0], k.device))
        spaces = {"pre": unapply_rope(k.float(), cos, sin)}
        if settings.post_rope_keys:
            spaces["post"] = k.float()
        for name, x in spaces.items():
            x = _flat(x[:, :, max(0, s - start) :])
            stats[i].hi[name] = _merge_top(stats[i].hi.get(name), x, m, True)
            stats[i].lo[name] = _merge_top(stats[i].lo.get(name), x, m, False)
        return k, v

    kw = cache_kwarg(model)
    for w in tqdm(windows, desc="calibration 1/2: key ranges", disable=not progress):
        model(w[None].to(model.device), use_cache=True, **{kw: TapCache(model.config, tap)})
    return stats


def _pass_fisher(model, windows, specs, settings, stats: CalibrationStats, progress) -> None:
    s_sink = settings.n_sinks
    captured: dict[int, tuple] = {}

    def tap(i, k, v, start):
        kl = k.detach().float().requires_grad_(True)
        vl = v.detach().float().requires_grad_(True)
        captured[i] = (kl, vl, start)
        return kl.to(k.dtype), vl.to(v.dtype)

    kw = cache_kwarg(model)
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for w in tqdm(windows, desc="calibration 2/2: Fisher + histograms", disable=not progress):
            captured.clear()
            ids = w[None].to(model.device)
            out = model(ids, labels=ids, use_cache=True, **{kw: TapCache(model.config, tap)})
            if not torch.isfinite(out.loss):
                raise NonFiniteActivationError("the calibration loss is NaN/inf; run the model in float32.")
            out.loss.backward()
            with torch.no_grad():
                for i, (kl, vl, start) in captured.items():
                    _accumulate(i, kl, vl, start, specs[i], settings, stats, s_sink)
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)


def _add_weighted(st: LayerStats, key: tuple, xn: torch.Tensor, fisher: torch.Tensor, s2: torch.Tensor, bins: int):
    for wname, w in (("none", None), ("f", fisher), ("fs2", fisher * s2)):
        h = st.hist.setdefault(key + (wname,), WeightedHistogram.empty(bins))
        h.add(xn, w)


def _accumulate(i, kl, vl, start, spec: RopeSpec, settings, stats: CalibrationStats, s_sink: int) -> None:
    st = stats.layers[i]
    cos, sin = spec.cos_sin(positions(start, kl.shape[2], kl.shape[0], kl.device))
    k_pre = unapply_rope(kl.detach(), cos, sin)
    gk = rope_transpose(kl.grad, cos, sin)
    keep = slice(max(0, s_sink - start), None)
    fk = _flat((gk * gk)[:, :, keep])
    xk = _flat(k_pre[:, :, keep])
    for f in settings.outlier_fractions:
        lo, hi = stats.key_range(i, "pre", f)
        zero, scale = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-6)
        xn = (xk - zero) / scale
        inside = xn.abs() <= 1.0
        s2 = (scale * scale).expand_as(xn)
        _add_weighted(st, ("key", "channel", f), xn[inside], fk[inside], s2[inside], settings.bins)
    v = vl.detach()[:, :, keep]
    fv = (vl.grad * vl.grad)[:, :, keep]
    for group in settings.value_groups:
        vv, ff = to_vectors(v, group), to_vectors(fv, group)
        for f in settings.outlier_fractions:
            cap = outlier_capacity(f, vv.shape[-1])
            lo, hi, pos = token_range(vv, cap)
            zero, scale = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-5)
            # Same fp16 rounding of zero/scale as the stored format.
            zero, scale = zero.half().float(), scale.half().float()
            xn = (vv - zero) / scale
            mask = torch.ones_like(xn, dtype=torch.bool)
            if cap:
                mask.scatter_(-1, pos, False)
            s2 = (scale * scale).expand_as(xn)
            _add_weighted(st, ("value", group, f), xn[mask].clamp(-1, 1), ff[mask], s2[mask], settings.bins)


def collect_statistics(
    model: torch.nn.Module,
    windows: torch.Tensor,
    settings: CalibrationSettings | None = None,
    progress: bool = True,
) -> CalibrationStats:
    """Run both calibration passes over ``windows`` [N, T] (token ids) and return streamed statistics."""
    settings = settings or CalibrationSettings()
    if windows.ndim != 2 or windows.shape[1] <= settings.n_sinks + 1:
        raise ValueError(f"calibration windows must be [N, T] with T > n_sinks + 1, got {tuple(windows.shape)}.")
    specs = rope_specs(model)
    n_tokens = windows.shape[0] * (windows.shape[1] - settings.n_sinks)
    layer_stats = _pass_ranges(model, windows, specs, settings, n_tokens, progress)
    stats = CalibrationStats(settings, model_identity(model), n_tokens, layer_stats, fingerprint(windows))
    _pass_fisher(model, windows, specs, settings, stats, progress)
    for st in stats.layers:  # statistics were accumulated on the model's device: keep the result on the host
        for h in st.hist.values():
            h.cpu()
        st.hi = {k: v.cpu() for k, v in st.hi.items()}
        st.lo = {k: v.cpu() for k, v in st.lo.items()}
    return stats


def _hist_level_stats(hist: WeightedHistogram, levels: torch.Tensor):
    """Per-level (count, sum x, sum x^2) of the histogram's data assigned to the nearest level."""
    keep = hist.w > 0
    w, s, q = hist.w[keep], hist.wx[keep], hist.wx2[keep]
    lv = levels.double()
    idx = torch.bucketize(s / w, 0.5 * (lv[1:] + lv[:-1]))
    L = lv.numel()
    return (
        torch.bincount(idx, w, L),
        torch.bincount(idx, s, L),
        torch.bincount(idx, q, L),
    )


def fit_codebook(stats: CalibrationStats, layer: int, key: tuple, config: QuantizerConfig) -> Codebook:
    """Fit one codebook for histogram ``key`` (tensor, variant, fraction) of ``layer`` under ``config``."""
    from .core.codebook import qnorm_levels

    k = 2**config.bits
    st = stats.layers[layer]
    if config.nuq:
        memo_key = key + (config.fisher_weighting, k)
        if memo_key not in st.fits:  # many configurations share a fit (sinks, Q-Norm, windows)
            st.fits[memo_key] = weighted_kmeans_1d(st.hist[key + (config.fisher_weighting,)], k)
        levels = st.fits[memo_key]
    else:
        levels = uniform_levels(config.bits)
    decode = levels.clone()
    if config.qnorm:
        counts, sx, sx2 = _hist_level_stats(st.hist[key + ("none",)], levels)
        decode = qnorm_levels(levels, counts, sx, sx2).float()
    return Codebook(levels.float(), decode)


def build_quantizer(stats: CalibrationStats, config: QuantizerConfig, name: str | None = None) -> Quantizer:
    """Turn calibration statistics into a :class:`Quantizer` for ``config`` (any bits; a calibrated fraction)."""
    f = config.outlier_fraction
    if f not in stats.settings.outlier_fractions:
        raise ValueError(
            f"outlier fraction {f} was not calibrated (calibrated: {list(stats.settings.outlier_fractions)}). "
            "Add it to the calibration's outlier fractions."
        )
    if config.value_group not in stats.settings.value_groups:
        raise ValueError(f"value_group {config.value_group!r} was not calibrated ({stats.settings.value_groups}).")
    ident = stats.identity
    H, D = ident["num_key_value_heads"], ident["head_dim"]
    layers = []
    for i in range(len(stats.layers)):
        kz = ks = None
        if config.key_mode == "channel":
            space = "pre" if config.pre_rope else "post"
            if space not in stats.layers[i].lo:
                raise ValueError("post-RoPE key ranges were not collected (CalibrationSettings.post_rope_keys).")
            lo, hi = stats.key_range(i, space, f)
            kz = ((hi + lo) / 2).reshape(H, D).float()
            ks = ((hi - lo) / 2).clamp_min(1e-6).reshape(H, D).float()
        if config.key_mode == "channel" and config.pre_rope:
            key_cb = fit_codebook(stats, i, ("key", "channel", f), config)
        else:
            key_cb = Codebook.fixed(uniform_levels(config.bits))  # post-RoPE / per-token keys: ablation steps
            if config.nuq:
                raise ValueError("NUQ key codebooks are calibrated for pre-RoPE per-channel keys only.")
        value_cb = fit_codebook(stats, i, ("value", config.value_group, f), config)
        n_v = D if config.value_group == "head" else H * D
        layers.append(
            LayerCodec(
                key_cb,
                value_cb,
                heads=H,
                head_dim=D,
                key_mode=config.key_mode,
                key_zero=kz,
                key_scale=ks,
                key_capacity=outlier_capacity(f, D),
                value_capacity=outlier_capacity(f, n_v),
                value_group=config.value_group,
            )
        )
    meta = {
        "name": name or config.name,
        "data_fingerprint": stats.fingerprint,
        "calibration_tokens": stats.n_tokens,
        "calibration_sinks_excluded": stats.settings.n_sinks,
    }
    return Quantizer(config, ident, layers, meta)


def calibrate(model, windows, config: QuantizerConfig, settings: CalibrationSettings | None = None, progress=True):
    """One-call convenience: statistics + one quantizer."""
    settings = settings or CalibrationSettings(outlier_fractions=(config.outlier_fraction,), n_sinks=config.n_sinks)
    return build_quantizer(collect_statistics(model, windows, settings, progress), config)


__all__ = [
    "CalibrationSettings",
    "CalibrationStats",
    "NonFiniteActivationError",
    "TapCache",
    "apply_rope",
    "build_quantizer",
    "calibrate",
    "collect_statistics",
]


# ---- persistence of statistics (so the quick start calibrates once) -------------------------------------------
def save_statistics(stats: CalibrationStats, path) -> None:
    """Save statistics as safetensors + JSON (no pickle)."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, hist_keys = {}, []
    for i, st in enumerate(stats.layers):
        for space in st.hi:
            tensors[f"{i}.hi.{space}"] = st.hi[space].contiguous()
            tensors[f"{i}.lo.{space}"] = st.lo[space].contiguous()
        for j, (key, h) in enumerate(sorted(st.hist.items(), key=lambda kv: str(kv[0]))):
            tensors[f"{i}.hist.{j}"] = torch.stack((h.w, h.wx, h.wx2)).contiguous()
            if i == 0:
                hist_keys.append(list(key))
    doc = {"settings": asdict(stats.settings), "identity": stats.identity, "n_tokens": stats.n_tokens,
           "fingerprint": stats.fingerprint, "hist_keys": hist_keys, "num_layers": len(stats.layers)}
    save_file(tensors, str(path / "stats.safetensors"))
    (path / "stats.json").write_text(json.dumps(doc, indent=2))


def load_statistics(path) -> CalibrationStats:
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    doc = json.loads((path / "stats.json").read_text())
    t = load_file(str(path / "stats.safetensors"))
    s = doc["settings"]
    settings = CalibrationSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
    layers = []
    for i in range(doc["num_layers"]):
        st = LayerStats()
        for name in list(t):
            parts = name.split(".")
            if parts[0] == str(i) and parts[1] in ("hi", "lo"):
                getattr(st, parts[1])[parts[2]] = t[name]
        for j, key in enumerate(doc["hist_keys"]):
            w, wx, wx2 = t[f"{i}.hist.{j}"]
            st.hist[tuple(key)] = WeightedHistogram(w.clone(), wx.clone(), wx2.clone())
        layers.append(st)
    return CalibrationStats(settings, doc["identity"], doc["n_tokens"], layers, doc["fingerprint"])
