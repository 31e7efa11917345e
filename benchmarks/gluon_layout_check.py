"""Compile-only study (no GPU needed) for the register-layout decode kernel planned in benchmarks/gpu_notes.md.

A Gluon kernel reads 3-bit key rows in today's storage format (core/packing.py: a 2-bit low plane, then a 1-bit high
plane) straight into the tensor-core A-operand layout of ``mma.sync`` m16n8k16, with the tokens as M and the channels
as K. The steps:
- each lane loads its tokens' low-plane words and high-plane half-words with 16-byte loads (layout ``wv``);
- it renames them to the A layout seen as [tokens, k-step, 16] (``l3``; a register permutation only);
- it extracts the 3-bit codes in place;
- it reshapes to [tokens, channels] (``assert_trivial``: no data movement);
- it runs ``mma_v2`` against 8 query heads as N.

The levels are the codes as plain integers, or (second variant) an 8-entry table looked up through
``gl.gather``. There is no affine or RoPE yet. It is compiled for sm_90 with the installed
Triton (Gluon exists from 3.6, the device's version). The script prints the shared memory, the PTX loads and MMAs per
thread, and the SASS opcode counts. Nothing here runs a kernel.

    PYTHONPATH=src python benchmarks/gluon_layout_check.py

Result (triton 3.6, 2026-11-30; BT 64, D 128, 2 warps: each thread holds 4 tokens x 32 channels):
- 0 bytes of shared memory;
- 12 ld.global.v4.b32 per thread, i.e. three 16-byte loads per token: 2 low-plane and 1 high-plane;
- 16 mma.sync;
- 1048 SASS instructions in all. The naive extraction is about 5.4 integer ops per element, plus an I2F per
  element.
- With the ``gl.gather`` table, the table is 2 KB of shared memory (it is stored once per program in a real
  kernel), with one ``LDS.U16`` and one address ``IMAD`` per element: 1432 SASS instructions. A table of fp16 pairs
  indexed by 6 bits would halve that.

A whole decode split built on this (keys, values, online softmax) is ``benchmarks/gluon_decode_study.py``.
"""

from __future__ import annotations

import collections
import os
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ptx_count import resource_usage, sass_ops  # noqa: E402


@gluon.jit
def _key_scores(KC, Q, O, LUT, stride_t, BT: gl.constexpr, D: gl.constexpr, N: gl.constexpr,
                GATHER: gl.constexpr):
    """O [BT, N] = levels(KC rows) [BT, D] @ Q^T [D, N]: levels = the codes as fp16 integers, or (GATHER) looked up
    in an 8-entry fp16 table LUT through gl.gather."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[2, 1], instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    # a_l (gl.to_linear_layout) seen as [BT, D/16 (k-step s), 16 (m)], channel c = 16 s + m
    l3: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [8, 0, 0], [0, 0, 8], [0, 1, 0], [0, 2, 0], [0, 4, 0], [32, 0, 0]],
        lane_bases=[[0, 0, 2], [0, 0, 4], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[16, 0, 0]], block_bases=[], shape=[BT, D // 16, 16])
    wl: gl.constexpr = gl.SliceLayout(2, l3)  # one word per (token, k-step), shared by the 4 lanes of a group
    wv: gl.constexpr = gl.DistributedLinearLayout(  # the same, k-steps in the fastest registers: 16-byte loads
        reg_bases=[[0, 1], [0, 2], [0, 4], [8, 0], [32, 0]], lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16, 0]], block_bases=[], shape=[BT, D // 16])
    t = gl.arange(0, BT, layout=gl.SliceLayout(1, wv))
    s = gl.arange(0, D // 16, layout=gl.SliceLayout(0, wv))
    w = gl.load(KC.to(gl.pointer_type(gl.int32)) + t[:, None] * (stride_t // 4) + s[None, :])  # low plane: bits 2m
    h = gl.load(KC.to(gl.pointer_type(gl.int16)) + t[:, None] * (stride_t // 2) + D // 8 + s[None, :]).to(gl.int32)
    w = gl.convert_layout(w, wl, assert_trivial=True)
    h = gl.convert_layout(h, wl, assert_trivial=True)  # high plane: bit m
    m = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, l3)))[None, :][:, None, :]
    code = ((w[:, :, None] >> (2 * m)) & 3) | (((h[:, :, None] >> m) & 1) << 2)
    if GATHER:  # an [8, D] table (the codebook repeated per channel): gl.gather lowers it to shared memory
        idx = gl.convert_layout(gl.reshape(code, [BT, D]), a_l, assert_trivial=True)
        tb: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [1, 2], [1, 0])
        tr = gl.arange(0, 8, layout=gl.SliceLayout(1, tb))
        tc = gl.arange(0, D, layout=gl.SliceLayout(0, tb))
        x = gl.gather(gl.convert_layout(gl.load(LUT + tr[:, None] + 0 * tc[None, :]), a_l), idx, 0)
    else:
        x = gl.convert_layout(gl.reshape(code.to(gl.float16), [BT, D]), a_l, assert_trivial=True)
    qk = gl.arange(0, D, layout=gl.SliceLayout(1, b_l))
    qn = gl.arange(0, N, layout=gl.SliceLayout(0, b_l))
    acc = mma_v2(x, gl.load(Q + qn[None, :] * D + qk[:, None]), gl.zeros([BT, N], gl.float32, layout=mma))
    orow = gl.arange(0, BT, layout=gl.SliceLayout(1, mma))
    ocol = gl.arange(0, N, layout=gl.SliceLayout(0, mma))
    gl.store(O + orow[:, None] * N + ocol[None, :], acc)


def report(name, k):
    ops = collections.Counter(re.findall(r"\b(ld\.global[.\w]*|st\.shared[.\w]*|ld\.shared[.\w]*|ldmatrix[.\w]*|"
                                         r"mma[.\w]*|bar\.sync)", k.asm["ptx"]))
    sass = sass_ops(k.asm["cubin"])
    print(f"{name} (triton {triton.__version__}): shared memory {k.metadata.shared} B, "
          f"{resource_usage(k.asm['cubin'])}; PTX per thread: " + ", ".join(f"{o} {n}" for o, n in ops.most_common()))
    print(f"   SASS {sum(sass.values())} instructions: " + ", ".join(f"{o} {n}" for o, n in sass.most_common(14)))


def main():
    div16 = [["tt.divisibility", 16]]
    target = GPUTarget("cuda", 90, 32)
    for gather in (False, True):
        src = GluonASTSource(_key_scores, {"KC": "*u8", "Q": "*fp16", "O": "*fp32", "LUT": "*fp16", "stride_t": "i32"},
                             constexprs={"BT": 64, "D": 128, "N": 8, "GATHER": gather},
                             attrs={(0,): div16, (4,): div16})
        report("gl.gather table" if gather else "codes as integers",
               triton.compile(src, target=target, options=dict(num_warps=2)))


if __name__ == "__main__":
    main()
