"""How many splits the pairs kernel should use at short and medium contexts: one layer (Llama-3-8B shape), nuq3-1%,
head-group and token-group values, the whole decode call (pairs kernel, sinks split, reduce) timed as a CUDA-graph
replay for each split count, beside bf16 SDPA in the same process; the default (``_gluon.splits``) first.

    PYTHONPATH=src python benchmarks/gpu_splits_sweep.py [--contexts 4096,16384,65536] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_suite import bench_graph, env_info, fill_storages, rel, sdpa_graph_us  # noqa: E402

from kvquant import kernels  # noqa: E402
from kvquant.kernels import _gluon  # noqa: E402
from kvquant.kernels.reference import reference_decode_attention  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,16384,65536")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--splits", default="8,16,32,64,128,256")
    a = ap.parse_args()
    print(env_info())
    Hq, H, D = 32, 8, 128
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for ctx in (int(c) for c in a.contexts.split(",")):
        for B in (int(b) for b in a.batches.split(",")):
            q = torch.randn(B, Hq, 1, D, device="cuda").bfloat16()
            sdpa = sdpa_graph_us(q, H, ctx)
            default = _gluon.splits(ctx, B * H, sms)[0]
            print(f"{ctx} b{B}: SDPA bf16 {sdpa:.1f} us; default splits {default}", flush=True)
            for vg in ("head", "token"):
                _, _, sts, _ = fill_storages(B, H, D, ctx, [(3, vg)], frac=0.01, want_fp16=False)
                st = sts[(3, vg)]
                ref = reference_decode_attention(q, st, D**-0.5).float() if ctx <= 16384 else None
                for ns in [default] + [int(s) for s in a.splits.split(",") if int(s) != default]:
                    fn = (lambda q_=q, s_=st, n_=ns: kernels.decode_attention(q_, s_, D**-0.5, kernel="pairs",
                                                                             num_splits=n_))
                    err = f", rel err {rel(fn().float(), ref):.1e}" if ref is not None else ""
                    us = bench_graph(fn)
                    print(f"{ctx} b{B} {vg}-group splits {ns}: {us:.1f} us ({sdpa / us:.2f}x SDPA){err}", flush=True)
                sts = st = None
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
