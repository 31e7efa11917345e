"""Where the host time of a KVQuant decode step goes (run on the GPU machine through the device tool).

    PYTHONPATH=src python3 benchmarks/gpu_host_profile.py --out $OUT [--context 4096 --layers 8]

Random-weight Llama-3-8B-shaped model (bf16, fewer layers), a short prompt (host cost does not depend on the
context), then:
- wall time per decode step, and the host time to *enqueue* it (no synchronisation inside the step);
- cProfile of five decode steps (top functions by total and cumulative time);
- host microseconds per call of the pieces of one layer's decode: decode_attention, quantize_append, mask_bias,
  and a bare Triton launch of a 3-argument and of a 75-argument kernel.
Writes host_profile.json and the cProfile tables under --out.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import gpu_suite as gs  # noqa: E402

from kvquant.calibration import cache_kwarg  # noqa: E402  (the cache argument's name: transformers 5.24 renamed it)


def host_us(fn, n=200):
    """Host microseconds per call (enqueue only), after a warm-up; the device is drained before and after."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return t / n * 1e6


def timed_steps(model, cache, ids, warm=3, n=7):
    """Prefill ``ids`` into ``cache``, run ``warm`` decode steps, then time ``n``: (next token, median step ms, median
    host ms to enqueue a step)."""
    kw = cache_kwarg(model)  # once, outside the timed steps (it inspects model.forward's signature)
    out = model(ids, **{kw: cache}, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(warm):
        model(nxt, **{kw: cache}, use_cache=True)
    torch.cuda.synchronize()
    wall, enq = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        model(nxt, **{kw: cache}, use_cache=True)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
        enq.append(t1 - t0)
    return nxt, sorted(wall)[n // 2] * 1e3, sorted(enq)[n // 2] * 1e3


def main():
    ap = gs.step_parser(4096)
    ap.add_argument("--scan", default="", help="extra contexts (comma list): step, enqueue and device time")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: syncs,cprofile,pieces")
    a = ap.parse_args()
    import triton
    import triton.language as tl
    from transformers import DynamicCache, StaticCache

    from kvquant import kernels
    from kvquant.cache import KVQuantCache

    model, quant, ids, res = gs.step_setup(a)
    kw = cache_kwarg(model)

    def make(name):
        os.environ["KVQUANT_FUSED_DECODE"] = "1"
        if name == "dynamic":
            return DynamicCache(config=model.config)
        if name == "static":
            return StaticCache(config=model.config, max_cache_len=a.context + 64)
        return KVQuantCache(quant, model)

    # ---- device->host synchronisations inside one decode step (torch's sync debug mode) ---------------------------
    import traceback
    import warnings

    res["syncs"] = {}
    skip = set(a.skip.split(","))
    for name in () if "syncs" in skip else ("static", "kvquant-fused"):
        cache = make(name)
        with torch.no_grad():
            out = model(ids[:, :512], **{kw: cache}, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, **{kw: cache}, use_cache=True)
            torch.cuda.synchronize()
            seen = []

            def show(message, category, filename, lineno, file=None, line=None, _seen=seen):
                _seen.append("".join(traceback.format_stack(limit=12)[:-1]) + str(message))

            old = warnings.showwarning
            warnings.showwarning = show
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(1)
            try:
                out = model(nxt, **{kw: cache}, use_cache=True)
            finally:
                torch.cuda.set_sync_debug_mode(0)
                warnings.showwarning = old
        res["syncs"][name] = len(seen)
        with open(os.path.join(a.out, f"syncs_{name}.txt"), "w") as f:
            f.write("\n\n".join(seen))
        print(f"== {name}: {len(seen)} synchronising calls in one decode step", flush=True)
        for s_ in seen[:3]:
            print(s_, flush=True)
        del cache, out

    keep = {}
    for name in () if "cprofile" in skip else ("static", "dynamic", "kvquant-fused"):
        cache = make(name)
        with torch.no_grad():
            nxt, step_ms, enqueue_ms = timed_steps(model, cache, ids)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(5):
                model(nxt, **{kw: cache}, use_cache=True)
            torch.cuda.synchronize()
            prof.disable()
        res[name] = {"step_ms": step_ms, "enqueue_ms": enqueue_ms}
        for key in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(45)
            with open(os.path.join(a.out, f"cprofile_{name}_{key}.txt"), "w") as f:
                f.write(s.getvalue())
            if name == "kvquant-fused":
                print(f"== {name} by {key}\n{s.getvalue()[:9000]}", flush=True)
        print(name, res[name], flush=True)
        if name == "kvquant-fused":
            keep["cache"] = cache
        else:
            del cache
    # ---- pieces of one layer's decode step ----------------------------------------------------------------------
    if "cache" not in keep:
        keep["cache"] = make("kvquant-fused")
        with torch.no_grad():
            model(ids, **{kw: keep["cache"]}, use_cache=True, logits_to_keep=1)
    st = keep["cache"].layers[0].storage
    q = torch.randn(1, 32, 1, 128, device=gs.DEV, dtype=torch.bfloat16)
    total = len(st)
    mask4 = torch.ones(1, 1, 1, total, device=gs.DEV, dtype=torch.bool)
    k1 = torch.randn(1, 8, 1, 128, device=gs.DEV, dtype=torch.bfloat16)
    pos = torch.full((1, 1), total, device=gs.DEV, dtype=torch.long)
    pieces = {}
    with torch.no_grad():
        pieces["decode_attention_nomask"] = host_us(lambda: kernels.decode_attention(q, st, 0.088))
        pieces["decode_attention_mask4d"] = host_us(lambda: kernels.decode_attention(q, st, 0.088, mask4))
        pieces["mask_bias"] = host_us(lambda: kernels.mask_bias(mask4, 1, total, gs.DEV))
        n0 = st.n_q

        def qa():
            kernels.quantize_append(st, k1, k1, pos)
            st.n_q = n0  # overwrite the same slot: the storage does not grow
        pieces["quantize_append"] = host_us(qa)
        pieces["storage_append_R0"] = host_us(lambda: (st.append(k1, k1, pos), setattr(st, "n_q", n0)))
        pieces["torch_empty_x3"] = host_us(lambda: [torch.empty(4096, device=gs.DEV) for _ in range(3)])
        pieces["torch_add"] = host_us(lambda: q.add(q))

        @triton.jit
        def k3(x, y, n, B: tl.constexpr):
            o = tl.arange(0, B)
            tl.store(y + o, tl.load(x + o, mask=o < n), mask=o < n)

        x = torch.zeros(64, device=gs.DEV)
        y = torch.zeros(64, device=gs.DEV)
        pieces["triton_launch_3_args"] = host_us(lambda: k3[(1,)](x, y, 64, B=64))

        @triton.jit
        def k75(x, y, n, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9,
                c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9,
                e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, f0, f1, f2, f3, f4, f5, f6, f7, f8, f9,
                B: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
                C4: tl.constexpr, C5: tl.constexpr, C6: tl.constexpr, C7: tl.constexpr, C8: tl.constexpr):
            o = tl.arange(0, B)
            tl.store(y + o, tl.load(x + o, mask=o < n), mask=o < n)

        ten = [x] * 20 + [7, 64, 128, 3, 9, 1, 0, 5, 11, 13] * 4
        pieces["triton_launch_63_args_9_constexpr"] = host_us(
            lambda: k75[(1,)](x, y, 64, *ten, B=64, C0=1, C1=2, C2=3, C3=True, C4=False, C5=8, C6=16, C7=32,
                              C8=128))
    res["host_us_per_call"] = {k: round(v, 1) for k, v in pieces.items()}
    del keep
    res["scan"] = []
    for ctx in [int(c) for c in a.scan.split(",") if c]:
        ids = torch.randint(0, 32000, (1, ctx), device=gs.DEV)
        for name in ("static", "kvquant-fused"):
            torch.cuda.empty_cache()
            a.context = ctx
            cache = make(name)
            with torch.no_grad():
                nxt, step_ms, enqueue_ms = timed_steps(model, cache, ids)
                acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                with torch.profiler.profile(activities=acts) as prof:
                    for _ in range(3):
                        model(nxt, **{kw: cache}, use_cache=True)
                    torch.cuda.synchronize()
                ka = [e for e in prof.key_averages() if e.self_device_time_total > 0]
                ka.sort(key=lambda e: -e.self_device_time_total)
                dev_ms = sum(e.self_device_time_total for e in ka) / 3e3
                top = [(e.key[:60], round(e.self_device_time_total / 3e3, 3), e.count // 3) for e in ka[:6]]
                st0 = cache.layers[0].storage if name == "kvquant-fused" else None
                host_dec = None
                if st0 is not None:
                    from kvquant import kernels as _k
                    q0 = torch.randn(1, 32, 1, 128, device=gs.DEV, dtype=torch.bfloat16)
                    host_dec = round(host_us(lambda: _k.decode_attention(q0, st0, 0.088), n=50), 1)  # noqa: B023
            row = dict(context=ctx, cache=name, step_ms=round(step_ms, 2), enqueue_ms=round(enqueue_ms, 2),
                       device_busy_ms=round(dev_ms, 2), top_kernels=top, host_us_decode_attention=host_dec)
            res["scan"].append(row)
            print(row, flush=True)
            del cache
    print(json.dumps(res["host_us_per_call"], indent=1), flush=True)
    with open(os.path.join(a.out, "host_profile.json"), "w") as f:
        json.dump(res, f, indent=1)
    print({k: res[k] for k in ("static", "dynamic", "kvquant-fused") if k in res})


if __name__ == "__main__":
    main()
