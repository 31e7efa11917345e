"""Study (not part of the library yet): the Gluon decode split of ``gluon_decode_study.py`` rebuilt around pair
tables, for the same simplest storage (3-bit head-group keys and values, head_dim 128, no outlier slots, contiguous
positions, no mask). It writes split-K partials [KV head, query head, split, D] that the library's reduce kernel
merges.

What changes against ``gluon_decode_study.py`` (run 36: about 250 us at 128K, 3716 SASS instructions per block):
- **Pair tables in shared memory.** Two neighbouring codes of an MMA operand register (two channels of a key, two
  channels of a value before the transpose) form a 6-bit index from their low-plane and high-plane bits, read in
  place from the packed words (two funnel shifts and two ``lop3``). One ``LDS`` from a 64-entry table of fp16 pairs
  gives both levels. The table is replicated per lane (entry e of lane l at word 32 e + l): any index pattern is
  free of bank conflicts. The looked-up word is the MMA operand register itself (no unpack and repack).
- **Channel order inside an MMA chunk** chosen so that a thread's channels are neighbours in the packed words (keys:
  4 channels of a thread in one byte of the low plane; values: 2 channels per word).
- **Values** are looked up as channel pairs of a token, like keys, and ``movmatrix.trans`` turns each register into
  the token pair that the V^T operand needs.
- **fp16x2 arithmetic** (inline PTX ``fma.rn.f16x2``): the per-channel key scale/zero and RoPE, two elements per
  instruction. The keys' RoPE angles come from a [block offset, channel pair] table stored in the order the threads
  hold it (one 128-byte line per warp-wide load). The query is rotated by the split's first position once, then by
  each block's offset from a small [block, chunk, cos/sin] table: no MUFU in the loop.
- **Loads**: key rows as 16-byte loads, high-plane codes as 32-bit words, and a PTX prefetch of the next block's
  rows into L2.

Measured on an H200 (benchmarks/gpu_runs/run37..run47, notes in gpu_notes.md): run 44, 106.4 us alone at 128K for
the Llama-3-8B shape; with the reduce, in one CUDA graph, 1.19-1.24x bf16 SDPA at 32K-512K for the Llama-3-8B and
Llama-2-7B shapes. Static (triton 3.6, sm_90): 246 registers, no spills, 16 KB of shared memory, hot loop 1504 SASS
instructions per 32-token block and warp.

``SLOTS`` adds nuq3-1%'s one outlier slot per key and value vector (score corrections for keys, shared-memory
atomics for values; 8 KB more shared memory): correct, but 199 us at 128K (run 47), 0.63-0.75x SDPA. ``SLOTS 2``
(slots holding the residual, no code lookup at decode time) compiles and has not run.

    PYTHONPATH=src python benchmarks/gluon_decode_pairs.py          # compile for sm_90, print static SASS counts
    PYTHONPATH=src python benchmarks/gluon_decode_pairs.py --mirror # CPU: the tables and index math in PyTorch
    PYTHONPATH=src python benchmarks/gluon_decode_pairs.py --run    # CUDA: check against PyTorch, time at 128K
                                                                    #   (--quick: without the older kernels)
    PYTHONPATH=src python benchmarks/gluon_decode_pairs.py --sweep  # CUDA: 32K-512K, two shapes, against SDPA
    ncu ... python benchmarks/gluon_decode_pairs.py --profile 1,0,128 --pf 2   # one variant, launched twice

The shared tables (and the slot buffer) are read through inline PTX at the address of Triton's dynamic shared memory
(symbol ``global_smem``): Gluon 3.6 has no indexed shared-memory load. The kernel therefore keeps its allocations
alive to the end, the host checks that they are all the shared memory there is, and ``--run`` checks the results.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gluon_decode_study import _chunk, _cos_sin, make_case, reference  # noqa: E402
from ptx_count import resource_usage, sass_loop  # noqa: E402

BT, D, N = 32, 128, 8
SIG = {"KC": "*u8", "VC": "*u8", "VS": "*fp16", "VZ": "*fp16", "KSZ": "*i32", "TAB": "*i32", "KS": "*fp16",
       "KZ": "*fp16", "KLUT": "*fp16", "VLUT": "*fp16", "KOI": "*u8", "KOV": "*fp16", "VOI": "*u8", "VOV": "*fp16",
       "CSP": "*i32", "BROT": "*fp32", "INVF": "*fp32", "Q": "*fp16", "PACC": "*fp32", "PM": "*fp32", "PL": "*fp32",
       "n_tok": "i32", "chunk": "i32", "pos0": "i32", "qk_scale": "fp32", "skc": "i32", "svc": "i32", "skh": "i64",
       "svh": "i64", "NSPLIT": "i32", "G": "i32"}


# ---------------------------------------------------------------------------------------------------- fp16x2 helpers
@gluon.jit
def _hfma2(a, b, c):
    return gl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _hadd2(a, b):
    return gl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=gl.int32, is_pure=True,
                                     pack=1)


@gluon.jit
def _slot_add(lev, rel, pair, add):
    """lev + add (fp16 pairs) where rel == pair, else lev: a compare and a predicated add."""
    return gl.inline_asm_elementwise("{ .reg .pred p; setp.eq.s32 p, $2, $3; @p add.rn.f16x2 $0, $1, $4; "
                                     "@!p mov.b32 $0, $1; }", "=r,r,r,r,r", [lev, rel, pair, add], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _rope2(k1, k2, c, s):
    """RoPE on fp16 pairs: (k1 c - k2 s, k2 c + k1 s)."""
    r1 = gl.inline_asm_elementwise("{ .reg .b32 t; mul.rn.f16x2 t, $2, $4; neg.f16x2 t, t; "
                                   "fma.rn.f16x2 $0, $1, $3, t; }", "=r,r,r,r,r", [k1, k2, c, s], dtype=gl.int32,
                                   is_pure=True, pack=1)
    r2 = gl.inline_asm_elementwise("{ .reg .b32 t; mul.rn.f16x2 t, $2, $3; fma.rn.f16x2 $0, $1, $4, t; }",
                                   "=r,r,r,r,r", [k1, k2, c, s], dtype=gl.int32, is_pure=True, pack=1)
    return r1, r2


@gluon.jit
def _to_operand(x, layout: gl.constexpr, R: gl.constexpr):
    """[R, 16] int32 fp16 pairs (pair p = operand K indices 2 p, 2 p + 1) -> the [R, 32] fp16 operand."""
    x2 = gl.reshape(gl.join(x, x), [R, 32])  # each pair's word twice: the two elements' slots
    # pack=2: one asm per two elements, whose fp16 results form one 32-bit register: the word itself
    h = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [x2], dtype=gl.float16, is_pure=True, pack=2)
    return gl.convert_layout(h, layout, assert_trivial=True)


@gluon.jit
def _pick4(j: gl.constexpr, x0, x1, x2, x3):
    if j == 0:
        return x0
    elif j == 1:
        return x1
    elif j == 2:
        return x2
    else:
        return x3


@gluon.jit
def _kchan(k, j: gl.constexpr):
    """Key channel of operand K index k (0..31) in chunk j: the 4 channels a thread holds are neighbours."""
    return 64 * (k // 16) + 16 * j + 4 * ((k % 16) // 2 % 4) + 2 * ((k % 16) // 8) + k % 2


@gluon.jit
def _rot_q(qj, ang_or_tab, j: gl.constexpr, N: gl.constexpr, FROM_TABLE: gl.constexpr):
    """R(a)^T applied to a query chunk [32, N] (K indices m and 16 + m are RoPE partners): the angle a of K index m
    is ang_or_tab * theta (FROM_TABLE False: ang_or_tab = (position, INVF)) or read from a cos/sin table (True:
    ang_or_tab = pointer to 16 cos then 16 sin)."""
    qa, qb = gl.split(gl.permute(gl.reshape(qj.to(gl.float32), [2, 16, N]), [1, 2, 0]))
    mq = gl.arange(0, 16, layout=gl.SliceLayout(1, qa.type.layout))
    if FROM_TABLE:
        ca = gl.load(ang_or_tab + mq)[:, None]
        sa = gl.load(ang_or_tab + 16 + mq)[:, None]
    else:
        pos, INVF = ang_or_tab
        ca, sa = _cos_sin(pos * gl.load(INVF + _kchan(mq, j)))
        ca, sa = ca[:, None], sa[:, None]
    return gl.reshape(gl.permute(gl.join(qa * ca + qb * sa, qb * ca - qa * sa), [2, 0, 1]), [32, N]).to(gl.float16)


@gluon.jit
def _q_chunk(Q, bn, bk, j: gl.constexpr, qk_scale, D: gl.constexpr):
    return (gl.load(Q + bn[None, :] * D + _kchan(bk, j)[:, None]).to(gl.float32) * qk_scale).to(gl.float16)


def _axis(parent, dim, rank):
    """Layout of a 1-D arange along ``dim`` that expands (x[None, :, None, ...]) into ``parent``."""
    lay = parent
    for d in reversed(range(rank)):
        if d != dim:
            lay = gl.SliceLayout(d, lay)
    return lay


# key pairs of chunk j as [token, half, p]: operand K index 16 half + 2 p + e; channel 64 half + 16 j + 4 (p % 4) +
# 2 (p // 4) + e (e = the element of the pair): a thread's 4 channels of a half are neighbours (one low-plane byte)
P3 = gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 4], [8, 0, 0], [0, 1, 0], [16, 0, 0]],
    lane_bases=[[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]], warp_bases=[], block_bases=[],
    shape=[BT, 2, 8])
# value pairs of chunk i, before the transpose, as [sw, mh, ml, ph, pl]: the pair (token 8 ph + ml, channels 32 i +
# 16 sw + 8 mh + 2 pl + e). movmatrix.trans turns each register into the V^T operand's pair (channel 32 i + 16 sw +
# 8 mh + ml, tokens 8 ph + 2 pl + e), i.e. operand M index 16 sw + 8 mh + ml, K index 8 ph + 2 pl + e.
V5 = gl.DistributedLinearLayout(
    reg_bases=[[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 2, 0]],
    lane_bases=[[0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 0, 1, 0, 0], [0, 0, 2, 0, 0], [0, 0, 4, 0, 0]],
    warp_bases=[], block_bases=[], shape=[2, 2, 8, 4, 4])
VW = gl.SliceLayout(1, gl.SliceLayout(4, V5))  # [sw, ml, ph]: the words of a value pair's token
C_P3 = {d: gl.constexpr(_axis(P3, d, 3)) for d in range(3)}
C_V5 = {d: gl.constexpr(_axis(V5, d, 5)) for d in range(5)}
C_VW = {d: gl.constexpr(_axis(VW, d, 3)) for d in range(3)}
P3_T, P3_H, P3_P = C_P3[0], C_P3[1], C_P3[2]
V5_SW, V5_MH, V5_ML, V5_PH, V5_PL = C_V5[0], C_V5[1], C_V5[2], C_V5[3], C_V5[4]
VW_SW, VW_ML, VW_PH = C_VW[0], C_VW[1], C_VW[2]
KW_L = gl.constexpr(gl.SliceLayout(2, P3))  # [token, half]: a key word, shared by a lane group
# [token, word]: a lane group's 4 tokens, all 8 words of each in consecutive registers (16-byte loads)
KROW = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 1], [0, 2], [0, 4], [8, 0], [16, 0]], lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
    warp_bases=[], block_bases=[], shape=[BT, 8]))
KROW4 = gl.constexpr(gl.DistributedLinearLayout(  # the same for the 4 high-plane words of a row
    reg_bases=[[0, 1], [0, 2], [8, 0], [16, 0]], lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
    warp_bases=[], block_bases=[], shape=[BT, 4]))
KC_L = gl.constexpr(gl.SliceLayout(1, P3))  # [token, p]: per channel pair below 64
KS_L = gl.constexpr(gl.SliceLayout(0, P3))  # [half, p]: per channel pair


@gluon.jit
def _entry(w, h, rw, rh, lane4):
    """Byte offset of the pair-table entry of a channel pair: w rotated right by rw puts its 4 low-plane bits at
    bits 7-10, h rotated by rh its 2 high-plane bits at 11-12, OR 4 lane (bits 2-6)."""
    return gl.inline_asm_elementwise(
        "{ .reg .b32 a, b; shf.r.wrap.b32 a, $1, $1, $3; shf.r.wrap.b32 b, $2, $2, $4; "
        "lop3.b32 a, a, 0x780, $5, 0xEA; lop3.b32 $0, b, 0x1800, a, 0xEA; }",  # (x & mask) | y, twice
        "=r,r,r,r,r,r", [w, h, rw, rh, lane4], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _lookup(w, h, rw, rh, lane4, TAB, SMEM: gl.constexpr, OFF: gl.constexpr):
    """The entry of table OFF (0: keys, 1: values) from shared memory (Triton's dynamic shared memory, symbol
    global_smem, whose constant address ptxas folds into the load) or from global memory through L1 (TAB)."""
    off = _entry(w, h, rw, rh, lane4) + 8192 * OFF
    if SMEM:
        return gl.inline_asm_elementwise("{ .reg .u32 b; mov.u32 b, global_smem; add.u32 b, b, $1; "
                                         "ld.shared.b32 $0, [b]; }", "=r,r", [off], dtype=gl.int32, is_pure=True,
                                         pack=1)
    else:
        return gl.load((TAB.to(gl.pointer_type(gl.int8)) + off).to(gl.pointer_type(gl.int32)))


@gluon.jit
def _prefetch(ptr, mask, PF: gl.constexpr):
    """PTX prefetch of the lines holding ptr (where mask) into L1 (PF 1) or L2 (PF 2); no register result."""
    if PF == 1:
        gl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L1 [$1]; mov.b32 $0, 0; }",
                                  "=r,l,r", [ptr.to(gl.int64, bitcast=True), mask.to(gl.int32)], dtype=gl.int32,
                                  is_pure=False, pack=1)
    elif PF == 2:
        gl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
                                  "=r,l,r", [ptr.to(gl.int64, bitcast=True), mask.to(gl.int32)], dtype=gl.int32,
                                  is_pure=False, pack=1)


@gluon.jit
def _code3(C32, row_word, c, mask, D: gl.constexpr):
    """3-bit code of channel c in the packed rows at word offsets row_word (core/packing.py's planes)."""
    w = gl.load(C32 + row_word + c // 16, mask=mask, other=0)
    h = gl.load(C32 + row_word + D // 16 + c // 32, mask=mask, other=0)
    return ((w >> (2 * (c % 16))) & 3) | (((h >> (c % 32)) & 1) << 2)


@gluon.jit
def _lds(off):
    """fp32 at byte offset off of the slot area (shared memory after the 16 KB of tables). _lds, _sts, _red_add and
    _warp_sync are not pure, so the compiler keeps their order; _warp_sync orders the lanes' accesses."""
    return gl.inline_asm_elementwise("{ .reg .u32 b; mov.u32 b, global_smem; add.u32 b, b, $1; "
                                     "ld.shared.b32 $0, [b+16384]; }", "=r,r", [off], dtype=gl.float32,
                                     is_pure=False, pack=1)


@gluon.jit
def _lds_i32(off):
    return _lds(off).to(gl.int32, bitcast=True)


@gluon.jit
def _warp_sync(x):
    """bar.warp.sync (memory ordering among the warp's lanes), once: x is a scalar, returned."""
    return gl.inline_asm_elementwise("bar.warp.sync -1; mov.b32 $0, $1;", "=r,r", [x], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def _sts(off, x):
    gl.inline_asm_elementwise("{ .reg .u32 b; mov.u32 b, global_smem; add.u32 b, b, $1; "
                              "st.shared.b32 [b+16384], $2; mov.b32 $0, 0; }", "=r,r,r", [off, x], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _red_add(off, x):
    gl.inline_asm_elementwise("{ .reg .u32 b; mov.u32 b, global_smem; add.u32 b, b, $1; "
                              "red.shared.add.f32 [b+16384], $2; mov.b32 $0, 0; }", "=r,r,r", [off, x],
                              dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _movmatrix_t(x):
    return gl.inline_asm_elementwise("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", "=r,r", [x], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _decode_split(KC, VC, VS, VZ, KSZ, TAB, KS, KZ, KLUT, VLUT, KOI, KOV, VOI, VOV, CSP, BROT, INVF, Q, PACC, PM,
                  PL, n_tok, chunk, pos0, qk_scale, skc, svc, skh, svh, NSPLIT, G, BT: gl.constexpr, D: gl.constexpr,
                  N: gl.constexpr, SMEM: gl.constexpr, PF: gl.constexpr, SLOTS: gl.constexpr):
    """One KV head's tokens [pid * chunk, pid * chunk + chunk) of the 3-bit head-group storage; arguments as in
    gluon_decode_study._decode_split, except: KSZ [H, 2, D/2] int32 (key scale, key zero as fp16 pairs per channel
    pair), TAB [128, 32] int32 (lane-replicated pair tables of the key, then the value codebook; copied to shared
    memory), CSP [4 (chunk), 2 (cos, sin), 8 (register), 32 (lane)] int32: cos and sin of offset * theta as fp16
    pairs, in the order the threads hold them (one 128-byte line per warp-wide load; see fragment_rope_table).
    SLOTS 1: one exact fp16 outlier per key and per value vector (nuq3-1% at head_dim 128), channel KOI / VOI [H, T]
    uint8 and value KOV / VOV [H, T]; KS / KZ [H, D] fp16 and the codebooks KLUT / VLUT [8] serve their
    corrections. SLOTS 2: the slots hold the residual (exact - dequantised) instead, a format the append kernel
    could write: no code lookup at decode time. G: query heads per KV head (the rest of N is padding).
    A key slot adds its score correction, delta x (R(p)^T q)_c, to the scores; a value slot adds
    p x delta to one output channel through shared-memory atomics into a [D, N] buffer (rescaled when a running
    max grows), added to the accumulators at the end."""
    pid = gl.program_id(0)
    hd = gl.program_id(1).to(gl.int64)
    STAGED: gl.constexpr = SLOTS == 1 or SLOTS == 2  # slots through the shared slot area
    if SLOTS == 3:  # KOV / VOV: [H, T] int32 words (passed as fp16 [H, 2 T]): residual in level units | channel << 16
        KOW = KOV.to(gl.pointer_type(gl.int32)) + hd * n_tok
        VOW = VOV.to(gl.pointer_type(gl.int32)) + hd * n_tok
    KC += hd * skh
    VC += hd * svh
    VS += hd * n_tok
    VZ += hd * n_tok
    KSZ += hd * D
    KS += hd * D
    KZ += hd * D
    KOI += hd * n_tok
    KOV += hd * n_tok
    VOI += hd * n_tok
    VOV += hd * n_tok
    Q += hd * N * D
    PACC += hd * NSPLIT * N * D
    PM += hd * NSPLIT * N
    PL += hd * NSPLIT * N
    lo_t = pid * chunk
    hi_t = gl.minimum(lo_t + chunk, n_tok)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    tb_l: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [1, 1], [1, 0])
    if SMEM:  # the two pair tables into shared memory (the first allocation: offset 0 of global_smem)
        te_ = gl.arange(0, 128, layout=gl.SliceLayout(1, tb_l))[:, None]
        tl_ = gl.arange(0, 32, layout=gl.SliceLayout(0, tb_l))[None, :]
        tab = gl.allocate_shared_memory(gl.int32, [128, 32], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
                                        gl.load(TAB + te_ * 32 + tl_))
        if STAGED:  # the slot area (offset 16384, checked by the host): value corrections [D, N] fp32 at 0, zeroed;
            # staging for the key corrections [BT, N] at 4096 and the value slots' delta / channel at 5120 / 5248
            buf = gl.allocate_shared_memory(gl.int32, [64, 32], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
                                            gl.zeros([64, 32], gl.int32, tb_l))
        gl.thread_barrier()
    # key side invariants
    t3 = gl.arange(0, BT, layout=P3_T)[:, None, None]
    q3 = gl.arange(0, 8, layout=P3_P)[None, None, :]
    h3 = gl.arange(0, 2, layout=P3_H)[None, :, None]
    k_pair = 64 * h3 + 2 * (q3 // 4)  # a key pair's first channel, less 16 j and the lane's 4 (p % 4) (SLOTS 3)
    k_base = 4 * ((q3 % 4) + 4 * (t3 % 8))
    k_rw = (2 * (4 * (q3 % 4) + 2 * (q3 // 4)) - 7) & 31  # first channel's low-plane bit -> bit 7
    k_rh = (4 * (q3 % 4) + 2 * (q3 // 4) - 11) & 31  # its high-plane bit -> bit 11 (half-word 0 of a word)
    k_rh16 = (k_rh + 16) & 31  # (half-word 1)
    hs = gl.arange(0, 2, layout=gl.SliceLayout(1, KS_L))[:, None]
    qs = gl.arange(0, 8, layout=gl.SliceLayout(0, KS_L))[None, :]
    ks_off = 32 * hs + 2 * (qs % 4) + qs // 4  # channel pair (without the 8 j)
    trow = gl.arange(0, BT, layout=gl.SliceLayout(1, KROW))[:, None]
    wcol = gl.arange(0, 8, layout=gl.SliceLayout(0, KROW))[None, :]
    trow4 = gl.arange(0, BT, layout=gl.SliceLayout(1, KROW4))[:, None]
    hcol = gl.arange(0, 4, layout=gl.SliceLayout(0, KROW4))[None, :]
    tcs = gl.arange(0, BT, layout=gl.SliceLayout(1, KC_L))[:, None]
    qcs = gl.arange(0, 8, layout=gl.SliceLayout(0, KC_L))[None, :]
    # fragment order: register s + 2 (tau // 8 % 2) + 4 (tau // 16) of lane p % 4 + 4 (tau % 8), s = p // 4
    cs_off = 32 * ((qcs // 4) + 2 * ((tcs // 8) % 2) + 4 * (tcs // 16)) + (qcs % 4) + 4 * (tcs % 8)
    # value side invariants
    mh5 = gl.arange(0, 2, layout=V5_MH)[None, :, None, None, None]
    ml5 = gl.arange(0, 8, layout=V5_ML)[None, None, :, None, None]
    pl5 = gl.arange(0, 4, layout=V5_PL)[None, None, None, None, :]
    ph5 = gl.arange(0, 4, layout=V5_PH)[None, None, None, :, None]
    v_base = 4 * (pl5 + 4 * ml5) + 0 * mh5
    v_rw = (2 * (8 * mh5 + 2 * pl5) - 7) & 31
    sw5 = gl.arange(0, 2, layout=V5_SW)[:, None, None, None, None]
    v_rh = (8 * mh5 + 2 * pl5 - 11 + 16 * sw5) & 31  # high-plane word i holds half-words 2 i + sw
    sww = gl.arange(0, 2, layout=VW_SW)[:, None, None]
    mlw = gl.arange(0, 8, layout=VW_ML)[None, :, None]
    phw = gl.arange(0, 4, layout=VW_PH)[None, None, :]
    v_tok = 8 * phw + mlw  # the token of a value pair before the transpose
    v_tok5 = 8 * ph5 + ml5  # (the same in the pairs' layout)
    v_pair = 16 * sw5 + 8 * mh5  # a value pair's first channel, less 32 i and the lane's 2 pl (SLOTS 3)
    bk = gl.arange(0, 32, layout=gl.SliceLayout(1, b_l))
    bn = gl.arange(0, N, layout=gl.SliceLayout(0, b_l))
    # the query chunks rotated back by the split's first position (RoPE(p + tau) = RoPE(tau) RoPE(p)); each block
    # then rotates them by its offset b BT in the split, from the table BROT
    p_split = (pos0 + lo_t).to(gl.float32)
    q0 = _rot_q(_q_chunk(Q, bn, bk, 0, qk_scale, D), (p_split, INVF), 0, N, False)
    q1 = _rot_q(_q_chunk(Q, bn, bk, 1, qk_scale, D), (p_split, INVF), 1, N, False)
    q2 = _rot_q(_q_chunk(Q, bn, bk, 2, qk_scale, D), (p_split, INVF), 2, N, False)
    q3q = _rot_q(_q_chunk(Q, bn, bk, 3, qk_scale, D), (p_split, INVF), 3, N, False)
    c_l: gl.constexpr = gl.SliceLayout(1, mma)
    h_l: gl.constexpr = gl.SliceLayout(0, mma)
    tc_ = gl.arange(0, BT, layout=c_l)
    oh_ = gl.arange(0, N, layout=h_l)[None, :]
    br_ = gl.arange(0, D, layout=c_l)[:, None]  # buffer rows (channels), as [D, N] in the accumulator layout
    tl_l: gl.constexpr = gl.BlockedLayout([1, N], [32, 1], [1, 1], [1, 0])  # slots: one token per lane
    tl_tok = gl.arange(0, BT, layout=gl.SliceLayout(1, tl_l))
    tl_h = gl.arange(0, N, layout=gl.SliceLayout(0, tl_l))[None, :]
    m_i = gl.full([N], -1.0e30, gl.float32, layout=h_l)
    l_i = gl.zeros([N], gl.float32, layout=h_l)
    z_i = gl.zeros([N], gl.float32, layout=h_l)
    acc0 = gl.zeros([32, N], gl.float32, layout=mma)
    acc1 = gl.zeros([32, N], gl.float32, layout=mma)
    acc2 = gl.zeros([32, N], gl.float32, layout=mma)
    acc3 = gl.zeros([32, N], gl.float32, layout=mma)
    KC32 = KC.to(gl.pointer_type(gl.int32))
    VC32 = VC.to(gl.pointer_type(gl.int32))
    pf_t = gl.arange(0, BT, layout=gl.BlockedLayout([1], [32], [1], [0]))
    for t0 in range(lo_t, hi_t, BT):
        if PF > 0:  # the next block's rows (a row start per lane touches every line: rows are < 128 bytes)
            nxt = t0 + BT + pf_t
            pmask = nxt < hi_t
            _prefetch(KC + nxt * skc, pmask, PF)
            _prefetch(VC + nxt * svc, pmask, PF)
            _prefetch(VS + nxt, pmask, PF)
            _prefetch(VZ + nxt, pmask, PF)
            if SLOTS == 3:  # and the slot words
                _prefetch(KOW + nxt, pmask, PF)
                _prefetch(VOW + nxt, pmask, PF)
            if STAGED:  # and the slots (each a dependent chain: channel -> code words -> codebook)
                _prefetch(KOI + nxt, pmask, PF)
                _prefetch(KOV + nxt, pmask, PF)
                _prefetch(VOI + nxt, pmask, PF)
                _prefetch(VOV + nxt, pmask, PF)
        tmask = (t0 + tc_) < hi_t
        vsc = gl.load(VS + t0 + tc_, mask=tmask, other=0.0).to(gl.float32)
        vzr = gl.load(VZ + t0 + tc_, mask=tmask, other=0.0).to(gl.float32)
        s = gl.zeros([BT, N], gl.float32, layout=mma)
        # the block's key rows, 16 bytes per load: low-plane words [token, 8], high-plane words [token, 4] (read as
        # 32-bit words: half-word 4 half + j is half j % 2 of word 2 half + j // 2, no sign extension)
        kmask = (t0 + trow) < hi_t
        wrow = gl.load(KC32 + (t0 + trow) * (skc // 4) + wcol, mask=kmask, other=0)
        hrow = gl.load(KC32 + (t0 + trow4) * (skc // 4) + D // 16 + hcol, mask=(t0 + trow4) < hi_t, other=0)
        if SLOTS == 3:  # the block's key slots: the residual's fp16 bits in the pair's half of the channel's pair
            kw_ = gl.load(KOW + t0 + t3, mask=(t0 + t3) < hi_t, other=-1)  # [BT, 1, 1]; -1: no channel matches
            k_add = gl.where((kw_ & 65536) != 0, kw_ << 16, kw_ & 65535)
            k_rel = ((kw_ >> 16) & 65534) - 4 * (q3 % 4)  # [BT, 1, 8]: compared with constants per register
        wrow = gl.reshape(wrow, [BT, 2, 2, 2])  # word 4 half + 2 jh + jl
        w_l0, w_l1 = gl.split(wrow)
        h_w0, h_w1 = gl.split(gl.reshape(hrow, [BT, 2, 2]))  # word 2 half + j // 2
        for j in gl.static_range(4):
            # the words of chunk j (channels 64 half + 16 j ..): low-plane word 4 half + j, high-plane half-word
            w = _pick4(j, gl.split(w_l0)[0], gl.split(w_l1)[0], gl.split(w_l0)[1], gl.split(w_l1)[1])
            h = h_w0 if j < 2 else h_w1
            w = gl.convert_layout(w, KW_L, assert_trivial=True)
            h = gl.convert_layout(h, KW_L, assert_trivial=True)
            rh = k_rh if j % 2 == 0 else k_rh16
            lev = _lookup(w[:, :, None], h[:, :, None], k_rw, rh, k_base, TAB, SMEM, 0)
            if SLOTS == 3:  # the slot's residual (in code-level units) onto its level, before the affine and RoPE
                lev = _hadd2(lev, gl.where(k_rel == k_pair + 16 * j, k_add, 0))
            ksz = ks_off + 8 * j
            k = _hfma2(lev, gl.load(KSZ + ksz)[None, :, :], gl.load(KSZ + D // 2 + ksz)[None, :, :])
            k1, k2 = gl.split(gl.permute(k, [0, 2, 1]))
            c = gl.convert_layout(gl.load(CSP + cs_off + 512 * j), k1.type.layout, assert_trivial=True)
            sn = gl.convert_layout(gl.load(CSP + cs_off + 512 * j + 256), k1.type.layout, assert_trivial=True)
            r1, r2 = _rope2(k1, k2, c, sn)
            kr = _to_operand(gl.reshape(gl.permute(gl.join(r1, r2), [0, 2, 1]), [BT, 16]), a_l, BT)
            # the query chunk rotated back by the block start p0 (RoPE(p0 + tau) = RoPE(tau) RoPE(p0))
            qr = _rot_q(_pick4(j, q0, q1, q2, q3q), BROT + ((t0 - lo_t) // BT * 4 + j) * 32, j, N, True)
            s = mma_v2(kr, gl.convert_layout(qr, b_l), s)
        if STAGED:  # key slots, one token per lane: s += delta x (R(p)^T q)_c, delta = exact - dequantised (pre-RoPE)
            tk = t0 + tl_tok
            mk = tk < hi_t
            ci = gl.load(KOI + tk, mask=mk, other=0).to(gl.int32)
            dk = gl.load(KOV + tk, mask=mk, other=0.0).to(gl.float32)
            if SLOTS == 1:  # exact values: delta = exact - dequantised, from the codes
                code = _code3(KC32, tk * (skc // 4), ci, mk, D)
                dk -= (gl.load(KLUT + code).to(gl.float32) * gl.load(KS + ci).to(gl.float32)
                       + gl.load(KZ + ci).to(gl.float32))
            dk = gl.where(mk, dk, 0.0) * qk_scale  # SLOTS 2: the slot holds the residual itself
            cs, sn = _cos_sin((pos0 + tk).to(gl.float32) * gl.load(INVF + ci % 64))
            sn = gl.where(ci < 64, sn, -sn)
            hm = tl_h < G  # the query heads of the GQA group only
            qc = gl.load(Q + tl_h * D + ci[:, None], mask=hm, other=0.0).to(gl.float32)
            qp = gl.load(Q + tl_h * D + (ci ^ 64)[:, None], mask=hm, other=0.0).to(gl.float32)
            # to the score layout through the staging area at 4096 (Triton's convert_layout would add an allocation)
            _sts(4096 + (tl_tok[:, None] * N + tl_h) * 4, dk[:, None] * (qc * cs[:, None] + qp * sn[:, None]))
            _warp_sync(n_tok)
            s += _lds(4096 + (tc_[:, None] * N + oh_) * 4)
        # online softmax over the block's tokens (axis 0), base 2 (qk_scale holds log2 e / sqrt(D))
        s = gl.where(tmask[:, None], s, -1.0e30)
        m_new = gl.maximum(m_i, gl.max(s, 0))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + gl.sum(p, 0)
        z_i = z_i * alpha + gl.sum(p * vzr[:, None], 0)
        m_i = m_new
        if STAGED:  # value slots: buffer[c, h] += p x (exact - dequantised), after rescaling it by alpha if needed
            _warp_sync(n_tok)  # the previous block's atomics before the rescale's reads
            if gl.min(alpha, 0) < 1.0:
                ba = (br_ * N + oh_) * 4
                _sts(ba, _lds(ba) * alpha[None, :])
            vci = gl.load(VOI + tk, mask=mk, other=0).to(gl.int32)
            dv = gl.load(VOV + tk, mask=mk, other=0.0).to(gl.float32)
            if SLOTS == 1:
                vcode = _code3(VC32, tk * (svc // 4), vci, mk, D)
                dv -= (gl.load(VLUT + vcode).to(gl.float32) * gl.load(VS + tk, mask=mk, other=0.0).to(gl.float32)
                       + gl.load(VZ + tk, mask=mk, other=0.0).to(gl.float32))
            dv = gl.where(mk, dv, 0.0)
            _sts(5120 + tl_tok * 4, dv)  # (token, channel, delta) to the score layout through the staging area
            _sts(5248 + tl_tok * 4, vci)
            _warp_sync(n_tok)  # the staged values and the rescale's writes before the reads and atomics
            dvm = _lds(5120 + tc_ * 4)
            _red_add((_lds_i32(5248 + tc_ * 4)[:, None] * N + oh_) * 4, p * dvm[:, None])
        pv = gl.convert_layout((p * vsc[:, None]).to(gl.float16), b_l)
        vmask = (t0 + v_tok) < hi_t
        if SLOTS == 3:  # the block's value slots, as for keys
            vw_ = gl.load(VOW + t0 + v_tok5, mask=(t0 + v_tok5) < hi_t, other=-1)  # [1, 1, 8, 4, 1]
            v_add = gl.where((vw_ & 65536) != 0, vw_ << 16, vw_ & 65535)
            v_rel = ((vw_ >> 16) & 65534) - 2 * pl5  # [1, 1, 8, 4, 4]
        for i in gl.static_range(4):  # channels 32 i .. 32 i + 31: low-plane words 2 i + sw, high half-words too
            w = gl.load(VC32 + (t0 + v_tok) * (svc // 4) + 2 * i + sww, mask=vmask, other=0)
            h = gl.load(VC32 + (t0 + v_tok) * (svc // 4) + D // 16 + i + 0 * sww, mask=vmask, other=0)
            lev = _lookup(w[:, None, :, :, None], h[:, None, :, :, None], v_rw, v_rh, v_base, TAB, SMEM, 1)
            if SLOTS == 3:
                lev = _hadd2(lev, gl.where(v_rel == v_pair + 32 * i, v_add, 0))
            lev = _movmatrix_t(lev)
            vt = _to_operand(gl.reshape(lev, [32, BT // 2]), a_l, 32)
            if i == 0:
                acc0 = mma_v2(vt, pv, acc0 * alpha[None, :])
            elif i == 1:
                acc1 = mma_v2(vt, pv, acc1 * alpha[None, :])
            elif i == 2:
                acc2 = mma_v2(vt, pv, acc2 * alpha[None, :])
            else:
                acc3 = mma_v2(vt, pv, acc3 * alpha[None, :])
    # partials: O^T chunks [32 channels, N] (natural channel order) + the zero term
    oc = gl.arange(0, 32, layout=c_l)[:, None]
    oh = gl.arange(0, N, layout=h_l)[None, :]
    base = PACC + (oh * NSPLIT + pid) * D
    if STAGED:  # the value-slot corrections
        _warp_sync(n_tok)
        acc0 += _lds((oc * N + oh) * 4)
        acc1 += _lds(((32 + oc) * N + oh) * 4)
        acc2 += _lds(((64 + oc) * N + oh) * 4)
        acc3 += _lds(((96 + oc) * N + oh) * 4)
    gl.store(base + oc, acc0 + z_i[None, :])
    gl.store(base + 32 + oc, acc1 + z_i[None, :])
    gl.store(base + 64 + oc, acc2 + z_i[None, :])
    gl.store(base + 96 + oc, acc3 + z_i[None, :])
    hh = gl.arange(0, N, layout=h_l)
    # one read of the tables after the loop keeps their allocation alive (inline PTX reads it: Triton cannot see
    # that), so no scratch buffer can alias it; the term is 0 unless n_tok < 0
    if SMEM:
        keep = gl.sum(gl.sum(tab.slice(0, 1, dim=0).load(tb_l), 1), 0)
        if STAGED:
            keep += gl.sum(gl.sum(buf.slice(0, 1, dim=0).load(tb_l), 1), 0)
        m_i += gl.where(n_tok < 0, keep.to(gl.float32), 0.0)
    gl.store(PM + hh * NSPLIT + pid, m_i)
    gl.store(PL + hh * NSPLIT + pid, l_i)


# ---------------------------------------------------------------------------------------------------- host side
def pair_table(lut: torch.Tensor) -> torch.Tensor:
    """[64, 32] int32: entry idx = lo_a | lo_b << 2 | hi_a << 4 | hi_b << 5 holds fp16 pair (lut[a], lut[b]) with
    a = lo_a | hi_a << 2, replicated over the 32 lanes."""
    idx = torch.arange(64)
    a = (idx & 3) | (((idx >> 4) & 1) << 2)
    b = ((idx >> 2) & 3) | (((idx >> 5) & 1) << 2)
    lev = lut.detach().half().cpu()
    bits = torch.stack([lev[a], lev[b]], 1).contiguous().view(torch.int32)[:, 0]
    return bits[:, None].expand(64, 32).contiguous().to(lut.device)


def half_pairs(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 n] -> [..., n] int32 holding (x[2 i], x[2 i + 1]) as fp16 pairs."""
    return x.half().contiguous().view(torch.int32)


def fragment_rope_table(tau: torch.Tensor) -> torch.Tensor:
    """[4, 2, 8, 32] int32 from the angles tau [BT, D/2]: for chunk j, cos / sin, register r and lane l, the fp16
    pair of channel pair 8 j + 2 (l % 4) + (r % 2) at block offset l // 4 + 8 (r // 2 % 2) + 16 (r // 4): the
    values a thread of the key layout holds, so a warp's load reads one contiguous line."""
    cs = torch.stack([half_pairs(tau.cos()), half_pairs(tau.sin())])  # [2, BT, D/4]
    j, r, lane = torch.arange(4)[:, None, None], torch.arange(8)[None, :, None], torch.arange(32)[None, None, :]
    tok = lane // 4 + 8 * (r // 2 % 2) + 16 * (r // 4)
    cp = 8 * j + 2 * (lane % 4) + r % 2
    return cs[:, tok.to(cs.device), cp.to(cs.device)].permute(1, 0, 2, 3).contiguous()  # [4, 2, 8, 32]


def block_rope_table(inv_freq: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """[n_blocks, 4, 2, 16] fp32: for the block offset b BT in a split, chunk j, cos / sin of b BT theta for the query
    K index m (< 16) of chunk j, i.e. channel _kchan(m, j) (computed in float64)."""
    m = torch.arange(16)
    ch = (16 * torch.arange(4)[:, None] + 4 * ((m // 2) % 4) + 2 * (m // 8) + m % 2).to(inv_freq.device)  # [4, 16]
    ang = (torch.arange(n_blocks, device=inv_freq.device).double() * BT)[:, None, None] * inv_freq.double()[ch]
    return torch.stack([ang.cos(), ang.sin()], 2).float().contiguous()


def tables(c, n_tok=None):
    """The kernel's extra inputs, built from the study's case (n_tok: the longest split, default the whole case)."""
    dev = c["KLUT"].device
    tau = torch.arange(BT, device=dev).float()[:, None] * c["INVF"][None, :]  # [BT, D/2]
    n_tok = n_tok or c["KC"].shape[1]
    return dict(TAB=torch.cat([pair_table(c["KLUT"]), pair_table(c["VLUT"])]).contiguous(),
                KSZ=torch.stack([half_pairs(c["KS"]), half_pairs(c["KZ"])], 1).contiguous(),  # [H, 2, D/2]
                CSP=fragment_rope_table(tau), BROT=block_rope_table(c["INVF"], math.ceil(n_tok / BT) + 1))


def check_shared(k, slots):
    """The inline PTX reads the tables at offset 0 of Triton's shared memory and the slot buffer at 16384: the
    allocations must add up to exactly those buffers (a wrong placement shows as garbage in --run's checks)."""
    want = 16384 + 8192 * (slots in (1, 2))
    assert k.metadata.shared == want, f"shared memory {k.metadata.shared} B, the inline PTX expects {want} B"


def _check_options(smem, slots):
    if slots and not smem:
        raise ValueError("slots need the tables in shared memory (the slot area follows them there); drop "
                         "--global-tables or the slots.")


def static_report(smem=True, maxnreg=None, pf=0, slots=False):
    _check_options(smem, slots)
    div16 = [["tt.divisibility", 16]]
    names = list(SIG)
    attrs = {(names.index(n),): div16 for n in ("KC", "VC", "skc", "svc", "skh", "svh")}
    cx = {"BT": BT, "D": D, "N": N, "SMEM": smem, "PF": pf, "SLOTS": slots}
    src = GluonASTSource(_decode_split, SIG, constexprs=cx, attrs=attrs)
    opt = {} if maxnreg is None else {"maxnreg": maxnreg}
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1, **opt))
    if smem:
        check_shared(k, slots)
    tot, loop, ops, loc = sass_loop(k.asm["cubin"])
    print(f"tables in {'shared memory' if smem else 'global memory (L1)'}, maxnreg {maxnreg}, prefetch {pf}, "
          f"slots {slots}: "
          f"triton {triton.__version__}, sm_90: {resource_usage(k.asm['cubin'])}, shared {k.metadata.shared} B, "
          f"SASS {tot} instructions, hot loop {loop} ({loop / (2 * BT * D / 32):.1f} per element and thread), "
          f"{loc} local loads/stores")
    print("   hot loop:", ", ".join(f"{o} {c}" for o, c in ops.most_common(40)))


def launch(c, tb, T, H, nsplit, pos0=0, maxnreg=None, smem=True, pf=0, slots=False):
    """The kernel's launch (partials [H, N, nsplit, D]) and the merge of the splits by the library's reduce kernel,
    as two callables."""
    _check_options(smem, slots)
    from kvquant.kernels._triton import _reduce_kernel

    chunk = _chunk(T, nsplit)
    pacc = torch.empty(H, N, nsplit, D, device="cuda")
    pm = torch.empty(H, N, nsplit, device="cuda")
    pl = torch.empty(H, N, nsplit, device="cuda")
    out = torch.empty(H, N, D, device="cuda", dtype=torch.bfloat16)
    qk = math.log2(math.e) / math.sqrt(D)
    opt = {} if maxnreg is None else {"maxnreg": maxnreg}

    def go():
        return _decode_split[(nsplit, H)](
            c["KC"], c["VC"], c["VS"], c["VZ"], tb["KSZ"], tb["TAB"], c["KS"], c["KZ"], c["KLUT"], c["VLUT"],
            c["KOI"] if slots else c["KC"], c["KOV"] if slots else c["VS"], c["VOI"] if slots else c["KC"],
            c["VOV"] if slots else c["VS"], tb["CSP"], tb["BROT"], c["INVF"], c["Q"], pacc, pm, pl, T, chunk, pos0,
            qk, c["KC"].stride(1), c["VC"].stride(1), c["KC"].stride(0), c["VC"].stride(0), nsplit, c.get("G", 4),
            BT=BT, D=D, N=N,
            SMEM=smem, PF=pf, SLOTS=slots, num_warps=1, **opt)

    def merge():
        _reduce_kernel[(H * N,)](pacc, pm, pl, out, 0, D, H * N, nsplit, SP=triton.next_power_of_2(nsplit), D=D,
                                 num_warps=4)
        return out[:, :4].float()

    return go, merge


def run_kernel(c, tb, T, H, nsplit, pos0=0, maxnreg=None, smem=True, pf=0, slots=False):
    go, merge = launch(c, tb, T, H, nsplit, pos0, maxnreg, smem, pf, slots)
    k = go()
    if smem:
        check_shared(k, slots)
    return merge()


def add_slots(c, seed=1):
    """One outlier slot per key and value vector (nuq3-1% at head_dim 128): a random channel and an exact value of
    outlier size."""
    H, T = c["VS"].shape
    dev = c["KC"].device
    g = torch.Generator().manual_seed(seed)
    for n in ("K", "V"):
        c[n + "OI"] = torch.randint(0, D, (H, T), generator=g).to(torch.uint8).to(dev)
        c[n + "OV"] = (torch.randn(H, T, generator=g) * 4).half().to(dev)
    return c


def residual_slots(c):
    """A copy of the case whose slots hold the residual (exact - dequantised) instead of the exact value (SLOTS 2)."""
    dev = c["KC"].device
    h = torch.arange(c["VS"].shape[0], device=dev)[:, None]
    t = torch.arange(c["VS"].shape[1], device=dev)[None, :]
    ki, vi = c["KOI"].long(), c["VOI"].long()
    kdeq = c["KLUT"].float()[c["kcodes"].to(dev)[h, t, ki]] * c["KS"].float()[h, ki] + c["KZ"].float()[h, ki]
    vdeq = c["VLUT"].float()[c["vcodes"].to(dev)[h, t, vi]] * c["VS"].float() + c["VZ"].float()
    return {**c, "KOV": (c["KOV"].float() - kdeq).half(), "VOV": (c["VOV"].float() - vdeq).half()}


def slot_words(idx, res):
    """SLOTS 3's slot words: [H, T] int32 holding the channel idx in the high half and the residual res as fp16 bits
    in the low half, viewed as fp16 [H, 2 T] (the kernel's pointer type)."""
    bits = res.half().contiguous().view(torch.int16).int() & 0xFFFF
    return ((idx.int() << 16) | bits).contiguous().view(torch.float16)


def level_slots(c):
    """A copy of the case whose slots hold the residual (exact - dequantised) in code-level units, i.e. divided by the
    key channel's scale or the value vector's scale, packed with the channel (SLOTS 3): the kernel adds it to the
    looked-up level before the affine map, so the slot needs no arithmetic of its own."""
    dev = c["KC"].device
    h = torch.arange(c["VS"].shape[0], device=dev)[:, None]
    t = torch.arange(c["VS"].shape[1], device=dev)[None, :]
    ki, vi = c["KOI"].long(), c["VOI"].long()
    klev = c["KLUT"].float()[c["kcodes"].to(dev)[h, t, ki]]
    vlev = c["VLUT"].float()[c["vcodes"].to(dev)[h, t, vi]]
    ks, kz = c["KS"].float()[h, ki], c["KZ"].float()[h, ki]
    kres = (c["KOV"].float() - kz) / ks - klev
    vres = (c["VOV"].float() - c["VZ"].float()) / c["VS"].float() - vlev
    return {**c, "KOV": slot_words(ki, kres), "VOV": slot_words(vi, vres)}


def reference_slots(c, T, H, pos0=0):
    """gluon_decode_study.reference with the slots' exact values written over the dequantised keys (pre-RoPE) and
    values."""
    dev = c["KC"].device
    k = c["KLUT"].float()[c["kcodes"].to(dev)] * c["KS"].float()[:, None] + c["KZ"].float()[:, None]
    v = c["VLUT"].float()[c["vcodes"].to(dev)] * c["VS"].float()[..., None] + c["VZ"].float()[..., None]
    k.scatter_(-1, c["KOI"].long()[..., None], c["KOV"].float()[..., None])
    v.scatter_(-1, c["VOI"].long()[..., None], c["VOV"].float()[..., None])
    ang = (pos0 + torch.arange(T, device=dev)).float()[:, None] * c["INVF"][None, :]
    k1, k2 = k[..., : D // 2], k[..., D // 2:]
    k = torch.cat([k1 * ang.cos() - k2 * ang.sin(), k2 * ang.cos() + k1 * ang.sin()], -1)
    p = torch.softmax(c["Q"][:, :4].float() @ k.transpose(1, 2) / math.sqrt(D), -1)
    return p @ v


def mirror(c, T, H, pos0=0):
    """The pair tables and index formulas in PyTorch (whole tokens at once, float32 RoPE from the fp16 tables):
    checks the tables, the channel order and the pair indices on a CPU; not the Gluon code."""
    tb = tables(c)
    kt = tb["TAB"][:64, 0].contiguous().view(torch.float16).view(64, 2).float()
    vt = tb["TAB"][64:, 0].contiguous().view(torch.float16).view(64, 2).float()
    kw = c["KC"].contiguous().view(torch.int32).long()  # [H, T, 12]
    kh = c["KC"][:, :, D // 4:].contiguous().view(torch.int16).long()  # [H, T, 8]
    ch = torch.arange(0, D, 2)  # first channel of each pair
    word, bit = ch // 16, ch % 16
    idx = ((kw[..., word] >> (2 * bit)) & 15) | (((kh[..., word] >> bit) & 3) << 4)  # [H, T, D/2]
    klev = kt[idx].reshape(H, T, D)
    k = klev * c["KS"].float()[:, None] + c["KZ"].float()[:, None]
    vw = c["VC"].contiguous().view(torch.int32).long()
    vh = c["VC"][:, :, D // 4:].contiguous().view(torch.int16).long()
    chv = torch.arange(D)
    Te = T // 2 * 2
    we, wo = vw[:, 0:Te:2][..., chv // 16], vw[:, 1:Te:2][..., chv // 16]
    he, ho = vh[:, 0:Te:2][..., chv // 16], vh[:, 1:Te:2][..., chv // 16]
    b = chv % 16
    vidx = ((we >> (2 * b)) & 3) | (((wo >> (2 * b)) & 3) << 2) | (((he >> b) & 1) << 4) | (((ho >> b) & 1) << 5)
    v = vt[vidx].permute(0, 1, 3, 2).reshape(H, Te, D)  # token pairs back to tokens
    v = v * c["VS"].float()[:, :Te, None] + c["VZ"].float()[:, :Te, None]
    ang = (pos0 + torch.arange(Te)).float()[:, None] * c["INVF"][None, :]
    k1, k2 = k[:, :Te, : D // 2], k[:, :Te, D // 2:]
    k = torch.cat([k1 * ang.cos() - k2 * ang.sin(), k2 * ang.cos() + k1 * ang.sin()], -1)
    q = c["Q"][:, :4].float()
    p = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D), -1)
    return p @ v, Te


def bench(fn):
    """Median time of fn in microseconds (triton's do_bench: L2 flushed between calls)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def graphed(go, merge):
    """Launch once (compiles), then capture kernel + reduce as one CUDA graph; returns its replay (no host launch
    gaps in a timing)."""
    go(), merge()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        go()
        merge()
    return graph.replay


def _slot_case(c, slots):
    return residual_slots(c) if slots == 2 else level_slots(c) if slots == 3 else c


def run_checks(quick=False):
    """Correctness first (against the float32 reference), then 128K timings side by side in one process: this
    kernel without slots, with exact slots and with residual slots (alone, and with the library's reduce in one CUDA
    graph), and unless quick: gluon_decode_study's kernel, the library's natural kernel on the same kind of storage
    and bf16 SDPA (GQA, and with the KV heads expanded); with quick: SDPA (GQA) only."""
    import gluon_decode_study as study

    # runs 38 and 40 also measured the tables in global memory (L1) and register caps: all slower (see gpu_notes.md)
    # and run 41 the prefetch into L1 (the same as L2) or none (6% slower)
    # slots: none, exact, residual, residual in level units added in registers
    variants = ((None, 2, (128,), 0), (None, 2, (128,), 1), (None, 2, (128,), 2), (None, 2, (128,), 3))
    for maxnreg, pf, _, slots in variants:
        for T, pos0 in ((4096, 0), (3000, 12345), (77, 5)):
            c = make_case(T, 2)
            if slots:
                add_slots(c)
            ref = (reference_slots if slots else reference)(c, T, 2, pos0)
            got = run_kernel(_slot_case(c, slots), tables(c), T, 2, 8, pos0, maxnreg, True, pf, slots)
            print(f"pairs kernel maxnreg={maxnreg} prefetch={pf} slots={slots} correctness T={T} pos0={pos0}: "
                  f"relative error {((got - ref).norm() / ref.norm()):.2e}")
    T, H = 131072, 8  # Llama-3-8B shape, one layer, batch 1
    c = add_slots(make_case(T, H))
    tb = tables(c)
    cases = {s: _slot_case(c, s) for s in (0, 1, 2, 3)}
    for rep in range(2):  # twice, interleaved: the spread between repeats bounds the noise
        for maxnreg, pf, splits, slots in variants:
            for nsplit in splits:
                go, merge = launch(cases[slots], tb, T, H, nsplit, maxnreg=maxnreg, pf=pf, slots=slots)
                alone, merged = bench(go), bench(graphed(go, merge))
                print(f"[{rep}] pairs kernel maxnreg={maxnreg} prefetch={pf} slots={slots}, 128K, 8 KV heads, "
                      f"{nsplit} splits: {alone:.1f} us alone, {merged:.1f} us with the library's reduce kernel "
                      "(one graph)")
    if quick:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        kf = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
        vf = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)  # (run 48 passed kf twice: half the bytes)
        q = torch.randn(1, 4 * H, 1, D, device="cuda", dtype=torch.bfloat16)
        print(f"SDPA bf16 GQA (enable_gqa): {bench(lambda: sdpa(q, kf, vf, enable_gqa=True)):.1f} us")
        return
    print(f"study kernel (run 36's), 128 splits, with the torch merge: "
          f"{bench(lambda: study.run_kernel(c, T, H, 128)):.1f} us")
    c.clear()
    tb.clear()
    cases.clear()
    from gpu_suite import fill_storages

    from kvquant import kernels

    kf, vf, sts, _ = fill_storages(1, H, D, T, [(3, "head")], frac=0.0)
    q = torch.randn(1, 4 * H, 1, D, device="cuda").bfloat16()
    st = sts[(3, "head")]
    print(f"library natural kernel (nuq3, no slots): {bench(lambda: kernels.decode_attention(q, st, D**-0.5)):.1f} us")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    print(f"SDPA bf16 GQA (enable_gqa): {bench(lambda: sdpa(q, kf, vf, enable_gqa=True)):.1f} us")
    k16, v16 = kf.repeat_interleave(4, 1), vf.repeat_interleave(4, 1)
    print(f"SDPA bf16, KV heads expanded to 32: {bench(lambda: sdpa(q, k16, v16)):.1f} us")


def timing_case(T, H, g, seed=0):
    """Random packed codes (uniformly random bytes: every code and bit pattern) and tables on the GPU for timing at
    long contexts, without the reference's int64 code tensors; query heads beyond the GQA group g are zero."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    c = make_case(32, H)  # small case: codebooks, scales, frequencies, queries
    row = 3 * D // 8
    c["KC"] = torch.randint(0, 256, (H, T, row), generator=gen, device="cuda", dtype=torch.uint8)
    c["VC"] = torch.randint(0, 256, (H, T, row), generator=gen, device="cuda", dtype=torch.uint8)
    c["VS"] = (torch.rand(H, T, generator=gen, device="cuda") * 0.5 + 0.05).half()
    c["VZ"] = (torch.randn(H, T, generator=gen, device="cuda") * 0.2).half()
    c["Q"][:, g:] = 0
    return c


def run_sweep():
    """The kernel (L2 prefetch) against bf16 SDPA (GQA-aware) at 32K-512K for the Llama-3-8B (8 KV heads, GQA 4)
    and Llama-2-7B (32 heads, MHA) shapes, batch 1, one layer, side by side in one process; the kernel alone, and
    with the reduce (kernel + reduce replayed as one CUDA graph)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for name, H, g in (("llama3-8b", 8, 4), ("llama2-7b", 32, 1)):
        for T in (32768, 131072, 524288):
            c = add_slots(timing_case(T, H, g))
            tb = tables(c)
            best = None
            for nsplit in (1024 // H, 2048 // H):
                go, merge = launch(c, tb, T, H, nsplit, pf=2)
                alone, merged = bench(go), bench(graphed(go, merge))
                best = min(best or (merged, alone, nsplit), (merged, alone, nsplit))
                print(f"{name} {T}: pairs kernel {nsplit} splits: {alone:.1f} us alone, {merged:.1f} us with the "
                      "reduce")
            slots_us = bench(graphed(*launch(c, tb, T, H, 1024 // H, pf=2, slots=1)))  # one slot per key / value
            c3 = {**c, "KOV": slot_words(c["KOI"], c["KOV"]), "VOV": slot_words(c["VOI"], c["VOV"])}  # (timing only)
            slots3_us = bench(graphed(*launch(c3, tb, T, H, 1024 // H, pf=2, slots=3)))
            del c3
            del c, tb
            kf = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
            vf = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
            q = torch.randn(1, H * g, 1, D, device="cuda", dtype=torch.bfloat16)
            us = bench(lambda q_=q, k_=kf, v_=vf, gq=g > 1: sdpa(q_, k_, v_, enable_gqa=gq))
            del kf, vf
            print(f"{name} {T}: SDPA bf16 {us:.1f} us; pairs kernel best {best[0]:.1f} us with the reduce "
                  f"({best[2]} splits): {us / best[0]:.2f}x SDPA ({us / best[1]:.2f}x kernel alone); with one "
                  f"outlier slot per key and value vector {slots_us:.1f} us: {us / slots_us:.2f}x SDPA; with the "
                  f"slots as level residuals added in registers (SLOTS 3) {slots3_us:.1f} us: "
                  f"{us / slots3_us:.2f}x SDPA")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="store_true", help="on CUDA: correctness against PyTorch and timing at 128K")
    ap.add_argument("--quick", action="store_true", help="--run without the study and natural kernel timings")
    ap.add_argument("--sweep", action="store_true", help="on CUDA: 32K-512K, two shapes, against SDPA")
    ap.add_argument("--profile", default=None, help="on CUDA: launch one variant twice at 128K for ncu, given as "
                    "smem,maxnreg,splits (e.g. 1,0,128; maxnreg 0 = none)")
    ap.add_argument("--global-tables", action="store_true", help="static report: the tables in global memory")
    ap.add_argument("--maxnreg", type=int, default=None, help="static report: register cap")
    ap.add_argument("--pf", type=int, default=0, help="static report: prefetch the next block (1: L1, 2: L2)")
    ap.add_argument("--slots", type=int, default=0, help="static report and --profile: 1 = one exact outlier per "
                    "key / value vector, 2 = one residual, 3 = one residual in level units, added in registers")
    ap.add_argument("--mirror", action="store_true", help="on the CPU: tables and pair indices against the reference")
    a = ap.parse_args()
    if a.run:
        run_checks(a.quick)
    elif a.sweep:
        run_sweep()
    elif a.profile:
        sm, mr, ns = (int(x) for x in a.profile.split(","))
        cc = make_case(131072, 8)
        if a.slots:
            cc = _slot_case(add_slots(cc), a.slots)
        go_, _ = launch(cc, tables(cc), 131072, 8, ns, maxnreg=mr or None, smem=bool(sm), pf=a.pf, slots=a.slots)
        go_()
        go_()
        torch.cuda.synchronize()
    elif a.mirror:
        for T, pos0 in ((200, 0), (257, 9000)):
            cc = make_case(T, 2, device="cpu")
            got, Te = mirror(cc, T, 2, pos0)
            ref = reference({**cc, "kcodes": cc["kcodes"][:, :Te], "vcodes": cc["vcodes"][:, :Te],
                             "VS": cc["VS"][:, :Te], "VZ": cc["VZ"][:, :Te]}, Te, 2, pos0)
            print(f"mirror T={Te} pos0={pos0}: relative error {((got - ref).norm() / ref.norm()):.2e}")
    else:
        static_report(not a.global_tables, a.maxnreg, a.pf, a.slots)
