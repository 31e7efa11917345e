"""Launch variants of the pairs kernel's decode call, side by side as CUDA-graph replays timed with an L2 flush
before each (gpu_suite.bench_graph), in one process on one storage per batch, rounds interleaved: the split merge
reading a few splits at a time (the default) or all at once (``kernels.REDUCE_CHUNKS``); at head_dim 256 also the two
launches (the scores pass, then the value pass; ``_gluon.SCORES_ONCE``) against one launch of two programs per split,
each computing all the scores, each pass alone (``_gluon.PASSES``; its output is then wrong, only its time counts),
and the two passes at other split counts; the split merge over fewer channels per program (``kernels.REDUCE_DC``).
nuq3-1% (``--bits``), head-group values (``--group``), 128K (``--contexts``).
The "default" row is the library's choice: at head_dim 256 one launch below ``_gluon.SCORES_ONCE_MIN_TOKEN_HEADS``
(since d882fff; runs 128-134 predate it and took two passes at every size).

    PYTHONPATH=src python benchmarks/gpu_launch_variants.py [--shape gemma3-4b] [--contexts 131072] [--batches 1,8]
        [--splits 128,512] [--group head] [--bits 3] [--rounds 2] [--reduce-dc 32,16] [--only-merge]
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

KNOBS = ((G, "SCORES_ONCE"), (G, "PASSES"), (kernels, "REDUCE_CHUNKS"), (kernels, "REDUCE_DC"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gemma3-4b", choices=sorted(SHAPES))
    ap.add_argument("--contexts", default="131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--splits", default="", help="head_dim 256: extra split counts for the two passes, e.g. 128,512")
    ap.add_argument("--group", default="head", choices=["head", "token"])
    ap.add_argument("--bits", type=int, default=3, choices=[2, 3, 4])
    ap.add_argument("--rounds", type=int, default=2, help="the variants, interleaved, this many times")
    ap.add_argument("--reduce-dc", default="", help="extra split-merge widths (kernels.REDUCE_DC), e.g. 32,16")
    ap.add_argument("--only-merge", action="store_true", help="only the default and the --reduce-dc variants")
    a = ap.parse_args()
    print(env_info())
    Hq, H, D = SHAPES[a.shape]
    default = {name: getattr(mod, name) for mod, name in KNOBS}
    variants = [("default", {}, None), ("split merge all at once", dict(REDUCE_CHUNKS=False), None)]
    if D == 256:
        variants += [("one launch", dict(SCORES_ONCE=False), None),
                     ("one launch, split merge all at once", dict(SCORES_ONCE=False, REDUCE_CHUNKS=False), None),
                     ("scores pass alone", dict(PASSES=(1,)), None), ("value pass alone", dict(PASSES=(2,)), None)]
        variants += [(f"two passes, {n} splits", {}, int(n)) for n in a.splits.split(",") if n]
    if a.only_merge:
        variants = variants[:1]
    variants += [(f"split merge over {n} channels", dict(REDUCE_DC=int(n)), None) for n in a.reduce_dc.split(",") if n]
    for ctx in (int(c) for c in a.contexts.split(",")):
        for B in (int(b) for b in a.batches.split(",")):
            q = torch.randn(B, Hq, 1, D, device="cuda").bfloat16()
            sdpa = sdpa_graph_us(q, H, ctx)
            _, _, sts, _ = fill_storages(B, H, D, ctx, [(a.bits, a.group)], want_fp16=False)
            st = sts[(a.bits, a.group)]
            ref = reference_decode_attention(q, st, D**-0.5).float() if ctx * B <= 131072 else None
            print(f"{a.shape} {ctx} b{B}: SDPA bf16 {sdpa:.1f} us", flush=True)
            for rnd in range(a.rounds):
                for name, knobs, splits in variants:
                    for mod, knob in KNOBS:
                        setattr(mod, knob, knobs.get(knob, default[knob]))
                    try:
                        kw = dict(kernel="pairs", num_splits=splits)
                        err = "" if ref is None or "PASSES" in knobs else \
                            f", error {rel(kernels.decode_attention(q, st, D**-0.5, **kw).float(), ref):.2e}"
                        us = bench_graph(lambda q=q, st=st, kw=kw: kernels.decode_attention(q, st, D**-0.5, **kw))
                        print(f"{a.shape} {ctx} b{B} nuq{a.bits} {a.group}-group round {rnd}: {name}: {us:.1f} us "
                              f"({sdpa / us:.3f}x SDPA){err}", flush=True)
                    finally:
                        for mod, knob in KNOBS:
                            setattr(mod, knob, default[knob])
            sts = st = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
