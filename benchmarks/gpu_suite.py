"""GPU suite for the fused KVQuant kernels (run on the H200 through the device tool).

    PYTHONPATH=src python3 benchmarks/gpu_suite.py --out $OUT [--sections check,bw,decode,capacity,generate]

(a) correctness of every kernel vs the PyTorch reference (core.codec) on random data with outlier channels;
(b) device copy bandwidth; (c) decode-attention latency per layer (SDPA bf16, our split-K bf16, KVQuant nuq4/3/2-1%)
for the Llama-2-7B and Llama-3-8B shapes; (d) capacity (bytes/token of real allocated storage, and a real 1M-token
decode step); (f) end-to-end generate tokens/s with a random-weight Llama-3-8B-shaped model.
Writes JSON/Markdown under --out; prints a short table last.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kvquant import kernels  # noqa: E402
from kvquant.cache.storage import LayerStorage  # noqa: E402
from kvquant.kernels.reference import reference_attention, reference_decode_attention  # noqa: E402
from kvquant.kernels.testing import synthetic_codec, synthetic_kv, synthetic_rope  # noqa: E402

DEV = torch.device("cuda")
DEADLINE = [float("inf")]
SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64),
          "llama32-1b": (32, 8, 64), "gemma3-4b": (8, 4, 256)}
# (query heads, KV heads, head_dim); Llama-3.2-1B: head_dim 64, GQA 4; Gemma-3-4B: head_dim 256, GQA 2 (the bytes per
# token of Llama-3-8B: 4 x 256 = 8 x 128 channels)
CONTEXTS = {"llama2-7b": [4096, 16384, 65536, 131072, 524288], "llama3-8b": [4096, 16384, 65536, 131072],
            "smollm2-135m": [16384, 131072], "llama32-1b": [4096, 16384, 65536, 131072],
            "gemma3-4b": [4096, 16384, 65536, 131072]}
BITS = [4, 3, 2]
# decode rows: head-group value storage at every width + token-group storage (natural, tiles and pairs kernels)
METHODS = [(4, "head"), (3, "head"), (2, "head"), (3, "token")]
KV_OPTS = {}  # launch options of the fields kernel, chosen by diag_section (fastest at 128K) when it runs first


def log(*a):
    print(*a, flush=True)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def env_info():
    p = torch.cuda.get_device_properties(0)
    return {
        "gpu": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "transformers": importlib.metadata.version("transformers"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"PYTHONPATH=src python3 benchmarks/{os.path.basename(sys.argv[0])} " + " ".join(sys.argv[1:]),
    }


def bench(fn, rep=200):
    return do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3  # us


def bench_graph(fn, rep=200):
    """fn captured as a CUDA graph and timed by replay: its GPU time without the host's launch cost (how generate
    runs a decode step, kernels.graphs). A Gluon launch costs the host about 90 us, more than a 32K-128K batch-1
    layer takes on the GPU, so eager timings of such short calls measure the host."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay, rep)


# ---------------------------------------------------------------------------------------------------------------
def copy_bandwidth():
    n = 2 * 2**30  # 2 GiB
    a = torch.empty(n, dtype=torch.uint8, device=DEV)
    a.random_(0, 255)
    b = torch.empty_like(a)
    us = bench(lambda: b.copy_(a), rep=300)  # noqa: B023
    torch.cuda.empty_cache()
    return 2 * n / (us * 1e-6) / 1e9


# ---------------------------------------------------------------------------------------------------------------
def fill_storages(B, H, D, ctx, bits_list, value_group="head", dtype=torch.bfloat16, chunk=16384, want_fp16=True,
                  frac=0.01, n_sinks=1):
    """fp16 K/V [B, H, ctx, D] (post-RoPE) and one LayerStorage per entry of ``bits_list`` filled through
    quantize_append; an entry is a bit width (storage of ``value_group``) or a (bits, value_group) pair."""
    rope = synthetic_rope(D, base=500000.0)
    spec = {e: (e if isinstance(e, tuple) else (e, value_group)) for e in bits_list}
    codecs = {e: synthetic_codec(H, D, b, frac, vg, seed=b) for e, (b, vg) in spec.items()}
    sts = {e: LayerStorage(codecs[e], rope, n_sinks, 0, B, dtype, DEV, initial_capacity=ctx) for e in bits_list}
    kf = torch.empty(B, H, ctx, D, dtype=dtype, device=DEV) if want_fp16 else None
    vf = torch.empty_like(kf) if want_fp16 else None
    t = 0
    while t < ctx:
        n = min(chunk, ctx - t)
        pos = torch.arange(t, t + n, device=DEV)[None, :].expand(B, n)
        k, v = synthetic_kv(codecs[bits_list[0]] if bits_list else synthetic_codec(H, D, 3, frac, "head"),
                            rope, B, n, pos, dtype=dtype, device=DEV, seed=t)
        if want_fp16:
            kf[:, :, t:t + n] = k
            vf[:, :, t:t + n] = v
        for st in sts.values():
            a = max(0, min(n, n_sinks - t))
            if a:
                st.append(k[:, :, :a], v[:, :, :a], pos[:, :a])
            if n - a:
                kernels.quantize_append(st, k[:, :, a:], v[:, :, a:], pos[:, a:])
                st.n_seen += n - a
        t += n
    torch.cuda.synchronize()
    return kf, vf, sts, rope


def storage_bytes_read(st, n_q):
    """Bytes the decode kernel reads for n_q quantized tokens (every quantized field + q_pos) + sinks/window."""
    per_tok = 0
    for name in st._fields():  # the allocated quantized fields ([B, G, capacity, ...])
        t = getattr(st, name)
        per_tok += t.shape[0] * t.shape[1] * t.shape[3] * t.element_size()
    per_tok += 4 * st.q_pos.shape[0]
    dense = sum(x.numel() * x.element_size() for x in (st.sink_k, st.sink_v, st.win_k, st.win_v))
    return per_tok * n_q + dense, per_tok


