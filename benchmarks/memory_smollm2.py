"""Memory of the compressed KV cache on SmolLM2-135M at 1K-8K context, and CPU decode speed versus DynamicCache.

Writes ``benchmarks/memory_smollm2.{md,json}``. Run: ``PYTHONPATH=src python benchmarks/memory_smollm2.py``.

* Quantizers nuq2/3/4 with 1% outliers (and nuq3-1% with a 32-token fp16 window), calibrated quickly on 2 windows
  of 512 tokens of the default corpus (``kvquant.data``).
* Real keys/values: one teacher-forced prefill of an 8K-token window of the default corpus (in 1K chunks through a
  DynamicCache) gives every layer's post-RoPE keys and values; each context's storage is then filled with the first
  N tokens through ``LayerStorage.append`` (the same path ``KVQuantCache.update`` takes), in fp16 as a GPU model holds
  them. ``bytes`` counts every allocated tensor (capacity included, plus the lookup tables); ``effective_bits`` comes
  from the bytes in use.
* Decode speed: 2K-token prompt prefilled, then greedy decode steps alternating between DynamicCache and
  KVQuantCache (CPU reference path, 1 thread) so that machine load affects both equally; median ms/token.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from transformers import DynamicCache  # noqa: E402

from kvquant import KVQuantCache  # noqa: E402
from kvquant.calibration import CalibrationSettings, build_quantizer, cache_kwarg, collect_statistics  # noqa: E402
from kvquant.data import load_default_corpus, make_windows  # noqa: E402
from kvquant.models import load_model  # noqa: E402
from kvquant.quantizer import QuantizerConfig  # noqa: E402

CONTEXTS = (1024, 2048, 4096, 8192)
TARGETS = {2: 2.6, 3: 3.6, 4: 4.6}


@torch.no_grad()
def real_kv(model, ids: torch.Tensor, chunk: int = 1024):
    cache = DynamicCache(config=model.config)
    kw = cache_kwarg(model)
    for s in range(0, ids.shape[1], chunk):
        model(ids[:, s : s + chunk], use_cache=True, **{kw: cache})
    return [(layer.keys.half(), layer.values.half()) for layer in cache.layers]


def memory_rows(model, quantizers, kv) -> list[dict]:
    rows = []
    for name, q, R in quantizers:
        for n in CONTEXTS:
            cache = KVQuantCache(q, model, recent_window=R, set_attention=False)
            pos = torch.arange(n)[None]
            for layer, (k, v) in zip(cache.layers, kv):
                layer.lazy_initialization(k, v)
                layer.storage.append(k[:, :, :n], v[:, :, :n], pos)
                layer.cumulative_length = n
            r = cache.memory_report()
            rows.append({
                "method": name, "bits": q.config.bits, "outlier_fraction": q.config.outlier_fraction,
                "recent_window": R, "n_sinks": cache.n_sinks, "context": n,
                "bytes": r["bytes_allocated"], "bytes_used": r["bytes_used"], "fp16_bytes": r["fp16_bytes"],
                "effective_bits": round(r["effective_bits"], 4),
                "effective_bits_allocated": round(r["effective_bits_allocated"], 4),
                "compression_ratio": round(r["compression_ratio"], 3),
                "components": r["components"],
            })
            print(f"{name:>16} {n:>5}: {r['effective_bits']:.3f} bits used, {r['effective_bits_allocated']:.3f} "
                  f"allocated, {r['bytes_allocated'] / 2**20:.2f} MiB vs fp16 {r['fp16_bytes'] / 2**20:.2f} MiB")
    return rows


@torch.no_grad()
def decode_speed(model, q, ids: torch.Tensor, steps: int = 12) -> dict:
    kw = cache_kwarg(model)
    caches = {"fp16 DynamicCache": DynamicCache(config=model.config), q.name: KVQuantCache(q, model)}
    nxt = {}
    for name, c in caches.items():
        for s in range(0, ids.shape[1], 512):
            out = model(ids[:, s : s + 512], use_cache=True, **{kw: c})
        nxt[name] = out.logits[:, -1:].argmax(-1)
    times = {name: [] for name in caches}
    for _ in range(steps):
        for name, c in caches.items():
            t0 = time.perf_counter()
            out = model(nxt[name], use_cache=True, **{kw: c})
            times[name].append(time.perf_counter() - t0)
            nxt[name] = out.logits[:, -1:].argmax(-1)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    base = ms["fp16 DynamicCache"]
    return {"context": ids.shape[1], "threads": torch.get_num_threads(), "steps": steps,
            "ms_per_token": {k: round(v, 2) for k, v in ms.items()},
            "slowdown": round(ms[q.name] / base, 3)}


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = load_model()
    docs = load_default_corpus()
    t0 = time.time()
    calib = make_windows(tok, docs, 512, 2, seed=0)
    stats = collect_statistics(model, calib, CalibrationSettings(outlier_fractions=(0.01,)), progress=False)
    calib_s = time.time() - t0
    quantizers = [(f"nuq{b}-1%", build_quantizer(stats, QuantizerConfig(bits=b, outlier_fraction=0.01)), 0)
                  for b in (4, 3, 2)]
    quantizers.append(("nuq3-1% R=32", quantizers[1][1], 32))
    text = make_windows(tok, docs, max(CONTEXTS), 1, seed=1)
    t0 = time.time()
    kv = real_kv(model, text)
    fill_s = time.time() - t0
    rows = memory_rows(model, quantizers, kv)
    speed = decode_speed(model, quantizers[1][1], text[:, :2048])
    print(speed)
    meta = {
        "model": "SmolLM2-135M-Instruct (kvquant.models.load_model default)",
        "calibration": "2 windows x 512 tokens of the default corpus (kvquant.data), 1% outliers, nuq Fisher fs2",
        "calibration_seconds": round(calib_s, 1),
        "kv_source": "teacher-forced prefill of one 8K-token default-corpus window (1K chunks); storage in fp16",
        "kv_fill_seconds": round(fill_s, 1),
        "n_sinks": 1,
        "note": "bytes = every allocated tensor incl. capacity (x2 growth) and lookup tables; effective_bits from "
        "bytes in use (codes, outlier values+indices, value zero/scale, fp16 sinks/window, int32 positions)",
    }
    (HERE / "memory_smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows, "decode_speed": speed},
                                                         indent=2) + "\n")
    lines = [
        "# KVQuant cache memory on SmolLM2-135M",
        "",
        f"Calibration: {meta['calibration']}. KV: {meta['kv_source']}. {meta['note']}.",
        "",
        "| method | bits | outliers | R | context | bytes (allocated) | fp16 bytes | effective bits (used) "
        "| effective bits (allocated) | compression |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bits']} | {r['outlier_fraction']:.0%} | {r['recent_window']} | "
                     f"{r['context']} | {r['bytes']:,} | {r['fp16_bytes']:,} | {r['effective_bits']:.3f} | "
                     f"{r['effective_bits_allocated']:.3f} | x{r['compression_ratio']:.2f} |")
    lines += ["", "Targets at 8K (R=0): " + ", ".join(
        f"nuq{b}-1% <= {t} bits: "
        + next(f"{r['effective_bits']:.3f} {'OK' if r['effective_bits'] <= t else 'MISSED'}"
               for r in rows if r["bits"] == b and r["context"] == 8192 and r["recent_window"] == 0)
        for b, t in TARGETS.items())]
    ms = speed["ms_per_token"]
    lines += ["", f"## CPU decode speed at {speed['context']} context ({speed['threads']} thread, median of "
              f"{speed['steps']} interleaved steps)", "", "| cache | ms/token |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in ms.items()]
    lines += ["", f"Slowdown of the CPU reference path: x{speed['slowdown']} (target <= 3)."]
    (HERE / "memory_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
