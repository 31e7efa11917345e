"""Nsight Compute view of the fused decode-attention kernels at long context (run on the H200 through the device tool).

    PYTHONPATH=src ncu --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \\
        --section SpeedOfLight --section SourceCounters -k regex:_kvq_decode_ -c 64 \\
        python3 benchmarks/gpu_ncu.py [--ctx 131072] [--configs JSON] [--group head|token]

Fills one Llama-3-8B-shaped layer (8 KV heads, head_dim 128, batch 1 or ``--batch``; ``--shape`` for another),
nuq3-1% or ``--bits 2|4``, head-group values, or token-group values with ``--group token``, through the real append
kernel, then launches
``decode_attention`` twice per launch configuration (the first launch compiles; both are profiled, in order).
``--configs`` is a JSON list of keyword dicts for ``kernels.decode_attention``. Without ncu it prints each
configuration's latency (triton's do_bench) and error against the reference, so a run shows which profile belongs to
which configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import gpu_suite as S  # noqa: E402

from kvquant import kernels  # noqa: E402
from kvquant.kernels.reference import reference_decode_attention  # noqa: E402

DEFAULT = [{}, {"kernel": "natural", "block_t": 32, "num_warps": 2, "maxnreg": 0}]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--configs", default=json.dumps(DEFAULT))
    ap.add_argument("--time", action="store_true", help="also time each configuration (do not use under ncu)")
    ap.add_argument("--group", default="head", choices=["head", "token"], help="value grouping of the storage")
    ap.add_argument("--bits", type=int, default=3, choices=[2, 3, 4], help="code width of the storage")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(S.SHAPES), help="query heads, KV heads, head_dim")
    ap.add_argument("--frac", type=float, default=0.01, help="outlier fraction of the storage (0: no slots)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--scores-once", type=int, default=None, choices=[0, 1], help="head_dim 256: the pairs kernel's "
                    "scores pass and value pass in two launches (1) or one launch computing the scores twice (0); "
                    "default: the library's (_gluon.SCORES_ONCE)")
    a = ap.parse_args()
    if a.scores_once is not None:
        from kvquant.kernels import _gluon

        _gluon.SCORES_ONCE = bool(a.scores_once)
    Hq, H, D = S.SHAPES[a.shape]
    _, _, sts, _ = S.fill_storages(a.batch, H, D, a.ctx, [(a.bits, a.group)], want_fp16=False, frac=a.frac)
    st = sts[(a.bits, a.group)]
    q = torch.randn(a.batch, Hq, 1, D, device=S.DEV).bfloat16()
    ref = reference_decode_attention(q, st, D**-0.5).float()
    for i, kw in enumerate(json.loads(a.configs)):
        for _ in range(2):
            out = kernels.decode_attention(q, st, D**-0.5, **kw)
        torch.cuda.synchronize()
        line = dict(config=i, **kw, rel_err=S.rel(out.float(), ref))
        if a.time:
            line["latency_us"] = round(S.bench(lambda: kernels.decode_attention(q, st, D**-0.5, **kw)), 1)  # noqa: B023
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
