"""How many splits the pairs kernel should use at short and medium contexts: one layer (Llama-3-8B shape, or
``--shape``), nuq3-1% (``--bits``), head-group and token-group values, the whole decode call (pairs kernel, sinks
split, reduce) timed as a CUDA-graph replay for each split count, beside bf16 SDPA in the same process; the default
(``_gluon.splits``) first; ``--natural``: the natural kernel at its default launch too.

    PYTHONPATH=src python benchmarks/gpu_splits_sweep.py [--contexts 4096,16384,65536] [--batches 1,8] \
        [--shape gemma3-4b] [--bits 3,2] [--natural]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_suite import SHAPES, bench_graph, env_info, fill_storages, rel, sdpa_graph_us  # noqa: E402

from kvquant import kernels  # noqa: E402
from kvquant.kernels.reference import reference_decode_attention  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,16384,65536")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--splits", default="8,16,32,64,128,256")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--bits", default="3")
    ap.add_argument("--natural", action="store_true", help="the natural kernel's default launch beside")
    a = ap.parse_args()
    print(env_info(), a.shape)
    Hq, H, D = SHAPES[a.shape]
    for ctx in (int(c) for c in a.contexts.split(",")):
        for B in (int(b) for b in a.batches.split(",")):
            q = torch.randn(B, Hq, 1, D, device="cuda").bfloat16()
            sdpa = sdpa_graph_us(q, H, ctx)
            default = kernels._kernel_splits("pairs", ctx - 1, B * H, q.device, 32, D)[0]
            print(f"{ctx} b{B}: SDPA bf16 {sdpa:.1f} us; default splits {default}", flush=True)
            for bits, vg in [(int(b), vg) for b in a.bits.split(",") for vg in ("head", "token")]:
                _, _, sts, _ = fill_storages(B, H, D, ctx, [(bits, vg)], frac=0.01, want_fp16=False)
                st = sts[(bits, vg)]
                ref = reference_decode_attention(q, st, D**-0.5).float() if ctx <= 16384 else None
                nat = kernels._kernel_splits("natural", st.n_q, B * H, q.device, 32, D)[0]
                runs = [(f"natural (default launch, {nat} splits)", dict(kernel="natural"))] if a.natural else []
                runs += [(f"splits {ns}", dict(kernel="pairs", num_splits=ns))
                         for ns in [default] + [int(s) for s in a.splits.split(",") if int(s) != default]]
                for label, kw in runs:
                    fn = (lambda q_=q, s_=st, k_=kw: kernels.decode_attention(q_, s_, D**-0.5, **k_))
                    err = f", rel err {rel(fn().float(), ref):.1e}" if ref is not None else ""
                    us = bench_graph(fn)
                    print(f"{ctx} b{B} nuq{bits} {vg}-group {label}: {us:.1f} us ({sdpa / us:.2f}x SDPA){err}",
                          flush=True)
                sts = st = None
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
