"""Passkey retrieval and needle-in-a-haystack through real generation with the compressed cache (``kvquant passkey``).

Prompts
    ``PREAMBLE + haystack[:i] + needle + haystack[i:] + question``, built at the token level so every prompt has
    exactly ``context`` tokens (the trials of one (context, depth) cell form one batch without padding). The haystack
    is real prose (Jane Austen's novels, else the default corpus: :func:`kvquant.data.haystack_text`); trials differ by
    the key and by the haystack offset. The needle goes at ``depth`` x the haystack length, moved to the nearest
    sentence start within ``SNAP`` tokens (so it does not cut a word).

    * ``passkey``: "The pass key is 73915. Remember it. 73915 is the pass key." ... "What is the pass key? The pass
      key is" (5 digits).
    * ``needle``: "The special magic number for Lisbon is 4827391." ... "What is the special magic number for Lisbon?
      The special magic number for Lisbon is" (7 digits).

    Success: the key's digits appear in the greedily generated continuation (``n_digits + 3`` new tokens). A
    "context" of C tokens means prompt + generated tokens = C (the prompt has ``C - n_digits - 3`` tokens), so C can
    be the model's maximum.

Caches compared (``METHODS``)
    * ``fp16``: transformers' ``DynamicCache`` (the model's dtype: fp32 on CPU, bf16 on GPU by default).
    * ``nuqB`` / ``nuqB-r128`` (B = 4, 3, 2): :class:`~kvquant.cache.KVQuantCache` with a quantizer of 1% outliers
      and 1 fp16 sink, without / with a 128-token fp16 recent window: the real packed cache.
    * ``kivi2``, ``kivi4``, ``int4``: :class:`SimulatedQuantizedCache`, a ``DynamicCache`` whose stored keys/values
      are replaced, once they leave the method's fp16 window, by what the simulated baseline methods
      (:mod:`kvquant.evaluation.methods`) encode and decode (fake-quantized storage; same numbers as a real cache of
      that format, no memory saving). KIVI: groups of 32 tokens (keys per channel, values per token) are quantized
      once complete and older than the 128-token residual window; int4: every token at once, per token over all KV
      heads.

    Prompts are prefilled in chunks (``prefill_chunk`` tokens) then ``model.generate`` continues from the filled
    cache; caches with an fp16 window use the band attention of :mod:`kvquant.cache.attention` in multi-token steps,
    so each query sees exactly what token-by-token decoding would show it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from transformers import DynamicCache

from ..cache import KVQuantCache
from ..cache import attention as kv_attention
from ..calibration import cache_kwarg
from ..core.rope import rope_specs
from .methods import KIVI, Method, UniformPerToken

TASKS = ("passkey", "needle")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
CONTEXTS = (1024, 2048, 4096, 8192)
SNAP = 32  # the needle moves to a sentence start at most this many tokens away

PREAMBLE = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
            "memorize it. I will quiz you about the important information there.\n\n")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"
NEEDLE_NEEDLE = " The special magic number for {city} is {key}."
NEEDLE_QUESTION = "\n\nWhat is the special magic number for {city}? The special magic number for {city} is"
CITIES = ("Lisbon", "Chicago", "Nairobi", "Oslo", "Lima", "Seoul", "Cairo", "Dublin", "Madrid", "Toronto", "Sydney",
          "Vienna", "Prague", "Havana", "Manila", "Bogota", "Athens", "Warsaw", "Denver", "Boston", "Mumbai", "Tokyo",
          "Berlin", "Helsinki", "Santiago")
KEY_DIGITS = {"passkey": 5, "needle": 7}


# ---- haystack -----------------------------------------------------------------------------------------------------
def normalize_prose(text: str) -> str:
    """Join hard-wrapped lines into paragraphs and collapse runs of spaces (Gutenberg texts wrap at ~70 chars)."""
    text = re.sub(r"(?<!\n)\n(?!\n)", " ", text.replace("\r\n", "\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return re.sub(r"[ \t]+", " ", text)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Haystack:
    """Token ids of a long prose text and the positions where a sentence starts (after '.', '!' or '?')."""

    ids: torch.Tensor  # [N] long
    starts: np.ndarray  # sorted sentence-start positions
    source: str = ""

    def __len__(self) -> int:
        return int(self.ids.numel())

    def nearest_start(self, pos: int, lo: int, hi: int, snap: int = SNAP) -> int:
        """The sentence start in [lo, hi] nearest to ``pos`` if within ``snap`` tokens (``lo``/``hi`` count as
        starts), else ``pos``."""
        cands = [lo, hi]
        i = int(np.searchsorted(self.starts, pos))
        for j in (i - 1, i):
            if 0 <= j < len(self.starts) and lo <= self.starts[j] <= hi:
                cands.append(int(self.starts[j]))
        best = min(cands, key=lambda c: abs(c - pos))
        return best if abs(best - pos) <= snap else pos


def make_haystack(tokenizer, text: str | None = None, min_tokens: int = 16384, max_chars: int | None = None
                  ) -> Haystack:
    """Tokenize the haystack text (default: :func:`kvquant.data.haystack_text`, Austen or the default corpus)."""
    source = "given text"
    if text is None:
        from ..data import haystack_text

        text = haystack_text(min_tokens, tokenizer)
        source = ("Jane Austen's novels" if "by Jane Austen" in text[:1000]
                  else "the default corpus (evaluation split)")
    text = normalize_prose(text)
    if max_chars:
        text = text[:max_chars]
    ids = _encode(tokenizer, text)
    if len(ids) < min_tokens:
        raise ValueError(f"the haystack text has {len(ids)} tokens, {min_tokens} are needed.")
    uniq = sorted(set(ids))
    pieces = tokenizer.batch_decode([[u] for u in uniq]) if hasattr(tokenizer, "batch_decode") else [
        tokenizer.decode([u]) for u in uniq]
    ends = {u for u, p in zip(uniq, pieces) if p.rstrip().endswith((".", "!", "?", '."', '!"', '?"'))}
    arr = np.asarray(ids)
    starts = np.flatnonzero(np.isin(arr, list(ends))) + 1
    return Haystack(torch.tensor(ids, dtype=torch.long), starts, source)


# ---- prompts ------------------------------------------------------------------------------------------------------
@dataclass
class Prompt:
    input_ids: torch.Tensor  # [context] long
    answer: str  # the key's digits
    task: str
    depth: float  # the asked depth fraction
    needle_start: int  # token index where the needle begins
    needle_tokens: int
    haystack_start: int  # token index of the first haystack token (after the preamble)
    haystack_tokens: int
    offset: int  # where in the haystack text this prompt's haystack begins

    @property
    def actual_depth(self) -> float:
        """Where the needle really sits, as a fraction of the haystack (0: right after the preamble, 1: right before
        the question)."""
        return (self.needle_start - self.haystack_start) / max(1, self.haystack_tokens)


def build_prompt(hay: Haystack, tokenizer, task: str, context: int, depth: float, key: str, offset: int,
                 city: str = "Lisbon", snap: int = SNAP) -> Prompt:
    """One prompt of exactly ``context`` tokens with the needle at ``depth`` of the haystack."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}.")
    if task == "passkey":
        needle, question = PASSKEY_NEEDLE.format(key=key), PASSKEY_QUESTION
    else:
        needle, question = NEEDLE_NEEDLE.format(city=city, key=key), NEEDLE_QUESTION.format(city=city)
    pre, nd, qu = _encode(tokenizer, PREAMBLE), _encode(tokenizer, needle), _encode(tokenizer, question)
    n_hay = context - len(pre) - len(nd) - len(qu)
    if n_hay < 1:
        raise ValueError(f"context {context} is too short for the {task} prompt ({context - n_hay} fixed tokens).")
    if offset < 0 or offset + n_hay > len(hay):
        raise ValueError(f"haystack offset {offset} + {n_hay} tokens is outside the haystack ({len(hay)} tokens).")
    cut = hay.nearest_start(offset + round(depth * n_hay), offset, offset + n_hay, snap) - offset
    body = hay.ids[offset : offset + n_hay]
    ids = torch.cat((torch.tensor(pre), body[:cut], torch.tensor(nd), body[cut:], torch.tensor(qu))).long()
    assert ids.numel() == context
    return Prompt(ids, key, task, depth, len(pre) + cut, len(nd), len(pre), n_hay, offset)