def effective_bits(st):
    _, per_tok = storage_bytes_read(st, 1)
    return 8 * per_tok / (2 * st.batch * st.heads * st.head_dim)


def sdpa_decode(q, k, v, scaling, gqa):
    return F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=gqa)


def sdpa_graph_us(q, H, ctx):
    """bf16 SDPA decode of query q [B, Hq, 1, D] over random K/V [B, H, ctx, D] (GQA), timed as a graph replay; the
    K/V are freed before it returns."""
    B, _, _, D = q.shape
    k = torch.randn(B, H, ctx, D, device=q.device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    return bench_graph(lambda: sdpa_decode(q, k, v, D**-0.5, True))


def pairs_ok(q, st) -> bool:
    try:
        return kernels.decode_kernel(q, st, kernel="pairs") == "pairs"
    except ValueError:
        return False


def decode_section(res, copy_bw, shapes, batches, only_ctx=None, check=True, extra=True, on_context=None):
    """The decode matrix; ``on_context`` (e.g. writing the JSON) runs after every context, so that a run stopped by
    a time limit keeps every row it measured (run 53 lost its fp16 rows that way). Each storage's rows: the Triton
    kernel that eager steps of small storages take (kernels.EAGER_PAIRS_MIN_TOKEN_HEADS off for the matrix), the
    kernels it replaced, and the pairs kernel."""
    eager_pairs = kernels.EAGER_PAIRS_MIN_TOKEN_HEADS
    kernels.EAGER_PAIRS_MIN_TOKEN_HEADS = None
    try:
        _decode_matrix(res, copy_bw, shapes, batches, only_ctx, check, extra, on_context)
    finally:
        kernels.EAGER_PAIRS_MIN_TOKEN_HEADS = eager_pairs


def _run98_splits(n_tokens, programs, block_t=32, min_chunk=256, target_waves=4.0):
    """The natural kernel's split count before run 101: about four waves, at most n_tokens // min_chunk splits."""
    want = max(1, math.ceil(target_waves * torch.cuda.get_device_properties(0).multi_processor_count / programs))
    want = min(want, max(1, n_tokens // min_chunk))
    chunk = math.ceil(math.ceil(n_tokens / want) / block_t) * block_t
    return math.ceil(n_tokens / chunk)


def _decode_matrix(res, copy_bw, shapes, batches, only_ctx, check, extra, on_context):
    rows = res.setdefault("rows", [])
    checks = res.setdefault("checks", [])
    for shape in shapes:
        Hq, H, D = SHAPES[shape]
        for B in batches:
            if time.time() > DEADLINE[0]:
                log(f"deadline: skip {shape} B={B}")
                continue
            ctxs = [c for c in CONTEXTS[shape] if only_ctx is None or c in only_ctx]
            cmax = max(ctxs)
            def need(c):  # fp16 K/V + 4 compressed storages + the fill's temporaries
                return 2 * B * H * c * D * 2 * 2.2  # noqa: B023

            free = torch.cuda.mem_get_info()[0]
            if need(cmax) > free:
                log(f"skip {shape} B={B} ctx={cmax}: needs ~{need(cmax) / 2**30:.0f} GiB of {free / 2**30:.0f} free")
                ctxs = [c for c in ctxs if need(c) < free]
                if not ctxs:
                    continue
                cmax = max(ctxs)
            t0 = time.time()
            kf, vf, sts, rope = fill_storages(B, H, D, cmax, METHODS)
            log(f"filled {shape} B={B} ctx={cmax} in {time.time() - t0:.1f}s")
            scaling = D**-0.5
            g = torch.Generator(device=DEV).manual_seed(1)
            q = (torch.randn(B, Hq, 1, D, generator=g, device=DEV)).to(torch.bfloat16)
            gqa = Hq != H
            for ctx in ctxs:
                ks, vs = kf[:, :, :ctx], vf[:, :, :ctx]
                fp16_bytes = 2 * B * H * ctx * D * 2
                lat, eager = {}, {}
                for impl, fn in (("sdpa", lambda: sdpa_decode(q, ks, vs, scaling, gqa)),  # noqa: B023
                                 ("splitk", lambda: kernels.fp16_decode_attention(q, ks, vs, scaling))):  # noqa: B023
                    eager[impl], lat[impl] = bench(fn), bench_graph(fn)
                best = min(lat.values())
                for impl, us in lat.items():
                    rows.append(dict(shape=shape, context=ctx, batch=B, method="fp16", impl=impl, bits=16.0,
                                     outlier_fraction=0.0, latency_us=round(us, 2), eager_us=round(eager[impl], 2),
                                     gbps=round(fp16_bytes / (us * 1e-6) / 1e9, 1),
                                     bw_fraction=round(fp16_bytes / (us * 1e-6) / 1e9 / copy_bw, 3),
                                     speedup_vs_best_fp16=round(best / us, 3)))
                if check and ctx == min(ctxs):
                    ref = reference_attention(q, ks, vs, scaling)
                    checks.append(dict(kernel="fp16_splitk", shape=shape, batch=B, context=ctx,
                                       rel_err=rel(kernels.fp16_decode_attention(q, ks, vs, scaling).float(),
                                                   ref.float()),
                                       sdpa_rel_err=rel(sdpa_decode(q, ks, vs, scaling, gqa).float(), ref.float())))
                for (b, vg), st in sts.items():
                    st.n_q = ctx - st.n_s
                    nbytes, _ = storage_bytes_read(st, st.n_q)
                    kw0 = dict(KV_OPTS) if vg == "head" and D > 64 else {}
                    # the default kernel and the tiles kernel that ran before, side by side: head_dim 64 (natural
                    # since it was enabled there) and token-group values (natural since run 21)
                    kws = [kw0] + ([dict(kernel="tiles")] if vg == "token" or D == 64 else [])
                    if b == 3 and D == 128:  # the natural kernel beside the Gluon pairs kernel (both value groupings)
                        kws += [dict(kernel="natural")]
                    if D == 256:  # the natural kernel beside the default (pairs since runs 106-107), and with the
                        # launch it had before run 101 (no reload, four waves of splits)
                        kws += [dict(kernel="natural"),
                                dict(kernel="natural", reload=False,
                                     num_splits=_run98_splits(st.n_q, B * H), label="natural-run98launch")]
                        kws += [dict(kernel="fields")] if b == 2 and vg == "head" else []  # nuq2's default until run 98
                    # the pairs kernel (graph steps' default at kernels.PAIRS_DEFAULT_HEAD_DIMS)
                    if b in (2, 3, 4) and D in kernels.PAIRS_HEAD_DIMS and pairs_ok(q, st):
                        kws += [dict(kernel="pairs")]
                    done = set()
                    for kw in kws:
                        kw = dict(kw)  # noqa: PLW2901
                        label = kw.pop("label", None)
                        impl = "kvquant-" + (label or kernels.decode_kernel(q, st, **kw))  # the kernel that runs
                        if impl in done:
                            continue
                        done.add(impl)
                        fn = lambda: kernels.decode_attention(q, st, scaling, **kw)  # noqa: B023, E731
                        eager_us, us = bench(fn), bench_graph(fn)
                        name = f"nuq{b}-1pct" + ("" if vg == "head" else "-tokengroup")
                        rows.append(dict(shape=shape, context=ctx, batch=B, method=name, impl=impl, value_group=vg,
                                         bits=round(effective_bits(st), 3), outlier_fraction=0.01,
                                         latency_us=round(us, 2), eager_us=round(eager_us, 2),
                                         gbps=round(nbytes / (us * 1e-6) / 1e9, 1),
                                         bw_fraction=round(nbytes / (us * 1e-6) / 1e9 / copy_bw, 3),
                                         speedup_vs_best_fp16=round(best / us, 3)))
                        if check and ctx == min(ctxs):
                            out = kernels.decode_attention(q, st, scaling, **kw)
                            ref = reference_decode_attention(q, st, scaling)
                            checks.append(dict(kernel=f"{impl}_{name}", shape=shape, batch=B, context=ctx,
                                               rel_err=rel(out.float(), ref.float())))
                    st.n_q = cmax - st.n_s
                log([r for r in rows if r["shape"] == shape and r["batch"] == B and r["context"] == ctx])
                if on_context is not None:
                    on_context()
            del kf, vf, sts
            torch.cuda.empty_cache()


D256_SWEEPS = ("d256", "d256b", "d256c")  # head_dim 256 (Gemma-3-4B shape): batch 1 and 8, decode rows untouched


def diag_section(res, copy_bw, ctx=131072, sweep="full", batch=1):
    """Launch-parameter sweep at Llama-3-8B 128K batch 1, nuq3-1%, each row with its error against the reference:
    the fields kernel (head-group values) with the gather path and with the register lookup table (lutx) over
    prefetch, tokens per block, warps and register cap ("regs": a second, narrower pass); the tiles kernel
    (token-group values). The fastest correct fields configuration becomes KV_OPTS for the decode rows."""
    rows = res.setdefault("diag", [])
    shape = {"d64": "smollm2-135m", "tokengroup-mha": "llama2-7b", "prefetch-mha": "llama2-7b",
             **dict.fromkeys(D256_SWEEPS, "gemma3-4b")}.get(sweep, "llama3-8b")
    Hq, H, D = SHAPES[shape]
    q = torch.randn(batch, Hq, 1, D, device=DEV).bfloat16()
    _, _, sts, _ = fill_storages(batch, H, D, ctx, [(3, "head"), (3, "token")], want_fp16=False)
    if sweep == "slots":  # the same storages without outlier slots: what the slots cost, per value grouping
        _, _, sts0, _ = fill_storages(batch, H, D, ctx, [(3, "head"), (3, "token")], want_fp16=False, frac=0.0)
        sts.update({(b_, g_ + "-0pct"): st_ for (b_, g_), st_ in sts0.items()})
    if sweep in ("prefetch", "prefetch-mha"):  # and a 2-bit head-group storage, the fields kernel's default width
        sts[(3, "head-2bit")] = fill_storages(batch, H, D, ctx, [(2, "head")], want_fp16=False)[2][(2, "head")]
    best = None
    # lutx=False: the fp32 gather path (the previous default, 128 registers); lutx=True: register lookup + fp16 math
    sweeps = [("fields", "head", dict(lutx=False, block_t=32, num_warps=4, maxnreg=mr, prefetch=False))
              for mr in (128, 0)]
    sweeps += [("fields", "head", dict(lutx=True, block_t=bt, num_warps=nw, maxnreg=0, prefetch=pf))
               for pf in (False, True) for bt in (16, 32, 64) for nw in (4, 8)]
    sweeps += [("fields", "head", dict(lutx=True, block_t=32, num_warps=4, maxnreg=128, prefetch=False))]
    sweeps += [("tiles", "token", dict(block_t=bt, value_correction=False)) for bt in (32, 64)]
    if sweep == "regs":  # second pass: prefetch x register cap x block (lutx), and the default launch
        sweeps = [("fields", "head", dict(lutx=True, block_t=bt, num_warps=4, maxnreg=mr, prefetch=pf))
                  for pf in (False, True) for bt in (32, 64) for mr in (128, 168)]
        sweeps += [("fields", "head", {})]
    if sweep == "occupancy":  # fewer warps per program and more splits (more resident programs per SM)
        sweeps = [("fields", "head", {})]
        sweeps += [("fields", "head", dict(num_splits=ns)) for ns in (132, 264, 528)]
        sweeps += [("fields", "head", dict(block_t=32, num_warps=2, maxnreg=mr, num_splits=ns))
                   for mr in (0, 128, 255) for ns in (None, 264)]
        sweeps += [("fields", "head", dict(block_t=bt, num_warps=2, maxnreg=0, num_splits=ns))
                   for bt in (16, 64) for ns in (None, 264)]
        sweeps += [("fields", "head", dict(block_t=32, num_warps=1, maxnreg=0, num_splits=ns)) for ns in (None, 264)]
    if sweep == "natural":  # the natural-order kernel (three wide dots per block) against the fields default
        sweeps = [("fields", "head", {})]
        sweeps += [("natural", "head", dict(block_t=bt, num_warps=nw, maxnreg=mr, reload=rl, wide_loads=wl))
                   for wl in (True, False) for rl in (False, True)
                   for bt, nw, mr in ((32, 2, 0), (64, 2, 0), (32, 4, 0), (64, 4, 0))]
    if sweep == "default":  # the default launch (natural kernel) against the fields kernel's default, same run
        sweeps = [("fields", "head", {}), ("natural", "head", {})]
    if sweep == "blocks":  # the natural kernel's default against larger blocks with more warps (Llama-3-8B shape)
        sweeps = [("natural", "head", {})]
        sweeps += [("natural", "head", dict(block_t=bt, num_warps=nw)) for bt, nw in ((64, 4), (64, 8), (128, 8))]
    if sweep in ("tokengroup", "tokengroup-mha"):  # token-group values (11 slots per row; 41 on the MHA shape): the
        # natural kernel's per-head runs of slots against the tiles kernel, and the natural kernel on head-group values
        sweeps = [("tiles", "token", {}), ("natural", "token", {}), ("natural", "head", {})]
    if sweep == "slots":
        sweeps = [("natural", grp, {}) for grp in ("head", "token", "head-0pct", "token-0pct")]
    if sweep in ("prefetch", "prefetch-mha"):  # the PTX prefetch of the next block (L1 / L2, the default) against
        # none: the natural kernel with both value groupings, the fields kernel (2-bit) with head-group values
        sweeps = [("natural", grp, dict(prefetch=pf)) for grp in ("head", "token") for pf in (False, "l1", "l2")]
        sweeps += [("fields", "head-2bit", dict(prefetch=pf)) for pf in (False, "l2")]
    if sweep == "d64":  # head_dim 64 (SmolLM2-135M shape): the natural kernel's launches against the tiles kernel
        sweeps = [("tiles", "head", {}), ("tiles", "token", {})]
        sweeps += [("natural", "head", dict(block_t=bt, num_warps=nw)) for bt, nw in ((32, 2), (64, 4), (128, 4),
                                                                                       (128, 8), (256, 4), (256, 8))]
    if sweep == "d256":  # head_dim 256 (Gemma-3-4B shape): the natural kernel's launches (default: 32-token blocks,
        # 4 warps) over blocks, warps, register caps, reloads and split counts, both value groupings
        sweeps = [("natural", grp, {}) for grp in ("head", "token")]
        sweeps += [("natural", "head", dict(block_t=bt, num_warps=nw)) for bt, nw in ((32, 2), (32, 8), (64, 4),
                                                                                       (64, 8), (128, 8))]
        sweeps += [("natural", "head", dict(maxnreg=mr)) for mr in (128, 168)]
        sweeps += [("natural", "head", dict(reload=True)), ("natural", "head", dict(wide_loads=False))]
        sweeps += [("natural", "head", dict(num_splits=ns)) for ns in (66, 264, 528)]
        sweeps += [("natural", "token", dict(block_t=bt, num_warps=nw)) for bt, nw in ((32, 2), (32, 8), (64, 8))]
    if sweep == "d256b":  # head_dim 256, second pass (after run 100: reload 1.20x, 66 splits 1.04-1.23x): reload
        # with split counts, both value groupings
        sweeps = [("natural", grp, dict(reload=rl)) for grp in ("head", "token") for rl in (False, True)]
        sweeps += [("natural", grp, dict(reload=True, num_splits=ns)) for grp in ("head", "token")
                   for ns in (33, 66, 132, 264)]
    if sweep == "d256c":  # head_dim 256, third pass (run 102's token-group values lost 5-11% at 4K-16K; run 104 found
        # a split count): reload and the split rule apart, token-group values, against run 98's launch (no reload,
        # four waves; run 103 counted its splits from the context, now from the quantized tokens as run 98 did)
        old = _run98_splits(int(sts[(3, "token")].n_q), batch * H)
        sweeps = [("natural", "token", dict(reload=False, num_splits=old)), ("natural", "token", dict(reload=False)),
                  ("natural", "token", {}), ("natural", "token", dict(num_splits=old))]
    refs = {grp: reference_decode_attention(q, st, D**-0.5).float() for (_, grp), st in sts.items()}
    for kernel, group, kw in sweeps:
        st = sts[(3, group)]
        nbytes, _ = storage_bytes_read(st, st.n_q)
        try:
            kn = dict(kernel=kernel)
            err = rel(kernels.decode_attention(q, st, D**-0.5, **kn, **kw).float(), refs[group])
            us = bench(lambda: kernels.decode_attention(q, st, D**-0.5, **kn, **kw))  # noqa: B023
        except Exception as e:  # noqa: BLE001
            log("diag fail", kernel, kw, repr(e)[:300])
            rows.append(dict(kernel=kernel, value_group=group, **kw, error=repr(e)[:300]))
            continue
        rows.append(dict(shape=shape, batch=batch, context=ctx, kernel=kernel, value_group=group, **kw,
                         latency_us=round(us, 2), gbps=round(nbytes / (us * 1e-6) / 1e9, 1), rel_err=err))
        log(rows[-1])
        no_best = ("d64", *D256_SWEEPS, "prefetch", "prefetch-mha")  # the decode rows keep the defaults
        if (kernel in ("fields", "natural") and sweep not in no_best and err < 1e-2
                and (best is None or us < best[0])):
            best = (us, dict(kw, **kn))
    if best is not None:
        KV_OPTS.clear()
        KV_OPTS.update(best[1])
        res["fields_launch"] = dict(best[1])
    del sts
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
def quant_speed(res):
    Hq, H, D = SHAPES["llama3-8b"]
    codec = synthetic_codec(H, D, 3, 0.01, "token")
    rope = synthetic_rope(D)
    T = 32768
    pos = torch.arange(T, device=DEV)[None]
    k, v = synthetic_kv(codec, rope, 1, T, pos, device=DEV)

    def run():
        st = LayerStorage(codec, rope, 0, 0, 1, torch.bfloat16, DEV, initial_capacity=T)
        kernels.quantize_append(st, k, v, pos)
        return st

    us = bench(run, rep=200)
    st = run()
    ref = LayerStorage(codec, rope, 0, 0, 1, torch.bfloat16, DEV, initial_capacity=T)
    torch.cuda.synchronize()
    t0 = time.time()
    ref.append_quantized(k, v, pos)
    torch.cuda.synchronize()
    ref_us = (time.time() - t0) * 1e6
    kmis = (st.k_codes[:, :, :T] != ref.k_codes[:, :, :T]).float().mean().item()
    vmis = (st.v_codes[:, :, :T] != ref.v_codes[:, :, :T]).float().mean().item()
    res["quantize_append"] = dict(shape="llama3-8b", tokens=T, kernel_us=round(us, 1), torch_codec_us=round(ref_us, 1),
                                  tokens_per_s=round(T / (us * 1e-6)), key_code_mismatch=kmis,
                                  value_code_mismatch=vmis,
                                  zero_equal=bool(torch.equal(st.v_zero[:, :, :T], ref.v_zero[:, :, :T])))
    log(res["quantize_append"])


# ---------------------------------------------------------------------------------------------------------------
def capacity_section(res, out_dir, mem_bytes):
    Hq, H, D = SHAPES["llama2-7b"]
    layers = 32
    weights = 6.74e9 * 2  # Llama-2-7B bf16 weights
    reserve = 2 * 2**30  # activations / workspace
    budget = mem_bytes - weights - reserve
    rows = []
    fp16_tok = layers * 2 * H * D * 2
    rows.append(dict(shape="llama2-7b", cache="fp16", bytes_per_token=fp16_tok,
                     max_context=int(budget // fp16_tok)))
    for b in BITS:
        _, _, sts, _ = fill_storages(1, H, D, 4096, [b], want_fp16=False)
        st = sts[b]
        per_layer = st.nbytes() / (st.n_s + st.n_q)  # allocated bytes (capacity == tokens here)
        rows.append(dict(shape="llama2-7b", cache=f"nuq{b}-1pct", bytes_per_token=round(per_layer * layers, 1),
                         effective_bits=round(effective_bits(st), 3),
                         max_context=int(budget // (per_layer * layers))))
        del sts
    res["capacity"] = dict(memory_bytes=mem_bytes, weights_bytes=weights, reserve_bytes=reserve, rows=rows)
    log(rows)
    # real 1M-token decode step, nuq2-1%: layer 0 filled through quantize_append, then all 32 layers
    ctx = 1 << 20
    step = {}
    try:
        t0 = time.time()
        _, _, sts, _ = fill_storages(1, H, D, ctx, [2], want_fp16=False, chunk=65536)
        step["fill_s_one_layer"] = round(time.time() - t0, 1)
        st0 = sts[2]
        q = torch.randn(1, Hq, 1, D, device=DEV).bfloat16()
        out = kernels.decode_attention(q, st0, D**-0.5, **KV_OPTS)
        step["finite"] = bool(torch.isfinite(out).all())
        step["layer_latency_us"] = round(bench(lambda: kernels.decode_attention(q, st0, D**-0.5, **KV_OPTS)), 1)
        # as generate runs a decode step: a CUDA-graph replay with the graph steps' default kernel (kernels.graphs)
        gk = kernels.decode_kernel(q, st0, graph=True)
        gout = kernels.decode_attention(q, st0, D**-0.5, kernel=gk)
        step["graph_kernel"] = gk
        step["graph_vs_eager_rel_diff"] = round(rel(gout.float(), out.float()), 5)
        step["layer_latency_graph_us"] = round(bench_graph(lambda: kernels.decode_attention(q, st0, D**-0.5,
                                                                                            kernel=gk)), 1)
        stores = [st0]
        # the other 31 layers: copies of layer 0's tensors (real allocations; filling each through the kernel would
        # only repeat the same work)
        for _ in range(layers - 1):
            s = LayerStorage(st0.codec, st0.rope, 1, 0, 1, torch.bfloat16, DEV, initial_capacity=ctx)
            for name in (*st0._fields(), "q_pos", "sink_k", "sink_v"):
                setattr(s, name, getattr(st0, name).clone())
            s.n_q, s.capacity = st0.n_q, st0.capacity
            stores.append(s)
        torch.cuda.synchronize()
        step["allocated_gib_all_layers"] = round(sum(s.nbytes() for s in stores) / 2**30, 2)
        step["gpu_memory_used_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)

        def all_layers():
            for s in stores:
                kernels.decode_attention(q, s, D**-0.5, **KV_OPTS)

        def all_layers_graph():
            for s in stores:
                kernels.decode_attention(q, s, D**-0.5, kernel=gk)

        step["all_layers_attention_ms"] = round(bench(all_layers, rep=500) / 1e3, 3)
        step["all_layers_attention_graph_ms"] = round(bench_graph(all_layers_graph, rep=100) / 1e3, 3)
        step["context"] = ctx
        step["eager_kernel"] = kernels.decode_kernel(q, st0, **KV_OPTS)
        step["cache"] = "nuq2-1pct (head-group values)"
    except Exception as e:  # noqa: BLE001
        step["error"] = repr(e)[:500]
        traceback.print_exc()
    torch.cuda.empty_cache()
    res["capacity"]["decode_1m"] = step
    log(step)


# ---------------------------------------------------------------------------------------------------------------
# generate's models: random weights of these shapes (name -> label, config fields; layers: the model's own). Llama
# configs unless the fields name a ``family``; Gemma-3-4B keeps its five sliding-window layers (1024 tokens) per global
# layer and its per-layer-type RoPE (linear x8 on the global layers), as the real model's config has them.
GEN_MODELS = {
    "llama3-8b": ("Llama-3-8B", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128)),
    "llama32-1b": ("Llama-3.2-1B", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                        tie_word_embeddings=True)),
    "gemma3-4b": ("Gemma-3-4B (text)", dict(family="gemma3", hidden_size=2560, intermediate_size=10240,
                                            num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
                                            head_dim=256, sliding_window=1024, vocab_size=262208,
                                            max_position_embeddings=131072 + 4096)),
}


def model_config(n_layers=None, shape="llama3-8b"):
    """The transformers config of ``shape`` (GEN_MODELS) with ``n_layers`` layers (None: the model's own)."""
    from transformers import Gemma3TextConfig, LlamaConfig

    fields = dict(GEN_MODELS[shape][1])
    family = fields.pop("family", "llama")
    fields["num_hidden_layers"] = n_layers or fields["num_hidden_layers"]
    if family == "gemma3":
        pattern = ["sliding_attention"] * 5 + ["full_attention"]
        fields["layer_types"] = [pattern[i % 6] for i in range(fields["num_hidden_layers"])]
        fields["rope_parameters"] = {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
        cfg = Gemma3TextConfig(**fields, torch_dtype="bfloat16")
    else:
        cfg = LlamaConfig(**fields, vocab_size=128256, max_position_embeddings=262144, rope_theta=500000.0,
                          torch_dtype="bfloat16")
    cfg._attn_implementation = "sdpa"
    return cfg


def random_model(n_layers=None, shape="llama3-8b"):
    """A random-weight model of ``shape`` (GEN_MODELS; Llama-3-8B by default), bf16 on the GPU."""
    from transformers import Gemma3ForCausalLM, LlamaForCausalLM

    cls = Gemma3ForCausalLM if GEN_MODELS[shape][1].get("family") == "gemma3" else LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(DEV):
        model = cls(model_config(n_layers, shape)).to(torch.bfloat16).eval()
    return model


def synthetic_nuq3_quantizer(model, n_layers, value_group="head", bits=3):
    """nuq3-1% (or ``bits``: nuq2/nuq4-1%) quantizer with synthetic codebooks for a random model of GEN_MODELS (1 sink,
    no fp16 window; head-group values by default, "token" for the calibration default)."""
    from kvquant.models import model_identity
    from kvquant.quantizer import Quantizer, QuantizerConfig

    qcfg = QuantizerConfig(bits=bits, outlier_fraction=0.01, n_sinks=1, recent_window=0, value_group=value_group)
    cfg = model.config
    return Quantizer(qcfg, model_identity(model), [
        synthetic_codec(cfg.num_key_value_heads, cfg.head_dim, bits, 0.01, value_group, seed=i)
        for i in range(n_layers)])


def step_parser(context: int) -> argparse.ArgumentParser:
    """The arguments shared by the decode-step profiling scripts (gpu_host_profile.py, gpu_profile_step.py)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--context", type=int, default=context)
    ap.add_argument("--layers", type=int, default=8)
    return ap


def step_setup(a):
    """(model, quantizer, prompt ids, result dict with env) of those scripts: a random Llama-3-8B-shaped model with
    ``a.layers`` layers, the synthetic nuq3-1% quantizer and an ``a.context``-token prompt; creates ``a.out``."""
    os.makedirs(a.out, exist_ok=True)
    model = random_model(a.layers)
    quant = synthetic_nuq3_quantizer(model, a.layers)
    ids = torch.randint(0, 32000, (1, a.context), device=DEV)
    return model, quant, ids, {"env": env_info(), "context": a.context, "layers": a.layers}


GEN_CACHES = ("dynamic", "static", "quanto-int4", "quanto-int2", "kvquant-nuq3-1pct-reference",
              "kvquant-nuq3-1pct-fused", "kvquant-nuq3-1pct-fused-eager", "kvquant-nuq3-1pct-tokengroup-fused",
              "kvquant-nuq3-1pct-fused-noprefetch", "kvquant-nuq3-1pct-fused-natural",
              "kvquant-nuq3-1pct-tokengroup-fused-natural")
# also accepted (not run by default): kvquant-nuq4-1pct-fused / kvquant-nuq2-1pct-fused and their -tokengroup-,
# -eager, -natural variants
# -fused: the library default on CUDA (fused kernels, decode steps as CUDA-graph replays); -fused-eager: the same
# kernels launched one by one (KVQUANT_CUDA_GRAPHS=0); -fused-eager-pairs: launched one by one with the pairs kernel
# where it applies (kernels.EAGER_PAIRS_MIN_TOKEN_HEADS = 0, at every head_dim it compiles for); -reference: the
# PyTorch path (KVQUANT_FUSED_DECODE=0);
# -noprefetch: the decode kernels without their PTX prefetch of the next block (kernels.PREFETCH_DEFAULT = False);
# -natural: the Triton natural kernel where the Gluon pairs kernel is the default (KVQUANT_PAIRS=0);
# -slidingref: sliding-window layers (Gemma 3) dequantized and attended with SDPA, as before the fifteenth session
# (kvquant_cache.SLIDING_LAYER_KERNELS = False; their default is the fused kernel, launched eagerly)
# (value_group "head"; -tokengroup-: token-group values, 11 slots per row, the calibration default)


def generate_section(res, contexts, n_layers=32, new_tokens=16, caches=GEN_CACHES, reps=2, batch=1,
                     shape="llama3-8b", eager_pairs_min=0):
    """tokens/s of ``model.generate`` (greedy, eager: ``disable_compile=True``) with each cache. A streamer stamps
    every new token after a device synchronisation; a row's step time is the median gap between tokens (the first
    decode step dropped). The caches run in turn, ``reps`` rounds (the host's speed drifts during a run: interleaving
    keeps the comparison side by side), and a row reports the faster round with both rounds' medians. Round r's prompt
    has ctx + 97 r tokens, so no key length repeats. ``shape``: the model (GEN_MODELS); ``n_layers`` None: its own.
    ``eager_pairs_min``: the -eager-pairs caches' EAGER_PAIRS_MIN_TOKEN_HEADS (0: every storage; higher keeps small
    ones, e.g. Gemma 3's sliding windows, on the eager default)."""
    from transformers import DynamicCache, QuantizedCache, StaticCache
    from transformers.generation.streamers import BaseStreamer

    from kvquant.cache import KVQuantCache, kvquant_cache
    from kvquant.calibration import cache_kwarg

    model = random_model(n_layers, shape)
    n_layers = model.config.num_hidden_layers
    kw = cache_kwarg(model)  # once, not inside the timed generate calls
    quants = {}  # (bits, value group) -> quantizer, built when a cache first asks for it
    prefetch_default = kernels.PREFETCH_DEFAULT
    eager_pairs_default = kernels.EAGER_PAIRS_MIN_TOKEN_HEADS
    eager_dims = kernels.EAGER_PAIRS_HEAD_DIMS
    sliding_default = kvquant_cache.SLIDING_LAYER_KERNELS
    rows = []

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):
            torch.cuda.synchronize()
            self.t.append(time.perf_counter())

        def end(self):
            pass

    def make_cache(name, max_len):
        os.environ["KVQUANT_FUSED_DECODE"] = "0" if name.endswith("-reference") else "1"
        os.environ["KVQUANT_CUDA_GRAPHS"] = "0" if name.endswith(("-eager", "-eager-pairs")) else "1"
        kernels.EAGER_PAIRS_MIN_TOKEN_HEADS = eager_pairs_min if name.endswith("-eager-pairs") else eager_pairs_default
        kernels.EAGER_PAIRS_HEAD_DIMS = kernels.PAIRS_HEAD_DIMS if name.endswith("-eager-pairs") else eager_dims
        os.environ["KVQUANT_PAIRS"] = "0" if name.endswith("-natural") else "1"
        kernels.PREFETCH_DEFAULT = False if name.endswith("-noprefetch") else prefetch_default  # read by each plan
        kvquant_cache.SLIDING_LAYER_KERNELS = False if name.endswith("-slidingref") else sliding_default
        if name == "dynamic":
            return DynamicCache(config=model.config)
        if name == "static":  # preallocated fp16 cache (no per-step concatenation)
            return StaticCache(config=model.config, max_cache_len=max_len)
        if name.startswith("quanto"):
            # transformers' QuantizedCache (quanto backend, per-token int groups of 64, 128-token fp16 residual)
            return QuantizedCache("quanto", model.config, nbits=int(name[-1]), q_group_size=64, residual_length=128)
        key = (int(name.split("-nuq")[1][0]), "token" if "-tokengroup-" in name else "head")
        if key not in quants:
            quants[key] = synthetic_nuq3_quantizer(model, n_layers, key[1], key[0])
        return KVQuantCache(quants[key], model)

    def run(name, ids, n_new):
        cache = make_cache(name, ids.shape[1] + n_new + 2)
        stamps = Stamps()
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), **{kw: cache},
                           max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, streamer=stamps,
                           disable_compile=True, pad_token_id=0)
        gaps = [b - a for a, b in zip(stamps.t[2:], stamps.t[3:])]  # t[0]: prompt, t[1]: first token (prefill)
        out = dict(step=sorted(gaps)[len(gaps) // 2], prefill=stamps.t[1] - t0,
                   gaps_ms=[round(g * 1e3, 1) for g in gaps])
        if isinstance(cache, KVQuantCache):  # which layers replayed graphs: a failed layer runs every step eagerly
            graphs = [getattr(layer.storage, "_decode_graph", None) for layer in cache.layers]
            out.update(graph_layers=sum(g is not None and g.graph is not None for g in graphs),
                       graph_failed_layers=sum(g is not None and g.failed for g in graphs),
                       graph_replays=sum(g.replays for g in graphs if g is not None),
                       decode_kernels=sorted(set().union(*(kernels.planned_kernels(layer.storage)
                                                           for layer in cache.layers))))
        return out

    for name in caches:  # warm-up (kernel compilation) on a short prompt
        try:
            run(name, torch.randint(0, 32000, (1, 600), device=DEV), 4)
        except Exception as e:  # noqa: BLE001
            log("warm-up failed", name, repr(e)[:300])
    for ctx in contexts:
        got = {name: [] for name in caches}
        for rnd in range(reps):
            # each round a different prompt length: a key length never repeats (cuDNN's SDPA caches a plan per shape,
            # and a repeated length would flatter the fp16 caches against real generation, where every step is new)
            ids = torch.randint(0, 32000, (batch, ctx + 97 * rnd), device=DEV)
            for name in caches:
                if time.time() > DEADLINE[0]:
                    log(f"deadline: skip generate {ctx} {name} round {rnd}")
                    continue
                try:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    r = run(name, ids, new_tokens)
                    r["peak"] = torch.cuda.max_memory_allocated() / 2**30
                    got[name].append(r)
                    log(ctx, name, rnd, r)
                except Exception as e:  # noqa: BLE001
                    got[name].append(dict(error=repr(e)[:400]))
                    traceback.print_exc()
        for name in caches:
            ok = [r for r in got[name] if "step" in r]
            if not ok:
                rows.append(dict(context=ctx, cache=name, error=(got[name] or [{"error": "not run"}])[0]["error"]))
                continue
            best = min(ok, key=lambda r: r["step"])
            rows.append(dict(context=ctx, cache=name, tokens_per_s=round(1 / best["step"], 2),
                             step_ms=round(best["step"] * 1e3, 2), step_ms_rounds=[round(r["step"] * 1e3, 2)
                                                                                   for r in ok],
                             prefill_s=round(best["prefill"], 2), layers=n_layers,
                             peak_mem_gib=round(max(r["peak"] for r in ok), 1),
                             round_details=[{k: v for k, v in r.items() if k not in ("step", "prefill", "peak")}
                                            for r in ok]))
    os.environ.pop("KVQUANT_FUSED_DECODE", None)
    os.environ.pop("KVQUANT_CUDA_GRAPHS", None)
    os.environ.pop("KVQUANT_PAIRS", None)
    kernels.PREFETCH_DEFAULT = prefetch_default
    kernels.EAGER_PAIRS_MIN_TOKEN_HEADS = eager_pairs_default
    kernels.EAGER_PAIRS_HEAD_DIMS = eager_dims
    kvquant_cache.SLIDING_LAYER_KERNELS = sliding_default
    res["generate"] = dict(model=f"random-weight {GEN_MODELS[shape][0]} shape (bf16)", layers=n_layers,
                           new_tokens=new_tokens, via="model.generate", rounds=reps, rows=rows, batch=batch,
                           shape=shape)


# ---------------------------------------------------------------------------------------------------------------
def calibration_section(res, n_windows=16, window=2048):
    """Calibration wall time on the GPU for a random-weight Llama-3-8B-shaped model (time only: random weights)."""
    from kvquant.calibration import CalibrationSettings, build_quantizer, collect_statistics
    from kvquant.quantizer import QuantizerConfig

    model = random_model()
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 32000, (n_windows, window), generator=g)
    torch.cuda.synchronize()
    t0 = time.time()
    stats = collect_statistics(model, windows, CalibrationSettings(outlier_fractions=(0.0, 0.01)), progress=False)
    torch.cuda.synchronize()
    t_stats = time.time() - t0
    t1 = time.time()
    for bits in BITS:
        build_quantizer(stats, QuantizerConfig(bits=bits, outlier_fraction=0.01))
    t_fit = time.time() - t1
    res["calibration"] = dict(model="random-weight Llama-3-8B shape (bf16, 32 layers)", windows=n_windows,
                              window=window, statistics_s=round(t_stats, 1), fit_s_nuq4_3_2=round(t_fit, 1),
                              total_s=round(t_stats + t_fit, 1),
                              peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))
    log(res["calibration"])
    del model, stats
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--sections", default="bw,diag,quant,decode,capacity,calib,generate")
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--gen-contexts", default="32768,131072")
    ap.add_argument("--gen-layers", type=int, default=None, help="generate: layers (default: the model's)")
    ap.add_argument("--gen-model", default="llama3-8b", choices=sorted(GEN_MODELS), help="generate: the model shape")
    ap.add_argument("--gen-batch", type=int, default=1, help="generate: sequences per batch (batch 1 is the report's)")
    ap.add_argument("--gen-caches", default=",".join(GEN_CACHES))
    ap.add_argument("--gen-rounds", type=int, default=2, help="generate: interleaved rounds over the caches")
    ap.add_argument("--gen-eager-pairs-min", type=int, default=0,
                    help="generate: EAGER_PAIRS_MIN_TOKEN_HEADS of the -eager-pairs caches (head_dim-128 token-heads)")
    ap.add_argument("--contexts", default="", help="comma list: only these decode contexts")
    ap.add_argument("--diag-sweep", default="full", help="comma list of: full, regs, occupancy, natural, default, "
                    "blocks, d64, d256 / d256b / d256c (Gemma-3-4B shape, batch 1 and 8), tokengroup, tokengroup-mha "
                    "(Llama-2-7B shape, batch 1), slots (nuq3 with and without outlier slots, both value groupings), "
                    "prefetch, prefetch-mha (the natural kernel's prefetch options)")
    ap.add_argument("--diag-contexts", type=lambda x: [int(c) for c in x.split(",")], default=[131072],
                    help="comma list: the contexts of the diag sweeps")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds after which decode combos are skipped")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    secs = args.sections.split(",")
    only_ctx = [int(c) for c in args.contexts.split(",")] if args.contexts else None
    res = {"env": env_info()}
    log(res["env"])
    t_start = time.time()
    DEADLINE[0] = t_start + args.deadline

    def save():
        with open(os.path.join(args.out, "gpu_suite.json"), "w") as f:
            json.dump(res, f, indent=1)

    res["copy_bandwidth_gbps"] = round(copy_bandwidth(), 1) if "bw" in secs else 4213.0
    log("copy bandwidth GB/s", res["copy_bandwidth_gbps"])
    for name, fn in (
        ("diag", lambda: [diag_section(res, res["copy_bandwidth_gbps"], ctx=c, sweep=sw, batch=b)
                          for c in args.diag_contexts for sw in args.diag_sweep.split(",")
                          for b in ((1, 8) if sw in ("d64", *D256_SWEEPS, "tokengroup", "prefetch") else (1,))]),
        ("quant", lambda: quant_speed(res)),
        ("capacity_first", None),
        ("decode", lambda: decode_section(res, res["copy_bandwidth_gbps"], args.shapes.split(","),
                                          [int(b) for b in args.batches.split(",")],
                                          only_ctx=only_ctx, on_context=save)),
        ("capacity", lambda: capacity_section(res, args.out, torch.cuda.get_device_properties(0).total_memory)),
        ("calib", lambda: calibration_section(res)),
        ("generate", lambda: generate_section(res, [int(c) for c in args.gen_contexts.split(",")],
                                              args.gen_layers, caches=args.gen_caches.split(","),
                                              batch=args.gen_batch, shape=args.gen_model, reps=args.gen_rounds,
                                              eager_pairs_min=args.gen_eager_pairs_min)),
    ):
        if fn is None:
            continue
        if name in secs:
            t0 = time.time()
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                res.setdefault("errors", {})[name] = repr(e)[:1000]
                traceback.print_exc()
            res.setdefault("section_s", {})[name] = round(time.time() - t0, 1)
            log(f"== {name} done in {time.time() - t0:.1f}s (total {time.time() - t_start:.0f}s)")
            save()
    save()
    # short table last
    log("\nchecks:")
    for c in res.get("checks", []):
        log(f"  {c}")
    log("\nshape ctx B method impl bits lat_us GB/s bw% speedup")
    for r in res.get("rows", []):
        log(f"{r['shape']} {r['context']} {r['batch']} {r['method']} {r['impl']} {r['bits']} {r['latency_us']} "
            f"{r['gbps']} {100 * r['bw_fraction']:.0f}% {r['speedup_vs_best_fp16']}x")


if __name__ == "__main__":
    main()
