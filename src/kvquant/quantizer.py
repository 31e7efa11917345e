"""The quantizer artifact: configuration + per-layer codebooks and key ranges, saved as safetensors + JSON.

A quantizer is a folder with ``quantizer.json`` (config, model identity, data fingerprint, library version) and
``quantizer.safetensors`` (tensors). Loading validates everything (shapes, dtypes, finite values, sorted levels,
positive scales) and never unpickles anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .core.codec import Codebook, LayerCodec, outlier_capacity
from .core.packing import check_bits

FORMAT_VERSION = 1


class QuantizerError(ValueError):
    """A quantizer artifact is invalid or does not match the model it is used with."""


@dataclass
class QuantizerConfig:
    """How keys and values are quantized. Defaults are the full KVQuant method.

    bits: 2, 3 or 4 bits per element for the dense codes.
    outlier_fraction: share of each vector kept exactly in fp16 (0.01 = "1%"); stored in fixed-capacity slots of
        ``max(1, round(fraction * n))`` per vector of n elements.
    n_sinks: the first N tokens of every sequence stay in fp16 and are excluded from calibration statistics.
    recent_window: the most recent R tokens stay in fp16 in the cache (0 = the paper's setting).
    nuq: non-uniform (Fisher-weighted k-means) codebook; False = uniform levels.
    fisher_weighting: "fs2" (the paper: F * scale^2), "f" (the reference code: F only) or "none".
    qnorm: apply Q-Norm (mean/std correction of the decode levels).
    key_mode: "channel" (offline per-channel ranges) or "token" (online per-token ranges).
    pre_rope: quantize keys before RoPE (True) or after.
    value_group: per-token value ranges over each "head" or the whole "token" (all KV heads).
    """

    bits: int = 3
    outlier_fraction: float = 0.01
    n_sinks: int = 1
    recent_window: int = 0
    nuq: bool = True
    fisher_weighting: str = "fs2"
    qnorm: bool = False
    key_mode: str = "channel"
    pre_rope: bool = True
    value_group: str = "token"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        outlier_capacity(self.outlier_fraction, 64)
        if self.n_sinks < 0 or self.recent_window < 0:
            raise ValueError("n_sinks and recent_window must be >= 0.")
        if self.fisher_weighting not in ("fs2", "f", "none"):
            raise ValueError(f"fisher_weighting must be 'fs2', 'f' or 'none', got {self.fisher_weighting!r}.")
        if self.key_mode not in ("channel", "token"):
            raise ValueError(f"key_mode must be 'channel' or 'token', got {self.key_mode!r}.")
        if self.value_group not in ("head", "token"):
            raise ValueError(f"value_group must be 'head' or 'token', got {self.value_group!r}.")

    @property
    def name(self) -> str:
        pct = f"{self.outlier_fraction * 100:g}pct"
        return f"nuq{self.bits}-{pct}" if self.nuq else f"int{self.bits}-{pct}"

    @classmethod
    def from_dict(cls, d: dict) -> QuantizerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise QuantizerError(f"unknown quantizer config fields {sorted(unknown)}; was it made by a newer kvquant?")
        return cls(**d)


def identity_matches(a: dict, b: dict) -> list[str]:
    """Names of the shape-defining fields in which two model identities differ."""
    keys = ("model_type", "num_hidden_layers", "num_key_value_heads", "head_dim")
    return [k for k in keys if a.get(k) != b.get(k)]


@dataclass
class Quantizer:
    """A calibrated KVQuant quantizer: one :class:`LayerCodec` per decoder layer."""

    config: QuantizerConfig
    identity: dict
    layers: list[LayerCodec]
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.meta.get("name", self.config.name)

    def check_model(self, identity: dict) -> None:
        """Refuse a model whose shapes differ from the calibrated one."""
        diff = identity_matches(self.identity, identity)
        if diff:
            detail = ", ".join(f"{k}: quantizer {self.identity.get(k)!r} vs model {identity.get(k)!r}" for k in diff)
            raise QuantizerError(
                f"quantizer {self.name!r} was calibrated for {self.identity.get('name_or_path')!r} and does not match "
                f"this model ({detail}). Calibrate one for this model with `kvquant calibrate --model ...`."
            )

    # ---- persistence -------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for i, lc in enumerate(self.layers):
            tensors[f"layers.{i}.key_levels"] = lc.key_cb.levels.float().contiguous()
            tensors[f"layers.{i}.key_decode_levels"] = lc.key_cb.decode_levels.float().contiguous()
            tensors[f"layers.{i}.value_levels"] = lc.value_cb.levels.float().contiguous()
            tensors[f"layers.{i}.value_decode_levels"] = lc.value_cb.decode_levels.float().contiguous()
            if lc.key_mode == "channel":
                tensors[f"layers.{i}.key_zero"] = lc.key_zero.float().contiguous()
                tensors[f"layers.{i}.key_scale"] = lc.key_scale.float().contiguous()
        from . import __version__

        doc = {
            "format": "kvquant-quantizer",
            "format_version": FORMAT_VERSION,
            "kvquant_version": __version__,
            "config": asdict(self.config),
            "identity": self.identity,
            "num_layers": len(self.layers),
            "meta": self.meta,
        }
        save_file(tensors, str(path / "quantizer.safetensors"))
        (path / "quantizer.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return path


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise QuantizerError(msg)


def default_quantizer_dir() -> Path:
    root = os.environ.get("KVQUANT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvquant")
    return Path(root) / "quantizers"


def resolve_quantizer_path(name_or_path: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.is_dir():
        return p
    cand = default_quantizer_dir() / str(name_or_path)
    if cand.is_dir():
        return cand
    raise FileNotFoundError(
        f"no quantizer at {str(name_or_path)!r} (looked for a folder there and in {default_quantizer_dir()}). "
        "Create one with `kvquant calibrate --out PATH`, or pass the folder that holds quantizer.json."
    )


def load_quantizer(name_or_path: str | os.PathLike) -> Quantizer:
    """Load and validate a quantizer folder (or a name under the default quantizer directory)."""
    path = resolve_quantizer_path(name_or_path)
    jf, tf = path / "quantizer.json", path / "quantizer.safetensors"
    _require(jf.is_file() and tf.is_file(), f"{path} must contain quantizer.json and quantizer.safetensors.")
    try:
        doc = json.loads(jf.read_text())
    except json.JSONDecodeError as e:
        raise QuantizerError(f"{jf} is not valid JSON: {e}") from e
    _require(doc.get("format") == "kvquant-quantizer", f"{jf} is not a kvquant quantizer (format field missing).")
    _require(
        doc.get("format_version") == FORMAT_VERSION,
        f"{jf} has format_version {doc.get('format_version')}, this kvquant reads {FORMAT_VERSION}.",
    )
    try:
        config = QuantizerConfig.from_dict(doc["config"])
    except (TypeError, ValueError) as e:
        raise QuantizerError(f"{jf}: invalid config: {e}") from e
    ident = doc.get("identity") or {}
    n_layers = doc.get("num_layers")
    heads, d = ident.get("num_key_value_heads"), ident.get("head_dim")
    _require(
        isinstance(n_layers, int) and n_layers == ident.get("num_hidden_layers") and heads and d,
        f"{jf}: identity must give num_hidden_layers (= num_layers), num_key_value_heads and head_dim.",
    )
    try:
        tensors = load_file(str(tf))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise QuantizerError(f"{tf} is not a readable safetensors file: {e}") from e
    L = 2**config.bits
    layers = []
    for i in range(n_layers):
        def get(name: str, shape: tuple[int, ...], i: int = i) -> torch.Tensor:
            key = f"layers.{i}.{name}"
            _require(key in tensors, f"{tf}: missing tensor {key}.")
            t = tensors[key]
            _require(t.dtype == torch.float32, f"{tf}: {key} must be float32, is {t.dtype}.")
            _require(tuple(t.shape) == shape, f"{tf}: {key} has shape {tuple(t.shape)}, expected {shape}.")
            _require(bool(torch.isfinite(t).all()), f"{tf}: {key} contains NaN or inf.")
            return t

        kl, kd = get("key_levels", (L,)), get("key_decode_levels", (L,))
        vl, vd = get("value_levels", (L,)), get("value_decode_levels", (L,))
        for name, lv in (("key_levels", kl), ("value_levels", vl)):
            _require(bool((lv[1:] >= lv[:-1]).all()), f"{tf}: layers.{i}.{name} must be sorted ascending.")
        kz = ks = None
        if config.key_mode == "channel":
            kz, ks = get("key_zero", (heads, d)), get("key_scale", (heads, d))
            _require(bool((ks > 0).all()), f"{tf}: layers.{i}.key_scale must be positive.")
        layers.append(
            LayerCodec(
                Codebook(kl, kd),
                Codebook(vl, vd),
                heads=heads,
                head_dim=d,
                key_mode=config.key_mode,
                key_zero=kz,
                key_scale=ks,
                key_capacity=outlier_capacity(config.outlier_fraction, d),
                value_capacity=outlier_capacity(
                    config.outlier_fraction, d if config.value_group == "head" else heads * d
                ),
                value_group=config.value_group,
            )
        )
    return Quantizer(config, ident, layers, doc.get("meta") or {})