def make_trials(hay: Haystack, tokenizer, task: str, context: int, depth: float, trials: int, seed: int = 0
                ) -> list[Prompt]:
    """``trials`` prompts of one (task, context, depth) cell: distinct random keys (and cities for the needle task),
    haystack offsets spread over the text (each snapped to a sentence start)."""
    rng = np.random.default_rng([seed, TASKS.index(task), context, round(depth * 1000)])
    digits = KEY_DIGITS[task]
    keys = rng.choice(9 * 10 ** (digits - 1), size=trials, replace=False) + 10 ** (digits - 1)
    room = len(hay) - context - 1
    if room < 0:
        raise ValueError(f"the haystack ({len(hay)} tokens) is shorter than the context {context}.")
    base = rng.integers(0, max(1, room // max(1, trials)) + 1)
    out = []
    for i in range(trials):
        off = int(min(room, base + i * room // max(1, trials)))
        j = int(np.searchsorted(hay.starts, off))
        if j < len(hay.starts) and hay.starts[j] <= min(room, off + 256):
            off = int(hay.starts[j])
        city = CITIES[int(rng.integers(len(CITIES)))]
        out.append(build_prompt(hay, tokenizer, task, context, depth, str(int(keys[i])), off, city))
    return out


# ---- the baseline cache -------------------------------------------------------------------------------------------
class SimulatedQuantizedCache(DynamicCache):
    """A ``DynamicCache`` whose stored keys/values are fake-quantized by a simulated baseline ``method``.

    Tokens stay in full precision while they are among the ``recent_window`` most recent ones; then they are replaced
    (once, in place) by ``method.fake(...)`` of their block, in blocks of ``group`` tokens (a block is quantized when it
    is complete and out of the window; ``group=1``: token by token). ``method`` must quantize every token it is given
    (no window of its own). Multi-token steps use the ``"kvquant"`` band attention so that each query sees its
    ``recent_window`` most recent keys/values unquantized, as in token-by-token decoding. Full-attention layers only.

    This is a simulation of the storage (what attention reads is exactly what such a cache would decode, but nothing is
    kept packed); the KVQuant rows use the real packed :class:`~kvquant.cache.KVQuantCache`.
    """

    def __init__(self, model, method: Method, recent_window: int = 0, group: int = 1):
        super().__init__(config=model.config)
        if any(getattr(layer, "is_sliding", False) for layer in self.layers):
            raise NotImplementedError("SimulatedQuantizedCache supports full-attention layers only.")
        self.method, self.recent_window, self.group = method, int(recent_window), max(1, int(group))
        self.specs = rope_specs(model)
        self.n_quantized: dict[int, int] = {}
        kv_attention.register()
        if getattr(model.config, "_attn_implementation", None) != kv_attention.ATTENTION_NAME:
            model.set_attn_implementation(kv_attention.ATTENTION_NAME)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        n, t = keys.shape[2], key_states.shape[2]
        R, g = self.recent_window, self.group
        band = R > 0 and t > 1
        if band:
            k_fp, v_fp = keys.clone(), values.clone()
        nq = self.n_quantized.get(layer_idx, 0)
        target = max(0, (n - R) // g * g)
        if target > nq:
            kh, vh = self.method.fake(layer_idx, keys[:, :, nq:target], values[:, :, nq:target], nq,
                                      self.specs[layer_idx])
            keys[:, :, nq:target] = kh
            values[:, :, nq:target] = vh
            self.n_quantized[layer_idx] = target
        kv_attention.set_pending(layer_idx, ("band", k_fp, v_fp, R) if band else None)
        return keys, values


# ---- methods ------------------------------------------------------------------------------------------------------
@dataclass
class CacheMethod:
    """One compared cache: ``make(model)`` returns a fresh cache for one generate call."""

    key: str
    label: str
    family: str
    bits: int | None
    outlier_fraction: float
    recent_window: int
    make: Callable[[Any], Any] = field(repr=False)
    notes: str = ""


METHODS = ("fp16", "nuq4", "nuq3", "nuq2", "nuq4-r128", "nuq3-r128", "nuq2-r128", "kivi2", "kivi4", "int4")


def kvquant_bits(method_keys) -> list[int]:
    """Bit widths of the KVQuant quantizers the given method keys need."""
    return sorted({int(k[3]) for k in method_keys if k.startswith("nuq")}, reverse=True)


def make_methods(method_keys, quantizers: dict[int, Any] | None = None, window: int = 128,
                 prefill: str = "exact") -> list[CacheMethod]:
    """:class:`CacheMethod` objects for ``method_keys`` (see ``METHODS``); ``quantizers`` maps bits -> Quantizer;
    ``prefill``: :class:`KVQuantCache`'s prefill mode."""
    out = []
    for key in method_keys:
        if key == "fp16":
            out.append(CacheMethod(key, "fp16", "fp16", 16, 0.0, 0, lambda m: DynamicCache(config=m.config),
                                   "DynamicCache in the model's dtype"))
        elif re.fullmatch(r"nuq[234](-r\d+)?", key):
            bits = int(key[3])
            R = int(key.split("-r")[1]) if "-r" in key else 0
            if not quantizers or bits not in quantizers:
                raise ValueError(f"method {key!r} needs a {bits}-bit quantizer.")
            q = quantizers[bits]
            label = f"nuq{bits}-{q.config.outlier_fraction * 100:g}%" + (f" R{R}" if R else "")
            out.append(CacheMethod(key, label, "kvquant", bits, q.config.outlier_fraction, R,
                                   lambda m, q=q, R=R: KVQuantCache(q, m, recent_window=R, prefill=prefill),
                                   f"KVQuantCache (packed), {q.config.n_sinks} sink(s)"))
        elif re.fullmatch(r"kivi[24]", key):
            bits = int(key[4])
            out.append(CacheMethod(key, f"KIVI-{bits}", "baseline", bits, 0.0, window,
                                   lambda m, b=bits: SimulatedQuantizedCache(m, KIVI(b, group=32, residual=0),
                                                                             recent_window=window, group=32),
                                   "simulated in cache: g32, residual 128"))
        elif re.fullmatch(r"int[234]", key):
            bits = int(key[3])
            out.append(CacheMethod(key, f"int{bits}", "baseline", bits, 0.0, 0,
                                   lambda m, b=bits: SimulatedQuantizedCache(m, UniformPerToken(b)),
                                   "simulated in cache: per token over all KV heads"))
        else:
            raise ValueError(f"unknown method {key!r}; known: {', '.join(METHODS)}.")
    return out


# ---- generation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_batch(model, input_ids: torch.Tensor, cache, max_new_tokens: int, prefill_chunk: int = 1024,
                   pad_token_id: int | None = None) -> torch.Tensor:
    """Greedy continuation of ``input_ids`` [B, T] (no padding) with ``cache``: the first T - 1 tokens are prefilled in
    chunks of ``prefill_chunk``, then ``model.generate`` (greedy) continues from the filled cache. Returns the new
    tokens [B, max_new_tokens] (fewer if every row stopped at EOS)."""
    kw = cache_kwarg(model)
    T = input_ids.shape[1]
    for s in range(0, T - 1, prefill_chunk):
        e = min(T - 1, s + prefill_chunk)
        model(input_ids[:, s:e], use_cache=True, logits_to_keep=1, **{kw: cache})
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id, **{kw: cache})
    return out[:, T:]


def _digits_found(text: str, answer: str) -> bool:
    """The key's digits appear in the generated text (whitespace between digits ignored)."""
    return answer in re.sub(r"\s", "", text)


def run_passkey(
    model,
    tokenizer,
    methods: list[CacheMethod],
    contexts=CONTEXTS,
    depths=DEPTHS,
    trials_per_depth: int = 10,
    tasks=("passkey",),
    batch_size: int = 25,
    haystack: Haystack | None = None,
    seed: int = 0,
    prefill_chunk: int = 1024,
    progress: Callable[[str], None] | None = print,
    keep_outputs: bool = False,
    on_context: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Accuracy of every method on every (task, context, depth) cell of ``trials_per_depth`` prompts (generated in
    batches of ``batch_size``); one row per cell.

    ``context`` counts the prompt and the generated tokens (``n_digits + 3``): a context of 8192 fits SmolLM2's
    8192 positions, with prompts of exactly ``context - new_tokens`` tokens.

    ``on_context(rows)`` is called after each (task, context) with all rows so far (partial reports).

    Rows: task, method (label), key, family, bits, outlier_fraction, recent_window, context, prompt_tokens,
    new_tokens, depth, trials, correct, accuracy, mean_actual_depth, seconds (+ outputs with ``keep_outputs``)."""
    contexts = sorted(int(c) for c in contexts)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    hay = haystack or make_haystack(tokenizer, min_tokens=2 * max(contexts) + 4096)
    kv_attention.register()  # every method runs through the same attention function (SDPA without a note)
    if getattr(model.config, "_attn_implementation", None) != kv_attention.ATTENTION_NAME:
        model.set_attn_implementation(kv_attention.ATTENTION_NAME)
    device = next(model.parameters()).device
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    rows = []
    for task in tasks:
        digits = KEY_DIGITS[task]
        new = digits + 3
        for ctx in contexts:
            if limit and ctx > limit:
                raise ValueError(f"context {ctx} is past the model's limit of {limit} tokens.")
            cells = {d: make_trials(hay, tokenizer, task, ctx - new, d, trials_per_depth, seed) for d in depths}
            for m in methods:
                for d, prompts in cells.items():
                    t0 = time.perf_counter()
                    correct, outputs = 0, []
                    for b in range(0, len(prompts), batch_size):
                        chunk = prompts[b : b + batch_size]
                        ids = torch.stack([p.input_ids for p in chunk]).to(device)
                        gen = generate_batch(model, ids, m.make(model), new, prefill_chunk, pad)
                        texts = tokenizer.batch_decode(gen.tolist(), skip_special_tokens=True)
                        for p, txt in zip(chunk, texts):
                            correct += _digits_found(txt, p.answer)
                            outputs.append(txt)
                    secs = time.perf_counter() - t0
                    row = {"task": task, "method": m.label, "key": m.key, "family": m.family, "bits": m.bits,
                           "outlier_fraction": m.outlier_fraction, "recent_window": m.recent_window, "context": ctx,
                           "prompt_tokens": ctx - new, "new_tokens": new, "depth": d, "trials": len(prompts),
                           "correct": correct,
                           "accuracy": correct / max(1, len(prompts)),
                           "mean_actual_depth": round(float(np.mean([p.actual_depth for p in prompts])), 4),
                           "seconds": round(secs, 3)}
                    if keep_outputs:
                        row["outputs"] = outputs
                    rows.append(row)
                    if progress:
                        progress(f"[passkey] {task} {m.label:>14} ctx {ctx:>5} depth {d:.2f}: "
                                 f"{correct}/{len(prompts)} ({secs:.1f} s)")
            if on_context:
                on_context(rows)
    return rows


# ---- quantizers ---------------------------------------------------------------------------------------------------
def passkey_quantizers(model, tokenizer, bits, calib_windows: int = 16, calib_window: int = 2048,
                       text: str = "default", seed: int = 0, n_sinks: int = 1, outlier_fraction: float = 0.01,
                       stats_dir=None, model_name: str = "smollm2-135m", progress: bool = True) -> dict[int, Any]:
    """Quantizers (bits -> Quantizer) from calibration statistics on the calibration split of ``text``: loaded from
    ``stats_dir`` (default ``~/.cache/kvquant/stats/<model>-calib<N>x<W>-seed<S>``) if present, else collected and
    saved there."""
    from pathlib import Path

    from .. import calibration as calib
    from ..data import load_text_source, make_windows, split_documents
    from ..quantizer import QuantizerConfig, default_quantizer_dir

    if stats_dir is None:
        stats_dir = (default_quantizer_dir().parent / "stats"
                     / f"{Path(model_name).name}-calib{calib_windows}x{calib_window}-seed{seed}-sinks{n_sinks}")
    stats_dir = Path(stats_dir)
    if (stats_dir / "stats.json").is_file():
        stats = calib.load_statistics(stats_dir)
    else:
        docs = load_text_source(text)
        cal = [docs[0][: len(docs[0]) // 2]] if len(docs) == 1 else split_documents(docs, seed=seed)[0]
        windows = make_windows(tokenizer, cal, calib_window, calib_windows, seed=seed)
        settings = calib.CalibrationSettings(outlier_fractions=(0.0, outlier_fraction) if outlier_fraction else (0.0,),
                                       n_sinks=n_sinks)
        stats = calib.collect_statistics(model, windows, settings, progress=progress)
        calib.save_statistics(stats, stats_dir)
    return {b: calib.build_quantizer(stats, QuantizerConfig(bits=b, outlier_fraction=outlier_fraction, n_sinks=n_sinks))
            for b in bits}


__all__ = [
    "CONTEXTS",
    "DEPTHS",
    "METHODS",
    "TASKS",
    "CacheMethod",
    "cli_main",
    "Haystack",
    "Prompt",
    "SimulatedQuantizedCache",
    "build_prompt",
    "generate_batch",
    "kvquant_bits",
    "make_haystack",
    "make_methods",
    "make_trials",
    "passkey_quantizers",
    "run_passkey",
    "summarize",
    "write_report",
]


# ---- the command line (``kvquant passkey``) ------------------------------------------------------------------------
def cli_main(args) -> int:
    """``kvquant passkey``: load the model, calibrate (cached) the KVQuant quantizers, run, write the report."""
    import platform
    import sys
    from datetime import datetime, timezone
    from pathlib import Path

    import transformers

    from .. import __version__
    from ..models import load_model

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    keys = list(METHODS) if args.methods in (None, [], ["all"]) else list(args.methods)
    tasks = TASKS if args.task == "both" else (args.task,)
    depths = [float(d) for d in args.depths]
    per_depth = max(1, -(-args.trials // len(depths)))
    dtype = {"auto": torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model, tok = load_model(args.model, dtype=torch.float32, device=args.device)
    t0 = time.perf_counter()
    bits = kvquant_bits(keys)
    quantizers = passkey_quantizers(model, tok, bits, args.calib_windows, args.calib_window, args.text, args.seed,
                                    stats_dir=args.stats_dir, model_name=args.model) if bits else {}
    t_calib = time.perf_counter() - t0
    model.to(dtype)
    hay = make_haystack(tok, min_tokens=2 * max(args.contexts) + 4096)
    print(f"[passkey] haystack: {hay.source}, {len(hay)} tokens; {len(keys)} methods x {len(args.contexts)} contexts "
          f"x {len(depths)} depths x {per_depth} trials x {len(tasks)} task(s); model dtype {dtype}")
    dev = torch.cuda.get_device_name(0) if str(args.device).startswith("cuda") else "cpu"
    prog = Path(sys.argv[0]).name if sys.argv else "kvquant"
    cmd = ("kvquant " + " ".join(sys.argv[1:])) if prog in ("kvquant", "cli.py", "__main__.py") else (
        "python " + " ".join(sys.argv))
    meta = {
        "title": f"Passkey retrieval / needle-in-a-haystack with real generation: {args.model}",
        "command": cmd,
        "machine": f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} threads)".strip(),
        "device": dev,
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, transformers "
                    f"{transformers.__version__}, kvquant {__version__}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": f"{args.model} ({dtype})",
        "haystack": f"{hay.source} ({len(hay)} tokens)",
        "calibration": f"{args.calib_windows} x {args.calib_window} tokens of {args.text!r} (calibration split), "
                       f"{t_calib:.1f} s (about 0 if statistics were cached)" if bits else "none",
        "settings": f"contexts {list(args.contexts)} (prompt + new tokens), depths {depths}, {per_depth} trials per "
                    f"depth ({per_depth * len(depths)} per context), batch {args.batch_size}, prefill chunk "
                    f"{args.prefill_chunk}, greedy; KVQuantCache prefill={getattr(args, 'prefill', 'exact')!r}",
    }
    t0 = time.perf_counter()

    def partial(rows):
        write_report(rows, args.out, {**meta, "status": f"partial ({time.perf_counter() - t0:.0f} s so far)"})

    methods = make_methods(keys, quantizers, prefill=getattr(args, "prefill", "exact"))
    rows = run_passkey(model, tok, methods, args.contexts, depths, per_depth, tasks,
                       args.batch_size, hay, args.seed, args.prefill_chunk, on_context=partial)
    t_run = time.perf_counter() - t0
    meta["timing"] = f"run {t_run:.1f} s, total {time.perf_counter() - t_start:.1f} s (model load and calibration " \
                     "included)"
    paths = write_report(rows, args.out, meta)
    print(markdown_report(rows, meta).split("### ")[0])
    print(f"[passkey] wrote {', '.join(str(p) for p in paths)}")
    return 0


# ---- reports ------------------------------------------------------------------------------------------------------
def summarize(rows: list[dict], task: str, ref: str = "fp16", target: str = "nuq3-1%", fp16_min: float = 0.9,
              margin: float = 0.05) -> dict:
    """Per-context accuracy (over all depths) of ``ref`` and ``target`` and the longest context where ``ref`` >= 90%
    and ``target`` is within 5 points of it (None if no context qualifies)."""
    def acc(method, ctx):
        rs = [r for r in rows if r["task"] == task and r["method"] == method and r["context"] == ctx]
        n = sum(r["trials"] for r in rs)
        return sum(r["correct"] for r in rs) / n if n else None

    contexts = sorted({r["context"] for r in rows if r["task"] == task})
    per = []
    for c in contexts:
        a, b = acc(ref, c), acc(target, c)
        ok = a is not None and b is not None and a >= fp16_min and b >= a - margin - 1e-9
        per.append({"context": c, ref: a, target: b, "fp16_ok": a is not None and a >= fp16_min, "pass": ok})
    eligible = [p for p in per if p["fp16_ok"]]
    longest = max((p["context"] for p in eligible if p["pass"]), default=None)
    return {"task": task, "per_context": per, "longest": longest,
            "all_eligible_pass": bool(eligible) and all(p["pass"] for p in eligible)}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def markdown_report(rows: list[dict], meta: dict) -> str:
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    lines = [f"# {meta.get('title', 'Passkey retrieval / needle-in-a-haystack with real generation')}", ""]
    for k in ("status", "command", "machine", "device", "versions", "date", "model", "haystack", "calibration",
              "settings", "timing"):
        if k in meta:
            lines.append(f"- {k}: {meta[k]}")
    lines += ["", "fp16 = transformers DynamicCache in the model's dtype; nuqB = KVQuantCache (real packed storage, 1 "
              "fp16 sink), R128 = with a 128-token fp16 recent window; KIVI-2/4 (g32, residual 128) and int4 (per "
              "token) = baselines simulated in the cache (fake-quantized storage). Success: the key's digits appear "
              "in the greedy continuation.", ""]
    for task in tasks:
        trs = [r for r in rows if r["task"] == task]
        contexts = sorted({r["context"] for r in trs})
        depths = sorted({r["depth"] for r in trs})
        methods = list(dict.fromkeys(r["method"] for r in trs))
        n = {c: sum(r["trials"] for r in trs if r["context"] == c and r["method"] == methods[0]) for c in contexts}
        lines += [f"## {task}: accuracy (%) per context, over {len(depths)} depths", "",
                  "| method | " + " | ".join(f"{c} ({n[c]} trials)" for c in contexts) + " | mean |",
                  "|---|" + "---|" * (len(contexts) + 1)]
        for m in methods:
            accs = []
            for c in contexts:
                rs = [r for r in trs if r["method"] == m and r["context"] == c]
                accs.append(sum(r["correct"] for r in rs) / max(1, sum(r["trials"] for r in rs)) if rs else None)
            valid = [a for a in accs if a is not None]
            mean = _pct(np.mean(valid) if valid else None)
            lines.append(f"| {m} | " + " | ".join(_pct(a) for a in accs) + f" | {mean} |")
        s = summarize(rows, task)
        lines += ["", "Target (fp16 >= 90% -> nuq3-1% within 5 points):"]
        for p in s["per_context"]:
            verdict = "pass" if p["pass"] else ("fp16 below 90%, not counted" if not p["fp16_ok"] else "FAIL")
            lines.append(f"- {p['context']}: fp16 {_pct(p['fp16'])}%, nuq3-1% {_pct(p['nuq3-1%'])}% -> {verdict}")
        eligible = [p for p in s["per_context"] if p["fp16_ok"]]
        note = (" (fp16 reaches 90% at no context)" if not eligible else
                "" if s["all_eligible_pass"] else " (not every context where fp16 >= 90% passes)")
        lines += ["", f"**Longest context where fp16 >= 90% and nuq3-1% is within 5 points: "
                  f"{s['longest'] if s['longest'] else 'none'}**{note}", ""]
        lines += [f"### {task}: accuracy (%) per context x depth", "",
                  "| method | context | " + " | ".join(f"d={d:g}" for d in depths) + " |",
                  "|---|---|" + "---|" * len(depths)]
        for m in methods:
            for c in contexts:
                cell = {r["depth"]: r["accuracy"] for r in trs if r["method"] == m and r["context"] == c}
                lines.append(f"| {m} | {c} | " + " | ".join(_pct(cell.get(d)) for d in depths) + " |")
        secs = sum(r.get("seconds", 0) for r in trs)
        lines += ["", f"{task}: {len(trs)} cells, {sum(r['trials'] for r in trs)} generations, {secs:.0f} s.", ""]
    return "\n".join(lines) + "\n"


def plot_heatmaps(rows: list[dict], path, title: str = "") -> None:
    """One heat map (depth x context, accuracy) per method and task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    per_task = {t: list(dict.fromkeys(r["method"] for r in rows if r["task"] == t)) for t in tasks}
    ncol = min(5, max(len(v) for v in per_task.values()))
    rows_of = {t: -(-len(per_task[t]) // ncol) for t in tasks}
    nrow = sum(rows_of.values())
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.0 * ncol + 1, 2.9 * nrow + 0.6), squeeze=False,
                             layout="constrained")
    used, im, r0 = set(), None, 0
    for task in tasks:
        for i, m in enumerate(per_task[task]):
            ax = axes[r0 + i // ncol, i % ncol]
            used.add(id(ax))
            trs = [r for r in rows if r["task"] == task and r["method"] == m]
            contexts = sorted({r["context"] for r in trs})
            depths = sorted({r["depth"] for r in trs})
            grid = np.full((len(depths), len(contexts)), np.nan)
            for r in trs:
                grid[depths.index(r["depth"]), contexts.index(r["context"])] = 100 * r["accuracy"]
            im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            for a in range(len(depths)):
                for b in range(len(contexts)):
                    if not np.isnan(grid[a, b]):
                        ax.text(b, a, f"{grid[a, b]:.0f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(contexts)), [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts],
                          fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_title(f"{m} ({task})", fontsize=8)
            ax.set_xlabel("context (tokens)", fontsize=7)
            if i % ncol == 0:
                ax.set_ylabel("needle depth", fontsize=7)
        r0 += rows_of[task]
    for ax in axes.flat:
        if id(ax) not in used:
            ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="accuracy (%)")
    fig.suptitle(title or "Passkey / needle retrieval accuracy (%)", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict], out, meta: dict) -> list:
    """Write ``<out>.json`` (meta + rows), ``<out>.md`` and ``<out>.png``; returns the paths."""
    import json
    from pathlib import Path

    out = Path(out)
    if out.suffix in (".json", ".md", ".png"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {t: summarize(rows, t) for t in TASKS if any(r["task"] == t for r in rows)}
    doc = {**meta, "summary": summary, "rows": [{k: v for k, v in r.items() if k != "outputs"} for r in rows]}
    paths = [out.with_suffix(".json"), out.with_suffix(".md"), out.with_suffix(".png")]
    paths[0].write_text(json.dumps(doc, indent=2) + "\n")
    paths[1].write_text(markdown_report(rows, meta))
    plot_heatmaps(rows, paths[2], meta.get("title", ""))
    return paths
