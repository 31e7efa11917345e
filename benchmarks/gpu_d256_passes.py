"""head_dim 256's two launches (the scores pass, then the value pass; _gluon.SCORES_ONCE) against one launch of two
programs per split, each computing all the scores: Gemma-3-4B heads (8 query over 4 KV), nuq3-1% head-group values,
128K, batch 1 and 8, every row a CUDA-graph replay timed with an L2 flush before each (gpu_suite.bench_graph), all in
one process on one storage per batch: both passes, each pass alone (``_gluon.PASSES``; its output is then wrong, only
its time counts), and the two passes at other split counts.

    PYTHONPATH=src python benchmarks/gpu_d256_passes.py [--contexts 131072] [--batches 1,8] [--splits 128,512]
        [--group head] [--bits 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_suite import SHAPES, bench_graph, env_info, fill_storages, rel, sdpa_graph_us  # noqa: E402

from kvquant import kernels  # noqa: E402
from kvquant.kernels import _gluon as G  # noqa: E402
from kvquant.kernels.reference import reference_decode_attention  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--splits", default="", help="extra split counts for the two passes, e.g. 128,512")
    ap.add_argument("--group", default="head", choices=["head", "token"])
    ap.add_argument("--bits", type=int, default=3, choices=[2, 3, 4])
    ap.add_argument("--rounds", type=int, default=2, help="the variants, interleaved, this many times")
    a = ap.parse_args()
    print(env_info())
    Hq, H, D = SHAPES["gemma3-4b"]
    variants = [("one launch", False, None, None), ("two passes", True, None, None),
                ("scores pass alone", True, (1,), None), ("value pass alone", True, (2,), None)]
    variants += [(f"two passes, {n} splits", True, None, int(n)) for n in a.splits.split(",") if n]
    for ctx in (int(c) for c in a.contexts.split(",")):
        for B in (int(b) for b in a.batches.split(",")):
            q = torch.randn(B, Hq, 1, D, device="cuda").bfloat16()
            sdpa = sdpa_graph_us(q, H, ctx)
            _, _, sts, _ = fill_storages(B, H, D, ctx, [(a.bits, a.group)], want_fp16=False)
            st = sts[(a.bits, a.group)]
            ref = reference_decode_attention(q, st, D**-0.5).float() if ctx * B <= 131072 else None
            print(f"{ctx} b{B}: SDPA bf16 {sdpa:.1f} us", flush=True)
            for rnd in range(a.rounds):
                for name, once, passes, splits in variants:
                    G.SCORES_ONCE, G.PASSES = once, passes
                    try:
                        kw = dict(kernel="pairs", num_splits=splits)
                        err = "" if ref is None or passes else \
                            f", error {rel(kernels.decode_attention(q, st, D**-0.5, **kw).float(), ref):.2e}"
                        us = bench_graph(lambda q=q, st=st, kw=kw: kernels.decode_attention(q, st, D**-0.5, **kw))
                        print(f"{ctx} b{B} nuq{a.bits} {a.group}-group round {rnd}: {name}: {us:.1f} us "
                              f"({sdpa / us:.3f}x SDPA){err}", flush=True)
                    finally:
                        G.SCORES_ONCE, G.PASSES = True, None
            sts = st = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
