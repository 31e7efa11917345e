"""Profile of one end-to-end decode step with KVQuantCache (fused path) on the GPU: where the step's time goes.

    PYTHONPATH=src python3 benchmarks/gpu_profile_step.py --out $OUT [--context 32768 --layers 8]

Random-weight Llama-3-8B-shaped model (bf16, fewer layers), a prompt of --context tokens, then torch.profiler over
three decode steps. Writes the top operators by self CPU time and by CUDA time (Markdown) and the step times (JSON).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import gpu_suite as gs  # noqa: E402

from kvquant.calibration import cache_kwarg  # noqa: E402  (the cache argument's name: transformers 5.24 renamed it)


def main():
    a = gs.step_parser(32768).parse_args()
    from transformers import DynamicCache

    from kvquant.cache import KVQuantCache

    model, quant, ids, res = gs.step_setup(a)
    kw = cache_kwarg(model)  # once, outside the timed steps (it inspects model.forward's signature)
    for name in ("dynamic", "kvquant-fused"):
        cache = DynamicCache(config=model.config) if name == "dynamic" else KVQuantCache(quant, model)
        with torch.no_grad():
            out = model(ids, **{kw: cache}, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(3):  # warm-up (compilation)
                out = model(nxt, **{kw: cache}, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                t0 = time.time()
                out = model(nxt, **{kw: cache}, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                times.append(time.time() - t0)
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                for _ in range(3):
                    out = model(nxt, **{kw: cache}, use_cache=True)
                    nxt = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
        res[name] = {"step_ms": sorted(times)[2] * 1e3}
        ka = prof.key_averages()
        for key in ("self_cpu_time_total", "self_device_time_total"):
            table = ka.table(sort_by=key, row_limit=25, max_name_column_width=60)
            with open(os.path.join(a.out, f"profile_{name}_{key}.txt"), "w") as f:
                f.write(table)
            print(f"== {name} by {key}\n{table}", flush=True)
        del cache, out
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "profile_step.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(res)


if __name__ == "__main__":
    main()
