"""Run 131: the kernels of one decode_attention call as CUDA-graph replays, from torch.profiler (CUPTI), with and
without a 256 MB L2 flush before each replay (Gemma-3-4B heads, nuq3-1% head-group, 128K, batch 1 and 8, head_dim
256's two passes and one launch). Run from the repository root with PYTHONPATH=src:benchmarks. (Reformatted after
the run; the same statements.)"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "benchmarks")
from gpu_suite import SHAPES, fill_storages  # noqa: E402

from kvquant import kernels  # noqa: E402
from kvquant.kernels import _gluon as G  # noqa: E402

Hq, H, D = SHAPES["gemma3-4b"]
for B in (1, 8):
    _, _, sts, _ = fill_storages(B, H, D, 131072, [(3, "head")], want_fp16=False)
    st = sts[(3, "head")]
    q = torch.randn(B, Hq, 1, D, device="cuda").bfloat16()
    for once in (True, False):
        G.SCORES_ONCE = once

        def fn(q=q, st=st):
            return kernels.decode_attention(q, st, D**-0.5, kernel="pairs")

        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            fn()
        flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        for mode in ("flush", "noflush"):
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(5):
                    if mode == "flush":
                        flush.zero_()
                    g.replay()
                torch.cuda.synchronize()
            evs = sorted((e for e in p.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
            print(f"b{B} scores_once={once} {mode}:")
            prev = None
            for e in evs[-8:]:
                gap = "" if prev is None else f" gap {e.time_range.start - prev:.1f}"
                print(f"   {e.name[:40]:40s} {e.time_range.elapsed_us():8.1f} us{gap}")
                prev = e.time_range.end
    sts = st = None
    torch.cuda.empty_cache()
G.SCORES_ONCE = True
