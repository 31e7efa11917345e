"""Compile-only check (no GPU needed): a Gluon kernel that loads a tile straight into the tensor-core A-operand layout
(``DotOperandLayout`` of an ``mma.sync`` m16n8k16 layout), scales it in registers and runs ``mma_v2`` against an
[D, 8] operand, with no shared memory at all. It is the first step of the register-layout decode kernel planned in
benchmarks/gpu_notes.md (tokens as the MMA's M, 8 query heads as N). Compiled for sm_90 with the installed Triton
(Gluon exists from 3.6, the device's version); prints the shared memory and the PTX load / shared / MMA ops.

    PYTHONPATH=src python benchmarks/gluon_layout_check.py

Result (triton 3.6 and 3.9, 2026-11-30): 0 bytes of shared memory; 64 ld.global.b8 + 16 ld.global.b16 per thread
(one load per element here: the packed codes' word loads are the next step) and 8 mma.sync m16n8k16.
"""

from __future__ import annotations

import collections
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.ampere import mma_v2


@gluon.jit
def _tile_scores(X, Q, O, BT: gl.constexpr, D: gl.constexpr, N: gl.constexpr):
    """O [BT, N] = (0.5 * X [BT, D]) @ Q^T, X loaded as uint8 straight into the A-operand layout."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[2, 1], instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    r = gl.arange(0, BT, layout=gl.SliceLayout(1, a_l))
    c = gl.arange(0, D, layout=gl.SliceLayout(0, a_l))
    x = gl.load(X + r[:, None] * D + c[None, :]).to(gl.float16) * 0.5
    qk = gl.arange(0, D, layout=gl.SliceLayout(1, b_l))
    qn = gl.arange(0, N, layout=gl.SliceLayout(0, b_l))
    q = gl.load(Q + qn[None, :] * D + qk[:, None])
    acc = mma_v2(x, q, gl.zeros([BT, N], gl.float32, layout=mma))
    orow = gl.arange(0, BT, layout=gl.SliceLayout(1, mma))
    ocol = gl.arange(0, N, layout=gl.SliceLayout(0, mma))
    gl.store(O + orow[:, None] * N + ocol[None, :], acc)


def main():
    src = GluonASTSource(_tile_scores, {"X": "*u8", "Q": "*fp16", "O": "*fp32"},
                         constexprs={"BT": 64, "D": 64, "N": 8})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=2))
    ops = collections.Counter(re.findall(r"\b(ld\.global[.\w]*|st\.shared[.\w]*|ld\.shared[.\w]*|ldmatrix[.\w]*|"
                                         r"mma[.\w]*|bar\.sync)", k.asm["ptx"]))
    print(f"triton {triton.__version__}: shared memory {k.metadata.shared} B; PTX ops per thread:",
          ", ".join(f"{o} {n}" for o, n in ops.most_common()))


if __name__ == "__main__":
    main()
