import os, sys, torch
sys.path.insert(0, "benchmarks")
from gpu_suite import SHAPES, fill_storages
from kvquant import kernels
from kvquant.kernels import _gluon as G
from torch.profiler import profile, ProfilerActivity
Hq, H, D = SHAPES["gemma3-4b"]
for B in (1, 8):
    _, _, sts, _ = fill_storages(B, H, D, 131072, [(3, "head")], want_fp16=False)
    st = sts[(3, "head")]
    q = torch.randn(B, Hq, 1, D, device="cuda").bfloat16()
    for once in (True, False):
        G.SCORES_ONCE = once
        fn = lambda: kernels.decode_attention(q, st, D**-0.5, kernel="pairs")
        fn(); torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s): fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g): fn()
        flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        for mode in ("flush", "noflush"):
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(5):
                    if mode == "flush": flush.zero_()
                    g.replay()
                torch.cuda.synchronize()
            evs = [e for e in p.events() if e.device_type.name == "CUDA"]
            evs.sort(key=lambda e: e.time_range.start)
            print(f"b{B} scores_once={once} {mode}:")
            prev = None
            for e in evs[-8:]:
                gap = "" if prev is None else f" gap {e.time_range.start - prev:.1f}"
                print(f"   {e.name[:40]:40s} {e.time_range.elapsed_us():8.1f} us{gap}")
                prev = e.time_range.end
    sts = st = None; torch.cuda.empty_cache()
G.SCORES_ONCE = True
