"""Where the library's pairs kernel spends its time: one layer at 128K (Llama-3-8B shape or ``--shape``, batch 1 and
8), nuq3 (or ``--bits 2`` / ``--bits 4``) storage with 1% outlier slots and without (head-group values; ``--groups
head,token`` adds token-group values, the calibration default), the pairs kernel beside the natural kernel and bf16
SDPA, all timed as CUDA-graph replays in one process; each kvquant row checked against the float reference at 4K
first.

    PYTHONPATH=src python benchmarks/gpu_pairs_probe.py [--contexts 131072] [--batches 1,8] [--groups head,token]
        [--bits 3]
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
    ap.add_argument("--contexts", default="131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--groups", default="head", help="value groupings: head, token or both")
    ap.add_argument("--bits", type=int, default=3, choices=[2, 3, 4])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES), help="query heads, KV heads, head_dim")
    ap.add_argument("--frac", type=float, default=0.01, help="--variants: the storage's outlier fraction (0: no slots)")
    ap.add_argument("--variants", default=None, help="register cap and programs per SM, e.g. none:8,168:12 (the "
                    "pairs kernel alone at each, per grouping, on one filled storage; head:/token: prefixes "
                    "restrict a variant to one grouping)")
    ap.add_argument("--key-slots", default="tile", help="--variants at head_dim 256: the key slots through the "
                    "per-chunk tile, merged into every key register, or both: tile,merge (_gluon.KEY_SLOT_TILE; run "
                    "121 also timed the tile with the table loads after its stores, since removed)")
    ap.add_argument("--scores-once", default="1", help="--variants at head_dim 256: the scores pass and the value "
                    "pass in two launches (1, _gluon.SCORES_ONCE), one launch of two programs per split each computing "
                    "all the scores (0), or both: 1,0")
    a = ap.parse_args()
    if a.variants:
        return variants(a)
    bits = a.bits
    groups = a.groups.split(",")
    print(env_info())
    Hq, H, D = SHAPES[a.shape]
    print(f"shape {a.shape}: {Hq} query heads, {H} KV heads, head_dim {D}")
    for vg in groups:
        for frac in (0.01, 0.0):  # correctness at 4K, both kernels
            _, _, sts, _ = fill_storages(2, H, D, 4096, [(bits, vg)], frac=frac, want_fp16=False)
            st = sts[(bits, vg)]
            q = torch.randn(2, Hq, 1, D, device="cuda").bfloat16()
            ref = reference_decode_attention(q, st, D**-0.5).float()
            for kernel in ("pairs", "natural"):
                err = rel(kernels.decode_attention(q, st, D**-0.5, kernel=kernel).float(), ref)
                print(f"check 4K batch 2 nuq{bits} {vg}-group slots {frac}: {kernel} relative error {err:.2e}")
    for ctx in (int(c) for c in a.contexts.split(",")):
        for B in (int(b) for b in a.batches.split(",")):
            q = torch.randn(B, Hq, 1, D, device="cuda").bfloat16()
            sdpa = sdpa_graph_us(q, H, ctx)
            print(f"{ctx} b{B}: SDPA bf16 {sdpa:.1f} us")
            for vg, frac in ((vg, frac) for vg in groups for frac in (0.01, 0.0)):
                _, _, sts, _ = fill_storages(B, H, D, ctx, [(bits, vg)], frac=frac, want_fp16=False)
                st = sts[(bits, vg)]
                for kernel in ("pairs", "natural"):
                    us = bench_graph(lambda q_=q, s_=st, k_=kernel: kernels.decode_attention(q_, s_, D**-0.5,
                                                                                            kernel=k_))
                    print(f"{ctx} b{B} nuq{bits} {vg}-group slots {frac}: {kernel} {us:.1f} us ({sdpa / us:.2f}x SDPA)")
                sts = st = None
                torch.cuda.empty_cache()



def _last_compiled(fn, keep=lambda c: True):
    """(registers, spilled registers, shared bytes) of the kernel's most recent compilation (Triton's per-device
    cache) among those ``keep`` accepts."""
    try:
        last = [c for dc in fn.device_caches.values() for c in dc[0].values() if keep(c)][-1]
        return last.n_regs, last.n_spills, last.metadata.shared
    except (AttributeError, IndexError, TypeError):
        return None, None, None


def variants(a):
    """The pairs kernel under register caps (ptxas spills to local memory) and the matching number of resident
    programs per SM (the split rule fills one wave of them), nuq{bits}-1%, one storage per grouping."""
    from kvquant.kernels import _gluon as G

    knobs = G.MAXNREG, G.PROGRAMS_PER_SM, G.KEY_SLOT_TILE, G.SCORES_ONCE  # restored after each storage's variants
    print(env_info())
    Hq, H, D = SHAPES[a.shape]
    specs = []
    for v in a.variants.split(","):
        *grp, reg, per = v.split(":")  # [grouping:]register cap:programs per SM
        for ks in a.key_slots.split(","):
            for once in a.scores_once.split(","):
                specs.append((grp[0] if grp else "", None if reg == "none" else int(reg), int(per), ks == "tile",
                              once == "1"))
    for vg in a.groups.split(","):
        _, _, sts, _ = fill_storages(2, H, D, 4096, [(a.bits, vg)], frac=a.frac, want_fp16=False)
        st4 = sts[(a.bits, vg)]
        q4 = torch.randn(2, Hq, 1, D, device="cuda").bfloat16()
        ref = reference_decode_attention(q4, st4, D**-0.5).float()
        for ctx in (int(c) for c in a.contexts.split(",")):
            for B in (int(b) for b in a.batches.split(",")):
                q = torch.randn(B, Hq, 1, D, device="cuda").bfloat16()
                sdpa = sdpa_graph_us(q, H, ctx)
                _, _, sts, _ = fill_storages(B, H, D, ctx, [(a.bits, vg)], frac=a.frac, want_fp16=False)
                st = sts[(a.bits, vg)]
                print(f"{ctx} b{B}: SDPA bf16 {sdpa:.1f} us")
                for grp, reg, per, tile, once in specs:
                    if grp and grp != vg:
                        continue
                    G.MAXNREG, G.PROGRAMS_PER_SM, G.KEY_SLOT_TILE, G.SCORES_ONCE = reg, per, tile, once
                    err = rel(kernels.decode_attention(q4, st4, D**-0.5, kernel="pairs").float(), ref)
                    us = bench_graph(lambda q_=q, s_=st: kernels.decode_attention(q_, s_, 0.088, kernel="pairs"))
                    on = G.key_slot_tile(D, int(st.k_out_idx.shape[-1]))
                    ktile = "tile" if on else "merge"
                    # (this variant's compilation: the key tile's bytes are what its shared memory has beyond the
                    # tables and the value tile)
                    regs, spills, shared = _last_compiled(G._pairs_kernel, lambda c, on=on: (
                        c.metadata.shared - G.TABLE_SHARED_BYTES) % G.TILE_BYTES == G.KTILE_BYTES * on)
                    print(f"{ctx} b{B} nuq{a.bits} {vg}-group slots {a.frac}: pairs maxnreg={reg} programs/SM={per} "
                          f"key slots {ktile} " + (f"scores once {int(once)} " if D == 256 else "") +
                          f"{us:.1f} us ({sdpa / us:.3f}x SDPA), 4K check {err:.2e}, {regs} registers, "
                          f"{spills} spilled, {shared} B shared", flush=True)
                G.MAXNREG, G.PROGRAMS_PER_SM, G.KEY_SLOT_TILE, G.SCORES_ONCE = knobs
                sts = st = None
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
