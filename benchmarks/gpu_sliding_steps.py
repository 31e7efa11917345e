"""Decode steps of a Gemma-3-shaped model with each cache, interleaved step by step (H200, via the device tool).

    PYTHONPATH=src python3 benchmarks/gpu_sliding_steps.py [--contexts 32768,131072] [--steps 40] [--out DIR]
    python3 benchmarks/gpu_sliding_steps.py --report gpu_runs/run113_sliding_steps_2026-11-30.json [--note TEXT]

An eager batch-1 decode step is host-bound, and this host's speed drifts by up to 2x within a minute (gpu_notes,
fifteenth session), so `generate` rows taken one cache after another cannot separate a few milliseconds. Here one
random-weight Gemma-3-4B-shaped model (gpu_suite.GEN_MODELS["gemma3-4b"]: 28 sliding-window layers, 6 global) holds
six caches filled with the same prompt: DynamicCache; KVQuantCache nuq3-1% (token-group values, the calibration
default) with its sliding layers through the fused kernel, where a full window's step drops its oldest token from
the front, then appends (``kvquant_cache.SLIDING_RING = False``); the same with the new token quantized into the
oldest token's row instead, launched eagerly (``SLIDING_RING = True``, ``SLIDING_RING_GRAPHS = False``); the same
with those ring steps as CUDA-graph replays (both True: the default); and the same with the sliding layers
dequantized and attended with SDPA (``kvquant_cache.SLIDING_LAYER_KERNELS = False``); and the default with its
sliding layers kept in bf16 (``KVQuantCache(sliding_layers="fp16")``: transformers' sliding-window layer and SDPA,
the global layers as in the default). The flags are read at every ``update``. Each round runs one decode step of
every cache, in rotated order, each timed between device synchronisations; the report gives each cache's median step
and the median of the per-round ratios, and the memory both default-flag caches hold after the steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import gpu_suite as S  # noqa: E402

from kvquant.cache import KVQuantCache, kvquant_cache  # noqa: E402
from kvquant.calibration import cache_kwarg  # noqa: E402

CACHES = ("dynamic", "kvquant-sliding-kernel", "kvquant-sliding-kernel-ring", "kvquant-sliding-kernel-ring-graph",
          "kvquant-sliding-sdpa", "kvquant-fp16-sliding")
DEFAULT = "kvquant-sliding-kernel-ring-graph"  # the library's defaults


def _flags(name: str) -> None:
    """The module flags of cache ``name`` (read at every update; the fp16-sliding cache runs with the defaults)."""
    name = DEFAULT if name == "kvquant-fp16-sliding" else name
    kvquant_cache.SLIDING_LAYER_KERNELS = name != "kvquant-sliding-sdpa"
    kvquant_cache.SLIDING_RING = name.startswith("kvquant-sliding-kernel-ring")
    kvquant_cache.SLIDING_RING_GRAPHS = name == "kvquant-sliding-kernel-ring-graph"


def _cache(name: str, quant, model):
    from transformers import DynamicCache

    if name == "dynamic":
        return DynamicCache(config=model.config)
    return KVQuantCache(quant, model, sliding_layers="fp16" if name == "kvquant-fp16-sliding" else "quantized")


def _per_round(times: dict, slow: str, fast: str, warm: int) -> float:
    """The median over the rounds after the first ``warm`` of cache ``slow``'s step time over cache ``fast``'s."""
    return statistics.median(a / b for a, b in zip(times[slow][warm:], times[fast][warm:]))


def report(path: str, out_md: str, note: str = "") -> None:
    """Markdown table of a run's JSON (``--report JSON --md OUT``)."""
    with open(path) as f:
        res = json.load(f)
    env = res["env"]
    md = ("# Gemma-3-4B-shaped decode steps: the sliding-window layers through the fused kernel\n\n"
          f"Run: `{env['command']}`; {env['gpu']}, torch {env['torch']}, triton {env['triton']}, transformers "
          f"{env['transformers']}; {env['date']}; code {env.get('code_commit', '?')}.\n\n"
          f"Model: {res['model']}, batch 1; KVQuantCache {res['cache_config']}. The caches hold the same "
          "prompt and take one decode step each per round, in rotated order (the host's speed drifts by up to 2x "
          "within a minute, so rows measured one cache after another do not compare); each step is timed between "
          "device synchronisations, the first 3 rounds dropped. Ratios are medians of the per-round ratios.\n\n"
          + (f"**Note.** {note}\n\n" if note else "")
          + "| context | cache | median step ms | tokens/s | vs DynamicCache (per round) | kernels |\n"
          "|---|---|---|---|---|---|\n")
    for r in res["rows"]:
        for n in [c for c in CACHES if c in r["median_step_ms"]]:  # (run 113 had no -ring cache)
            # (runs 113-126 recorded the kernels of the front-drop cache only)
            kern = ", ".join(r.get("decode_kernels_by_cache", {}).get(
                n, r["decode_kernels"] if n == "kvquant-sliding-kernel" else []))
            md += (f"| {r['context']:,} | {n} | {r['median_step_ms'][n]} | {r['tokens_per_s'][n]} | "
                   f"{r['speedup_vs_dynamic_median_of_rounds'][n]:.2f}x | {kern} |\n")
        md += (f"| {r['context']:,} | sliding kernel against sliding SDPA | | | "
               f"{r['sliding_kernel_vs_sdpa_median_of_rounds']:.2f}x | |\n")
        if "ring_vs_drop_median_of_rounds" in r:
            md += (f"| {r['context']:,} | sliding kernel: ring against front drop | | | "
                   f"{r['ring_vs_drop_median_of_rounds']:.3f}x | |\n")
        if "ring_graph_vs_ring_eager_median_of_rounds" in r:
            md += (f"| {r['context']:,} | sliding kernel: ring steps as graphs against eager | | | "
                   f"{r['ring_graph_vs_ring_eager_median_of_rounds']:.3f}x | |\n")
        if "fp16_sliding_vs_default_median_of_rounds" in r:
            md += (f"| {r['context']:,} | sliding layers in bf16 against quantized (the default) | | | "
                   f"{r['fp16_sliding_vs_default_median_of_rounds']:.3f}x | |\n")
    if any("memory" in r for r in res["rows"]):
        md += ("\nMemory after the steps (`KVQuantCache.memory_report()`, bytes in use; effective bits per stored "
               "key/value element, all layers):\n\n"
               "| context | cache | MiB in use | effective bits | fp16 layers MiB |\n|---|---|---|---|---|\n")
        for r in res["rows"]:
            for n, m in r.get("memory", {}).items():
                md += (f"| {r['context']:,} | {n} | {m['bytes_used'] / 2**20:.1f} | {m['effective_bits']:.3f} | "
                       f"{m['fp16_layers_bytes'] / 2**20:.1f} |\n")
    with open(out_md, "w") as f:
        f.write(md)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--report", help="write the Markdown table of this JSON (to --md) and exit")
    ap.add_argument("--md", default="benchmarks/gpu_sliding_steps.md")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    if a.report:
        return report(a.report, a.md, a.note)
    os.makedirs(a.out, exist_ok=True)
    model = S.random_model(None, "gemma3-4b")
    n_layers = model.config.num_hidden_layers
    quant = S.synthetic_nuq3_quantizer(model, n_layers, "token", 3)
    kw = cache_kwarg(model)
    res = {"env": S.env_info(), "model": "random-weight Gemma-3-4B shape (bf16, 34 layers: 28 sliding of 1024, 6 "
           "global)", "cache_config": "nuq3-1%, token-group values, 1 sink", "rows": []}
    for ctx in (int(c) for c in a.contexts.split(",")):
        torch.manual_seed(ctx)
        ids = torch.randint(0, min(32000, model.config.vocab_size), (1, ctx), device=S.DEV)
        caches, nxt = {}, {}
        for name in CACHES:
            _flags(name)
            caches[name] = _cache(name, quant, model)
            with torch.no_grad():
                logits = model(ids, use_cache=True, **{kw: caches[name]}).logits[:, -1:]
            nxt[name] = logits.argmax(-1)
            del logits
            torch.cuda.empty_cache()
        times = {name: [] for name in CACHES}
        for r in range(a.steps):
            order = CACHES[r % len(CACHES):] + CACHES[: r % len(CACHES)]
            for name in order:
                _flags(name)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = model(nxt[name], use_cache=True, **{kw: caches[name]}).logits[:, -1:]
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
                nxt[name] = out.argmax(-1)
        _flags("kvquant-sliding-kernel")
        warm = 3  # the first steps record graphs / compile
        med = {n: statistics.median(t[warm:]) * 1e3 for n, t in times.items()}
        ratio = {n: _per_round(times, "dynamic", n, warm) for n in CACHES}
        ratio_sdpa = _per_round(times, "kvquant-sliding-sdpa", "kvquant-sliding-kernel", warm)
        ring_drop = _per_round(times, "kvquant-sliding-kernel", "kvquant-sliding-kernel-ring", warm)
        graph_eager = _per_round(times, "kvquant-sliding-kernel-ring", "kvquant-sliding-kernel-ring-graph", warm)
        fp16_default = _per_round(times, DEFAULT, "kvquant-fp16-sliding", warm)
        kern_by = {n: sorted(set().union(*(S.kernels.planned_kernels(layer.storage) for layer in caches[n].layers
                                           if layer.storage is not None)))
                   for n in CACHES if n != "dynamic"}
        memory = {}
        for n in (DEFAULT, "kvquant-fp16-sliding"):
            m = caches[n].memory_report()
            memory[n] = dict(bytes_used=m["bytes_used"], effective_bits=round(m["effective_bits"], 4),
                             fp16_layers_bytes=m["components"].get("fp16_layers", 0))
        kern = kern_by["kvquant-sliding-kernel"]
        row = dict(context=ctx, steps=a.steps - warm, median_step_ms={n: round(v, 2) for n, v in med.items()},
                   tokens_per_s={n: round(1e3 / v, 2) for n, v in med.items()},
                   speedup_vs_dynamic_median_of_rounds={n: round(v, 3) for n, v in ratio.items()},
                   sliding_kernel_vs_sdpa_median_of_rounds=round(ratio_sdpa, 3),
                   ring_vs_drop_median_of_rounds=round(ring_drop, 3),
                   ring_graph_vs_ring_eager_median_of_rounds=round(graph_eager, 3),
                   fp16_sliding_vs_default_median_of_rounds=round(fp16_default, 3), memory=memory, decode_kernels=kern,
                   decode_kernels_by_cache=kern_by,
                   step_ms={n: [round(x * 1e3, 1) for x in t] for n, t in times.items()})
        print(json.dumps({k: v for k, v in row.items() if k != "step_ms"}), flush=True)
        res["rows"].append(row)
        del caches
        torch.cuda.empty_cache()
        with open(os.path.join(a.out, "gpu_sliding_steps.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
