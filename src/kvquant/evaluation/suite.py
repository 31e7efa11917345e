"""The comparison suite: KVQuant configurations, baselines and the ablation, built from one calibration run."""

from __future__ import annotations

from dataclasses import replace

from ..calibration import CalibrationStats, build_quantizer
from ..quantizer import QuantizerConfig
from .methods import FP16, KIVI, KVQuantMethod, Method, Rotated, UniformPerToken


def kvquant_methods(
    stats: CalibrationStats,
    bits: tuple[int, ...] = (4, 3, 2),
    fractions: tuple[float, ...] = (0.0, 0.01),
    base: QuantizerConfig | None = None,
    extras: bool = True,
    fp16_layers=(),
) -> list[Method]:
    """KVQuant rows: every bit width x outlier fraction with the full method (sinks, Q-Norm per ``base``), plus, when
    ``extras``, the paper-vs-reference Fisher weighting and Q-Norm on/off comparisons at 1%. ``fp16_layers``: layers
    every row keeps unquantized (``KVQuantCache(sliding_layers="fp16")``'s sliding-window layers)."""
    base = base or QuantizerConfig()
    out: list[Method] = []

    def row(cfg: QuantizerConfig) -> Method:
        name = _label(cfg) + (" sliding fp16" if fp16_layers else "")
        return KVQuantMethod(build_quantizer(stats, cfg), name=name, fp16_layers=fp16_layers)

    for b in bits:
        for f in fractions:
            out.append(row(replace(base, bits=b, outlier_fraction=f)))
        if extras and 0.01 in fractions:
            for change in ({"fisher_weighting": "f"}, {"fisher_weighting": "none"}, {"qnorm": not base.qnorm}):
                out.append(row(replace(base, bits=b, outlier_fraction=0.01, **change)))
    return out


def _label(cfg: QuantizerConfig) -> str:
    parts = [cfg.name]
    if cfg.n_sinks:
        parts.append(f"sinks={cfg.n_sinks}")
    if cfg.qnorm:
        parts.append("Q-Norm")
    if cfg.fisher_weighting != "fs2":
        parts.append({"f": "F-only weights", "none": "unweighted"}[cfg.fisher_weighting])
    if cfg.recent_window:
        parts.append(f"window={cfg.recent_window}")
    if cfg.value_group != "token":
        parts.append(f"values per {cfg.value_group}")
    return " ".join(parts)


def baseline_methods(bits: tuple[int, ...] = (4, 3, 2), channels: int | None = None) -> list[Method]:
    """Baselines as users configure them. ``channels`` (= KV heads x head_dim) decides which group sizes divide."""
    out: list[Method] = []
    for b in bits:
        out.append(UniformPerToken(b))
        out.append(UniformPerToken(b, levels="nf"))
        for g in (64, 128):
            if channels is None or channels % g == 0:
                out.append(UniformPerToken(b, group=g))
        out.append(KIVI(b))
        out.append(Rotated(b, "uniform"))
        out.append(Rotated(b, "lloyd"))
    return out


def ablation_methods(stats: CalibrationStats, bits: int = 3, n_sinks: int = 1) -> list[Method]:
    """The paper's ablation, cumulative: per-token uniform -> per-channel keys -> pre-RoPE -> NUQ -> 1% outliers ->
    attention sinks -> Q-Norm."""
    steps = [
        ("1. int per-token (K and V)", dict(key_mode="token", pre_rope=False, nuq=False, outlier_fraction=0.0,
                                             n_sinks=0, qnorm=False)),
        ("2. + per-channel keys", dict(key_mode="channel", pre_rope=False)),
        ("3. + pre-RoPE keys", dict(pre_rope=True)),
        ("4. + NUQ (Fisher k-means)", dict(nuq=True)),
        ("5. + 1% outliers", dict(outlier_fraction=0.01)),
        (f"6. + {n_sinks} fp16 sink(s)", dict(n_sinks=n_sinks)),
        ("7. + Q-Norm", dict(qnorm=True)),
    ]
    cfg = QuantizerConfig(bits=bits)
    out: list[Method] = []
    for label, change in steps:
        cfg = replace(cfg, **change)
        out.append(KVQuantMethod(build_quantizer(stats, cfg), name=f"{label} [{bits}-bit]"))
    return out


def fp16_method() -> Method:
    return FP16()
