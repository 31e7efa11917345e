"""The "pairs" decode kernel (Gluon, NVIDIA sm_80+): split-K decode attention over the quantized region of a layer
stored as 2-, 3- or 4-bit codes, head_dim 128, 64 or 256, at most one outlier slot per key vector (three at 256;
nuq2/3/4-1%), with
head-group values (at most one slot per vector: a fixed merge) or token-group values (the calibration default: one zero
/ scale and one row of slots per token for every KV head; each KV head scatters its run of slots into a shared-memory
tile).

It was developed as the study ``benchmarks/gluon_decode_pairs.py`` (runs 37-48 in ``benchmarks/gpu_runs``, notes in
``benchmarks/gpu_notes.md``; the study scripts are in the history up to commit 6d41df6). This is that kernel with
what the library needs: batches, any positions, the attention mask, the library's slot format, device lengths for
CUDA graphs, and the library's partials layout, so that the Triton kernel's sinks/window split and the reduce kernel
finish the job (:func:`kvquant.kernels.decode_attention` launches the three). Static SASS counts:
``benchmarks/ptx_count.py --kernel pairs``.

Per program (one warp): one (sequence, KV head, split) of 32-token blocks. head_dim (constexpr D) 128 is four chunks of
32 channels (16 and their RoPE partners D / 2 later), 64 two; the code below says 128 where it describes the layout.
head_dim 256 is eight key chunks, more than one warp's registers hold with eight accumulator chunks, so it runs in two
launches (SCORES_ONCE, constexpr PASS): the scores pass computes the scores and accumulates value half 0 (the
head_dim-128 value path), handing each block's P (fp16, value scale folded in) and softmax rescale to the value pass
through global memory, which accumulates value half 1 (offset by 128) from them with no key work (128-132 registers,
no spills): 0.63-0.67x the instructions per block of the one launch (PASS 0, SCORES_ONCE off or below
SCORES_ONCE_MIN_TOKEN_HEADS), where two programs share a split, one per value half, both computing all the scores.
The key rows are read in two halves (the words of chunks 0-3, then 4-7), and up to 3 key slots per
vector (1% of 256) go through a key slot tile (below).
- **Scores** S^T = K Q^T with mma.sync m16n8k16: tokens are M, the GQA group's query heads N (padded to 8).
- **Key levels** from a 64-entry table of fp16 pairs in shared memory, replicated per lane (any index pattern is
  free of bank conflicts): two neighbouring codes of an operand register form a 6-bit index read in place from the
  packed words (two funnel shifts, two ``lop3``), and the looked-up word *is* the MMA operand register.
- **Key channel order** inside an MMA chunk chosen so a thread's four channels share a byte of the low plane (2/3-bit
  codes). 4-bit codes (constexpr B4) are a byte per channel pair: keys take the natural order, so a thread's two
  pairs are byte l % 4 of two consecutive words, and the 256-entry tables (16 KB for both, as for 3 bits) are
  replicated over 8 lane groups, not 32: lanes of a group that read different entries of a bank wait on each other.
- **Per-channel key affine and RoPE** in fp16x2. RoPE of a block's keys comes from a [block offset, channel pair]
  cos/sin table stored in the order the threads hold it (one 128-byte line per warp-wide load); the query is rotated
  back by the block's first position (once per split, then per block from a small table). A block whose positions
  are not contiguous (left padding, custom position ids), or whose start lies off that table, first writes computed
  angles to the program's scratch in the same order; the chunk loop reads either through one pointer (no branch).
- **Values** looked up as channel pairs like the keys; ``movmatrix.trans`` turns each register into the token pair
  that the V^T operand needs. The per-token scale is folded into P, the zero into one term per query head.
- **Outlier slots** (the library's exact fp16 values and their channel): keys and head-group values (one slot per
  vector): each exact value, in code-level units ((exact - zero) / scale), replaces its channel's looked-up level
  before the affine map: a compare, an AND-OR merge and a select per register; no code lookup for the slot.
  head_dim 256 (up to 3 key slots; constexpr KTILE): merged that way, the slots cost 1150 of a block's 4261
  instructions and 72 live registers (ptxas spilled into the hot loop). Instead one lane per token writes its slots'
  levels into a [token, 32 channels] fp16 tile of the chunk (2 KB, NaN elsewhere; each chunk first clears the cells
  the last one wrote), and each key chunk reads it with ``ldmatrix`` straight into its level registers' layout and
  merges it as the value tile is merged (below).
  Token-group values (a run of slots per head and token, core.codec.head_ends), and head-group rows with several
  slots: one lane per token writes each slot's exact value in level units ((exact - zero) / scale) into a [token,
  channel] fp16 tile in shared memory that holds NaN elsewhere, one rank per pass up to the block's longest run (3.71
  for 10 slots over 8 KV heads, benchmarks/slot_passes.py); each value chunk then reads the tile with ``ldmatrix``
  straight into its level registers' layout, and every half that is a number replaces the looked-up level (a
  ``set.num`` mask and one ``lop3`` per register); the block refills the tile with NaN. The scatter needs no code
  lookup (until a77a63b it wrote residuals against the slot's looked-up level: 185.0 us at 128K batch 1, now 181.0,
  run 74). The run ends, slots and code rows of the next block are prefetched into L1.
- **Loads**: key rows as 16-byte loads, high-plane codes as 32-bit words, and a PTX prefetch of the next block's
  rows into L2.

The tables (16 KB), the value slot tile (8 KB after them) and the key slot tile (2 KB after those) are read and
written through inline PTX at the address of Triton's dynamic shared memory (symbol ``global_smem``): Gluon 3.6 has
no indexed shared-memory access. The kernel keeps every allocation alive to the end and the host checks that they are
all the shared memory there is, each tile at its offset (:func:`_check_shared`). Hence the pinned Triton range in
:func:`available`; elsewhere the library uses its Triton kernels.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

# the head_dims it compiles for (constexpr D: 2, 4 or 8 chunks of 32 channels), the key slots it merges by head_dim
from . import PAIRS_HEAD_DIMS as HEAD_DIMS
from . import PAIRS_MAX_KEY_SLOTS as MAX_KEY_SLOTS
from . import _block_splits  # the split arithmetic shared with the Triton kernels' rule
from ._triton import PREFETCH_L1, PREFETCH_L2  # the prefetches' PTX, shared with the Triton kernels

BT, D, N = 32, 128, 8  # tokens per block, value channels per program (the widest), query heads per program (the GQA
# group, padded)
TABLE_SHARED_BYTES = 16384  # the key and value pair tables
TILE_OFF = TABLE_SHARED_BYTES  # then, with slot runs (VRUN), the value slots' level tile: BT tokens x D fp16
TILE_BYTES = BT * 2 * D
_TILE_OFF = gl.constexpr(TILE_OFF)
_TILE_ROWS = gl.constexpr(TILE_BYTES // 128)  # the tile as rows of 32 int32
KTILE_BYTES = BT * 64  # head_dim 256 (KTILE): then the key slots' tile of one chunk, BT tokens x 32 channels fp16
_KTILE_ROWS = gl.constexpr(KTILE_BYTES // 128)
_TILE_BYTES = gl.constexpr(TILE_BYTES)
_BT = gl.constexpr(BT)
SCRATCH_KEY = 4 * 2 * 8 * 32  # a program's scratch (int32 words) per 128 key channels (head_dim 256: twice): a block's
SCRATCH_WORDS = SCRATCH_KEY + 4 * 32  # key cos/sin in fragment order (as CSP), then the query rotation's (a BROT row)
_SCRATCH_KEY = gl.constexpr(SCRATCH_KEY)
_SCRATCH_WORDS = gl.constexpr(SCRATCH_WORDS)


def p_words(group: int) -> int:
    """head_dim 256 in two passes (PASS 1, 2): the 32-bit words of a block's hand-over from the scores pass to the
    value pass, P [group, BT] (value scale folded in) as fp16 and the softmax rescale alpha [group] as fp32; each
    program's words start with its z term [group]."""
    return (BT // 2 + 1) * group


# ---------------------------------------------------------------------------------------------------- fp16x2 helpers
@gluon.jit
def _hfma2(a, b, c):
    return gl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _pack2(lo, hi):
    """Two fp32 -> one fp16 pair (lo in the low half)."""
    return gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=gl.int32,
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
def _pick8(j: gl.constexpr, x0, x1, x2, x3, x4, x5, x6, x7):
    if j < 4:
        return _pick4(j, x0, x1, x2, x3)
    else:
        return _pick4(j - 4, x4, x5, x6, x7)


@gluon.jit
def _cos_sin(ang):
    """cos and sin of fp32 angles, range-reduced to [-pi, pi] first (as the Triton kernels' _cos_sin)."""
    k = gl.floor(ang * 0.15915494309189535 + 0.5)
    r = gl.fma(-k, 6.28125, ang)
    r = gl.fma(-k, 0.0019353071795864769, r)
    c = gl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [r], dtype=gl.float32, is_pure=True, pack=1)
    s = gl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [r], dtype=gl.float32, is_pure=True, pack=1)
    return c, s


@gluon.jit
def _kchan(k, j: gl.constexpr, B4: gl.constexpr = False, D: gl.constexpr = 128):
    """Key channel of operand K index k (0..31) in chunk j (channels 16 j .. and their RoPE partners D / 2 later):
    2/3-bit codes: the 4 channels a thread holds are neighbours (one byte of the low plane); B4 (4-bit codes): natural
    order (a thread's two channel pairs are byte l % 4 of two consecutive words)."""
    if B4:
        return (D // 2) * (k // 16) + 16 * j + k % 16
    else:
        return (D // 2) * (k // 16) + 16 * j + 4 * ((k % 16) // 2 % 4) + 2 * ((k % 16) // 8) + k % 2


@gluon.jit
def _rot_q(qj, ang_or_tab, j: gl.constexpr, N: gl.constexpr, FROM_TABLE: gl.constexpr, B4: gl.constexpr = False):
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
        ca, sa = _cos_sin(pos * gl.load(INVF + _kchan(mq, j, B4)))
        ca, sa = ca[:, None], sa[:, None]
    return gl.reshape(gl.permute(gl.join(qa * ca + qb * sa, qb * ca - qa * sa), [2, 0, 1]), [32, N]).to(gl.float16)


@gluon.jit
def _q_table_store(qj, ptr, pos, INVF, j: gl.constexpr, N: gl.constexpr, B4: gl.constexpr = False):
    """Store cos / sin of pos * theta for the 16 K indices of query chunk j at ptr (16 cos, then 16 sin), in the
    layout in which _rot_q(qj, ptr, j, N, True) reads them (so each reading thread wrote its values itself)."""
    qa, qb = gl.split(gl.permute(gl.reshape(qj.to(gl.float32), [2, 16, N]), [1, 2, 0]))
    mq = gl.arange(0, 16, layout=gl.SliceLayout(1, qa.type.layout))
    ca, sa = _cos_sin(pos * gl.load(INVF + _kchan(mq, j, B4)))
    gl.store(ptr + mq, ca)
    gl.store(ptr + 16 + mq, sa)


@gluon.jit
def _q_chunk(Qb, sqh, bn, bk, j: gl.constexpr, qk_scale, GROUP: gl.constexpr, B4: gl.constexpr = False,
             D: gl.constexpr = 128):
    """Query chunk j [32 (K index), N (head)] scaled by qk_scale, zero for the padding heads."""
    q = gl.load(Qb + bn[None, :] * sqh + _kchan(bk, j, B4, D)[:, None], mask=(bn < GROUP)[None, :], other=0.0)
    return (q.to(gl.float32) * qk_scale).to(gl.float16)


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
VW4 = gl.SliceLayout(4, V5)  # [sw, mh, ml, ph]: the same for 4-bit codes (word 4 i + 2 sw + mh)
C_P3 = {d: gl.constexpr(_axis(P3, d, 3)) for d in range(3)}
C_V5 = {d: gl.constexpr(_axis(V5, d, 5)) for d in range(5)}
C_VW = {d: gl.constexpr(_axis(VW, d, 3)) for d in range(3)}
C_VW4 = {d: gl.constexpr(_axis(VW4, d, 4)) for d in range(4)}
P3_T, P3_H, P3_P = C_P3[0], C_P3[1], C_P3[2]
V5_SW, V5_MH, V5_ML, V5_PH, V5_PL = C_V5[0], C_V5[1], C_V5[2], C_V5[3], C_V5[4]
VW_SW, VW_ML, VW_PH = C_VW[0], C_VW[1], C_VW[2]
VW4_SW, VW4_MH, VW4_ML, VW4_PH = C_VW4[0], C_VW4[1], C_VW4[2], C_VW4[3]
KW_L = gl.constexpr(gl.SliceLayout(2, P3))  # [token, half]: a key word, shared by a lane group
# [token, word]: a lane group's 4 tokens, all 8 words of each in consecutive registers (16-byte loads)
KROW = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 1], [0, 2], [0, 4], [8, 0], [16, 0]], lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
    warp_bases=[], block_bases=[], shape=[BT, 8]))
KROW4 = gl.constexpr(gl.DistributedLinearLayout(  # the same for the 4 high-plane words of a row
    reg_bases=[[0, 1], [0, 2], [8, 0], [16, 0]], lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
    warp_bases=[], block_bases=[], shape=[BT, 4]))
KROW2 = gl.constexpr(gl.DistributedLinearLayout(  # head_dim 64: the 2 high-plane words of a row
    reg_bases=[[0, 1], [8, 0], [16, 0]], lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
    warp_bases=[], block_bases=[], shape=[BT, 2]))
KROW16 = gl.constexpr(gl.DistributedLinearLayout(  # the same for the 16 words of a 4-bit row
    reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [8, 0], [16, 0]], lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
    warp_bases=[], block_bases=[], shape=[BT, 16]))
KC_L = gl.constexpr(gl.SliceLayout(1, P3))  # [token, p]: per channel pair below 64
KS_L = gl.constexpr(gl.SliceLayout(0, P3))  # [half, p]: per channel pair


@gluon.jit
def _row_index(LAY: gl.constexpr, W: gl.constexpr, BT: gl.constexpr):
    """(token [BT, 1], word [1, W]) indices of a block's rows of W 32-bit words in the row layout LAY."""
    return (gl.arange(0, BT, layout=gl.SliceLayout(1, LAY))[:, None],
            gl.arange(0, W, layout=gl.SliceLayout(0, LAY))[None, :])


@gluon.jit
def _entry(w, h, rw, rh, lane4):
    """Byte offset of the pair-table entry of a channel pair: w rotated right by rw puts its 4 low-plane bits at
    bits 7-10, h rotated by rh its 2 high-plane bits at 11-12, OR 4 lane (bits 2-6)."""
    return gl.inline_asm_elementwise(
        "{ .reg .b32 a, b; shf.r.wrap.b32 a, $1, $1, $3; shf.r.wrap.b32 b, $2, $2, $4; "
        "lop3.b32 a, a, 0x780, $5, 0xEA; lop3.b32 $0, b, 0x1800, a, 0xEA; }",  # (x & mask) | y, twice
        "=r,r,r,r,r,r", [w, h, rw, rh, lane4], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _entry_lo(w, rw, lane4):
    """_entry for 2-bit storage (no high plane): the channel pair's 4 low-plane bits at bits 7-10, OR 4 lane."""
    return gl.inline_asm_elementwise(
        "{ .reg .b32 a; shf.r.wrap.b32 a, $1, $1, $2; lop3.b32 $0, a, 0x780, $3, 0xEA; }",
        "=r,r,r,r", [w, rw, lane4], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _entry_byte(w, rw, lane8):
    """_entry for 4-bit storage: the channel pair's byte rotated to bits 5-12, OR 4 (lane % 8) (the 4-bit tables hold
    256 entries for 8 lane groups: entry e of lane l at word 8 e + l % 8)."""
    return gl.inline_asm_elementwise(
        "{ .reg .b32 a; shf.r.wrap.b32 a, $1, $1, $2; lop3.b32 $0, a, 0x1FE0, $3, 0xEA; }",
        "=r,r,r,r", [w, rw, lane8], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _lookup(w, h, rw, rh, lane4, OFF: gl.constexpr, HI: gl.constexpr, B4: gl.constexpr = False):
    """The entry of table OFF (0: keys, 1: values) from shared memory (Triton's dynamic shared memory, symbol
    global_smem, whose constant address ptxas folds into the load). HI: 3-bit codes (h holds the high plane); else
    2-bit codes (h is not read: the entries of codes 0-3 are those whose high bits are 0). B4: 4-bit codes (a byte
    per pair; lane4 is 4 (lane % 8); h is not read)."""
    if B4:
        return _lds(_entry_byte(w, rw, lane4) + 8192 * OFF)
    elif HI:
        return _lds(_entry(w, h, rw, rh, lane4) + 8192 * OFF)
    else:
        return _lds(_entry_lo(w, rw, lane4) + 8192 * OFF)


@gluon.jit
def _lds(off):
    """The 32-bit word at byte offset off of the tables (read-only after the kernel's first barrier)."""
    return gl.inline_asm_elementwise("{ .reg .u32 b; mov.u32 b, global_smem; add.u32 b, b, $1; "
                                     "ld.shared.b32 $0, [b]; }", "=r,r", [off], dtype=gl.int32, is_pure=True,
                                     pack=1)


@gluon.jit
def _tile_off(t, c, D: gl.constexpr = 128):
    """Byte offset in shared memory of the slot level of token t (< BT), channel c (< D) in the value slots' tile:
    [token, channel] fp16 rows of 2 D bytes whose 16-byte chunks are XOR-swizzled by t % 8, so the eight rows that
    one ldmatrix reads (tokens 8 a .. 8 a + 7) fall in distinct banks."""
    return _TILE_OFF + t * (2 * D) + ((c // 8) ^ (t % 8)) * 16 + (c % 8) * 2


@gluon.jit
def _ldsm_rows(ml, ph, pl):
    """The tile row that the lane (pl, ml) of V5 addresses for the _ldsm4 of the register pack ph (its four registers
    sw, mh): matrix m = ml // 2, i.e. channels 16 (m % 2) + 8 (m // 2) of the chunk (the register sw + 2 mh = m),
    row pl + 4 (ml % 2), i.e. token 8 ph + pl + 4 (ml % 2). Returns (token, channel less 32 i)."""
    return 8 * ph + pl + 4 * (ml % 2), 16 * ((ml // 2) % 2) + 8 * (ml // 4)


@gluon.jit
def _sts16(off, val, pred):
    """Store the low 16 bits of val at shared byte offset off where pred != 0 (no result: the 0 returned keeps the
    side effect in place)."""
    return gl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 b; .reg .b16 lo, hi; setp.ne.b32 p, $3, 0; mov.u32 b, global_smem; "
        "add.u32 b, b, $1; mov.b32 {lo, hi}, $2; @p st.shared.b16 [b], lo; mov.b32 $0, 0; }",
        "=r,r,r,r", [off, val, pred.to(gl.int32)], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _clear16(off):
    """Fill 16 bytes at shared byte offset off with fp16 NaNs (0xFFFF: no slot in the tile)."""
    return gl.inline_asm_elementwise(
        "{ .reg .u32 b, z; mov.u32 z, 0xFFFFFFFF; mov.u32 b, global_smem; add.u32 b, b, $1; "
        "st.shared.v4.b32 [b], {z, z, z, z}; mov.b32 $0, 0; }", "=r,r", [off], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _tile_merge(lev, t):
    """Each fp16 half of the tile word t that is a number (a slot's exact level) replaces that half of the looked-up
    pair lev; NaN halves (no slot) keep it: a per-half mask from set.num, then one lop3 ((t & m) | (lev & ~m))."""
    return gl.inline_asm_elementwise(
        "{ .reg .b32 m; set.num.u32.f16x2 m, $2, $2; lop3.b32 $0, $1, $2, m, 0xD8; }",
        "=r,r,r", [lev, t], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _warp_sync(x):
    """bar.warp.sync: the warp's shared-memory writes before it are visible to its reads after it."""
    return gl.inline_asm_elementwise("bar.warp.sync -1; mov.b32 $0, 0;", "=r,r", [x], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def _ldsm4(off):
    """ldmatrix .x4 from shared byte offset off (the same for the four elements of a pack): each lane gets, of the
    8x8 fp16 matrix k whose rows lanes 8 k .. 8 k + 7 address, the pair (row lane // 4, columns 2 (lane % 4) + e)."""
    return gl.inline_asm_elementwise(
        "{ .reg .u32 b; mov.u32 b, global_smem; add.u32 b, b, $4; "
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {$0, $1, $2, $3}, [b]; }",
        "=r,=r,=r,=r,r,r,r,r", [off], dtype=gl.int32, is_pure=False, pack=4)


@gluon.jit
def _vlookup(VC32, t0, v_tok, svc_t, sww, vmask, v_rw, v_rh, v_base, i: gl.constexpr, D: gl.constexpr,
             HI: gl.constexpr, B4: gl.constexpr = False, v_tok4=None, vw4=None, vmask4=None, i0=0):
    """The value levels of channels 32 (i0 + i) .. + 31 of a block, as channel pairs in the layout V5 (low-plane words
    2 (i0 + i) + sw, with HI (3-bit codes) high-plane word D / 16 + i0 + i; B4 (4-bit codes): words 4 (i0 + i) + vw4,
    vw4 = 2 sw + mh, at tokens v_tok4). i0: the program's first value chunk (head_dim 256: 0 or 4; else 0)."""
    if B4:
        w4 = gl.load(VC32 + (t0 + v_tok4) * (svc_t // 4) + 4 * (i0 + i) + vw4, mask=vmask4, other=0)
        return _lookup(w4[:, :, :, :, None], w4[:, :, :, :, None], v_rw, v_rh, v_base, 1, False, True)
    w = gl.load(VC32 + (t0 + v_tok) * (svc_t // 4) + 2 * (i0 + i) + sww, mask=vmask, other=0)
    if HI:
        h = gl.load(VC32 + (t0 + v_tok) * (svc_t // 4) + D // 16 + (i0 + i) + 0 * sww, mask=vmask, other=0)
    else:
        h = w
    return _lookup(w[:, None, :, :, None], h[:, None, :, :, None], v_rw, v_rh, v_base, 1, HI)


@gluon.jit
def _prefetch(ptr, mask, PF: gl.constexpr):
    """PTX prefetch of the lines holding ptr (where mask) into L1 (PF 1) or L2 (PF 2); no register result."""
    if PF == 2:
        gl.inline_asm_elementwise(PREFETCH_L2, "=r,l,r", [ptr.to(gl.int64, bitcast=True), mask.to(gl.int32)],
                                  dtype=gl.int32, is_pure=False, pack=1)
    elif PF == 1:
        gl.inline_asm_elementwise(PREFETCH_L1, "=r,l,r", [ptr.to(gl.int64, bitcast=True), mask.to(gl.int32)],
                                  dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _slot_word(lvl, c):
    """A slot's exact value in code-level units (fp32; (exact - zero) / scale, which the affine map takes back to the
    exact value) as an fp16 in the half of its channel pair's word that holds channel c, the mask of the other half
    (kept from the looked-up pair), and the pair's first channel (c with bit 0 clear; 254 for a masked slot's
    c = 255: no pair matches)."""
    bits = gl.minimum(gl.maximum(lvl, -65000.0), 65000.0).to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32)
    odd = (c & 1) != 0
    return gl.where(odd, bits << 16, bits & 65535), gl.where(odd, 65535, -65536), c & 254


@gluon.jit
def _key_rows(KC32, t0, skc_t, hi_t, trow, wcol, trow16, wcol16, trow4, hcol, g: gl.constexpr, HI: gl.constexpr,
              B4: gl.constexpr, D: gl.constexpr):
    """A block's key words as (w_l0, w_l1, w_m0, w_m1, h_w0, h_w1) (those the codes do not use repeat w_l0): 2/3-bit
    low-plane words [token, 8] (word 4 half + 2 jh + jl, split by jl then jh), 3-bit high-plane words [token, 4] (read
    as 32-bit words: half-word 4 half + j is half j % 2 of word 2 half + j // 2, no sign extension), 4-bit words
    [token, 16] (word 8 half + 4 jh + 2 jl + s). head_dim 256: those of chunks 4 g .. 4 g + 3 (j % 4 in place of j),
    i.e. low-plane words 8 half + 4 g + j % 4, high-plane words 4 half + 2 g + (j % 4) // 2, 4-bit words
    16 half + 8 g + 2 (j % 4) + s; head_dim 64: chunk j's words as [token, half]."""
    if D == 256:
        lw = wcol + 4 * (wcol // 4) + 4 * g
        hw = hcol + 2 * (hcol // 2) + 2 * g
        bw = wcol16 + 8 * (wcol16 // 8) + 8 * g
    else:
        lw = wcol
        hw = hcol
        bw = wcol16
    if B4:
        wrow = gl.load(KC32 + (t0 + trow16) * (skc_t // 4) + bw, mask=(t0 + trow16) < hi_t, other=0)
    else:
        wrow = gl.load(KC32 + (t0 + trow) * (skc_t // 4) + lw, mask=(t0 + trow) < hi_t, other=0)
    if HI:
        hrow = gl.load(KC32 + (t0 + trow4) * (skc_t // 4) + D // 16 + hw, mask=(t0 + trow4) < hi_t, other=0)
    w_m0 = wrow
    w_m1 = wrow
    h_w0 = wrow
    h_w1 = wrow
    if D >= 128:
        if B4:
            w_s0, w_s1 = gl.split(gl.reshape(wrow, [_BT, 2, 2, 2, 2]))  # [token, half, jh, jl] of s = 0, 1
            w_l0, w_l1 = gl.split(w_s0)
            w_m0, w_m1 = gl.split(w_s1)
        else:
            w_l0, w_l1 = gl.split(gl.reshape(wrow, [_BT, 2, 2, 2]))  # word 4 half + 2 jh + jl
        if HI:
            h_w0, h_w1 = gl.split(gl.reshape(hrow, [_BT, 2, 2]))  # word 2 half + j // 2
    else:  # head_dim 64: chunk j's words as [token, half]
        if B4:
            w_s0, w_s1 = gl.split(gl.reshape(wrow, [_BT, 2, 2, 2]))  # [token, half, j] of s = 0, 1
            w_l0, w_l1 = gl.split(w_s0)
            w_m0, w_m1 = gl.split(w_s1)
        else:
            w_l0, w_l1 = gl.split(gl.reshape(wrow, [_BT, 2, 2]))  # word 2 half + j
        if HI:  # word half, half-word j
            h_w0 = hrow
            h_w1 = hrow
    return w_l0, w_l1, w_m0, w_m1, h_w0, h_w1


@gluon.jit
def _key_slot(KOI, KOV, KZI, kt, km, sko_t, r: gl.constexpr, q3, B4: gl.constexpr, D: gl.constexpr):
    """Key slot r of tokens kt (where km) as _slot_word gives it ((exact - zero) / scale in its channel's half, the
    mask of the other half), and its pair's first channel less the lane's offset in the chunk (compared with a
    constant per register)."""
    # [BT, 1, 1]; 255 for tokens past the end: no pair below 254 matches (at head_dim 256 the pair 254-255 may, with
    # a finite level: those tokens' scores are masked)
    ci = gl.load(KOI + kt * sko_t + r, mask=km, other=255).to(gl.int32)
    xk = gl.load(KOV + kt * sko_t + r, mask=km, other=0.0).to(gl.float32)
    k_val, k_keep, k_sp = _slot_word(
        (xk - gl.load(KZI + ci, mask=km, other=0.0)) * gl.load(KZI + D + ci, mask=km, other=0.0), ci)
    if B4:  # [BT, 1, 8]
        k_rel = k_sp - 2 * (q3 % 4)
    else:
        k_rel = k_sp - 4 * (q3 % 4)
    return k_val, k_keep, k_rel


@gluon.jit
def _ktile_off(t, c, KT_OFF: gl.constexpr, D: gl.constexpr, B4: gl.constexpr):
    """Byte offset in shared memory of the slot level of token t (< BT), key channel c in the key slots' tile (KTILE,
    one chunk at a time; the chunk of c is (c % (D / 2)) // 16). Rows of 64 bytes per token: four 16-byte column
    blocks, block 2 half + p // 4 holding the pairs p % 4 = m (m = 0..3, elements e = 0, 1) of the chunk's half in
    the order of one ldmatrix row, where P3 puts channel c = 16 j + 4 m + 2 (p // 4) + e of the half (B4, natural
    order: 16 j + 8 (p // 4) + 2 m + e); XOR-swizzled by (t // 2) % 4 so that the eight rows one ldmatrix reads
    (tokens 8 a .. 8 a + 7) fall in distinct banks."""
    cl = c % 16
    if B4:
        m = (cl // 2) % 4
        pb = cl // 8
    else:
        m = cl // 4
        pb = (cl // 2) % 2
    cb = 2 * (c // (D // 2)) + pb
    return KT_OFF + t * 64 + (cb ^ ((t // 2) % 4)) * 16 + m * 4 + (cl % 2) * 2


@gluon.jit
def _ktile_rows(t3, h3, q3, D: gl.constexpr, B4: gl.constexpr):
    """The key slot tile's row that the P3 lane (p % 4, token % 8) addresses for the _ldsm4 of its register pack
    (half, token // 16), whose four registers (p // 4, token // 8 % 2) = matrix k = p // 4 + 2 (token // 8 % 2):
    lane l addresses row l % 8 = p % 4 + 4 (token % 2) of matrix l // 8 = (token % 8) // 2, i.e. token 16 (t // 16) +
    8 ((t // 4) % 2) + p % 4 + 4 (t % 2), column block 2 half + (t // 2) % 2 (channel 2 ((t // 2) % 2) of its
    chunk's half; B4: 8 ((t // 2) % 2)). Returns (token, channel) for _ktile_off."""
    return (16 * (t3 // 16) + 8 * ((t3 // 4) % 2) + (q3 % 4) + 4 * (t3 % 2),
            (D // 2) * h3 + (8 if B4 else 2) * ((t3 // 2) % 2))


@gluon.jit
def _key_slot_cell(KOI, KOV, KZI, kt, km, sko_t, r: gl.constexpr, s_t, KT_OFF: gl.constexpr, D: gl.constexpr,
                   B4: gl.constexpr):
    """Key slot r of token kt = t0 + s_t (one token per lane; where km) for the key slot tile: its cell's byte offset,
    its level ((exact - zero) / scale) as fp16 bits, and its chunk (-1 where km is false: never written)."""
    ci = gl.load(KOI + kt * sko_t + r, mask=km, other=0).to(gl.int32)
    xk = gl.load(KOV + kt * sko_t + r, mask=km, other=0.0).to(gl.float32)
    lvl = (xk - gl.load(KZI + ci)) * gl.load(KZI + D + ci)
    bits = gl.minimum(gl.maximum(lvl, -65000.0), 65000.0).to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32)
    return _ktile_off(s_t, ci, KT_OFF, D, B4), bits, gl.where(km, (ci % (D // 2)) // 16, -1)


# decode steps change these every step: not specialised (no recompilation mid-generation)
_DYNAMIC = ("smask_b", "n_s", "n_q", "chunk", "NSPLIT_Q")


@gluon.jit(do_not_specialize=_DYNAMIC)
def _pairs_kernel(Q, PACC, PM, PL, KC, KOI, KOV, VC, VZ, VS, VOI, VOV, VOE, QPOS, MASK, LENS,
                  TAB, KSZ, KZI, CSP, BROT, INVF, SCR,
                  qk_scale, sqb, sqh, skc_b, skc_h, skc_t, sko_b, sko_h, sko_t, svc_b, svc_h, svc_t,
                  svs_b, svs_h, svs_t, svo_b, svo_h, svo_t, soe_b, soe_t, sqp_b, smask_b,
                  n_s, n_q, chunk, NSPLIT_Q, n_brot, PSC, p_blocks,
                  H_KV: gl.constexpr, GROUP: gl.constexpr, CK: gl.constexpr, CV: gl.constexpr,
                  VRUN: gl.constexpr, VENDS: gl.constexpr, V_OFF: gl.constexpr, KTILE: gl.constexpr,
                  HAS_MASK: gl.constexpr, DEVLEN: gl.constexpr, PF: gl.constexpr, HI: gl.constexpr,
                  B4: gl.constexpr, BT: gl.constexpr, D: gl.constexpr, N: gl.constexpr, PASS: gl.constexpr):
    """Split pid of KV head h of sequence b (grid: NSPLIT_Q, H_KV, B; head_dim 256: 2 NSPLIT_Q, program 2 pid + vh
    accumulating value channels 128 vh ..): tokens [pid chunk, pid chunk + chunk) of the quantized region. Storage
    as LayerStorage holds it (codes [B, H, cap, 3 D / 8] uint8 at 3 bits (HI), [B, H, cap, D / 4] at 2 bits,
    [B, H, cap, D / 2] at 4 bits (B4); value zero/scale [B, H, cap, 1] fp16; slots [B, H, cap, CK/CV]; positions
    [B, cap] int32). Values in runs (VRUN: token-group value rows with slots, whose zero / scale / slots
    [B, 1, cap, ..] serve every KV head (the host passes head strides 0, V_OFF = D: head h's slot elements are h D ..),
    or head-group rows with several slots, V_OFF = 0): one scatter pass per slot rank, up to the block's longest run
    of head h (VENDS: the runs' ends VOE [B, 1, cap, H], core.codec.head_ends; else every slot of the row is tried and
    kept if it lies in head h). KTILE (head_dim 256 with key slots): the key slots through a per-chunk tile after
    the tables and the value tile (_ktile_off), not merged into every key register. TAB [128, 32] int32: the key
    then the value pair table, lane-replicated (4-bit: over 8 lane groups); KSZ [H, 2, D/2] int32: key scale and
    zero as fp16 pairs; KZI [H, 2, D] fp32: key zero and 1 / scale (for the slots); CSP [4, 2, 8, 32] int32: cos /
    sin of the block offsets in fragment order; BROT [n_brot, 4, 2, 16] fp32: the per-block query rotation; INVF
    [D/2]. Writes partials row ((b H_KV + h) GROUP + n) (NSPLIT_Q + 1) + pid of PACC [.., D], PM, PL (log2 units).
    PASS (head_dim 256): 0, both value halves in one launch (grid axis 0: 2 NSPLIT_Q, program 2 pid + vh), each
    program computing all the scores; 1, the scores and value half 0, handing each block's P and alpha and the final z
    term to the value pass through PSC (per program: GROUP + p_blocks p_words(GROUP) 32-bit words); 2, value half 1
    from them, launched after pass 1 (grid axis 0: NSPLIT_Q for both).
    """
    # head_dim 256: value half vh of the program (value channels DV = 128 vh ..): the scores of 256 key channels, 8
    # query and 8 accumulator chunks would not fit one warp's registers
    NV: gl.constexpr = 1 + D // 256
    DV: gl.constexpr = D // NV
    KEYS: gl.constexpr = PASS != 2  # this program computes the scores
    pid0 = gl.program_id(0)
    if PASS == 1:
        pid = pid0
        vh = 0
    elif PASS == 2:
        pid = pid0
        vh = 1
    elif NV == 2:
        pid = pid0 // 2
        vh = pid0 % 2
    else:
        pid = pid0
        vh = 0
    hd = gl.program_id(1)
    bb = gl.program_id(2).to(gl.int64)
    h64 = hd.to(gl.int64)
    if DEVLEN:  # CUDA-graph replay: the quantized length from device memory, each split's share of it
        n_q = gl.load(LENS)
        chunk = gl.cdiv(gl.cdiv(n_q, NSPLIT_Q), BT) * BT
    KC += bb * skc_b + h64 * skc_h
    VC += bb * svc_b + h64 * svc_h
    VS += bb * svs_b + h64 * svs_h
    VZ += bb * svs_b + h64 * svs_h
    KOI += bb * sko_b + h64 * sko_h
    KOV += bb * sko_b + h64 * sko_h
    VOI += bb * svo_b + h64 * svo_h
    VOV += bb * svo_b + h64 * svo_h
    VOE += bb * soe_b
    QP = QPOS + bb * sqp_b
    SCR += ((bb * H_KV + h64) * NSPLIT_Q * NV + pid0) * (_SCRATCH_WORDS * NV)  # this program's scratch: key, then
    SCRQ = SCR.to(gl.pointer_type(gl.float32)) + _SCRATCH_KEY * NV  # query tables
    MROW = MASK + bb * smask_b + n_s
    KSZ += hd * D
    KZI += hd * 2 * D
    Qb = Q + bb * sqb + hd * GROUP * sqh
    row0 = ((bb * H_KV + h64) * GROUP) * (NSPLIT_Q + 1) + pid  # partial row of query head n: row0 + n (NSPLIT_Q + 1)
    lo_t = pid * chunk
    hi_t = gl.minimum(lo_t + chunk, n_q)
    PW: gl.constexpr = (BT // 2 + 1) * GROUP  # (p_words)
    if PASS > 0:  # this program's hand-over words: its z term, then P and alpha of each block
        PS = PSC + ((bb * H_KV + h64) * NSPLIT_Q + pid) * (GROUP + p_blocks * PW)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    tb_l: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [1, 1], [1, 0])
    # the two pair tables into shared memory: the only allocation, offset 0 of global_smem (checked by the host)
    te_ = gl.arange(0, 128, layout=gl.SliceLayout(1, tb_l))[:, None]
    tl_ = gl.arange(0, 32, layout=gl.SliceLayout(0, tb_l))[None, :]
    tab = gl.allocate_shared_memory(gl.int32, [128, 32], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
                                    gl.load(TAB + te_ * 32 + tl_))
    if VRUN:  # then the value slots' tile (NaN: no slot; each block clears it after use)
        tile = gl.allocate_shared_memory(gl.int32, [_TILE_ROWS, 32], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
                                         gl.full([_TILE_ROWS, 32], -1, gl.int32, layout=tb_l))
    KT_OFF: gl.constexpr = _TILE_OFF + _TILE_BYTES * VRUN
    if KTILE:  # then the key slots' tile of one chunk (NaN: no slot; each chunk clears the cells the last one wrote)
        ktile = gl.allocate_shared_memory(gl.int32, [_KTILE_ROWS, 32], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
                                          gl.full([_KTILE_ROWS, 32], -1, gl.int32, layout=tb_l))
    gl.thread_barrier()
    # key side invariants
    t3 = gl.arange(0, BT, layout=P3_T)[:, None, None]
    q3 = gl.arange(0, 8, layout=P3_P)[None, None, :]
    h3 = gl.arange(0, 2, layout=P3_H)[None, :, None]
    if B4:  # natural channel order: pair p = p % 4 + 4 s is byte p % 4 of word 8 half + 2 j + s
        k_pair = (D // 2) * h3 + 8 * (q3 // 4)  # a key pair's first channel, less 16 j and the lane's 2 (p % 4)
        k_base = 4 * ((q3 % 4) + 4 * (t3 % 2))  # lane % 8
        k_rw = (8 * (q3 % 4) - 5) & 31  # the pair's byte -> bits 5-12
    else:
        k_pair = (D // 2) * h3 + 2 * (q3 // 4)  # a key pair's first channel, less 16 j and the lane's 4 (p % 4)
        k_base = 4 * ((q3 % 4) + 4 * (t3 % 8))
        k_rw = (2 * (4 * (q3 % 4) + 2 * (q3 // 4)) - 7) & 31  # first channel's low-plane bit -> bit 7
    k_rh = (4 * (q3 % 4) + 2 * (q3 // 4) - 11) & 31  # its high-plane bit -> bit 11 (half-word 0 of a word)
    k_rh16 = (k_rh + 16) & 31  # (half-word 1)
    # token t of a block on lane t: the next block's prefetch, and the value and key slot scatters
    lane_t = gl.arange(0, BT, layout=gl.BlockedLayout([1], [32], [1], [0]))
    if KTILE:  # the key slot tile's ldmatrix rows per lane
        kt_tok, kt_ch = _ktile_rows(t3, h3, q3, D, B4)
        kt_rows = _ktile_off(kt_tok, kt_ch, KT_OFF, D, B4)
    hs = gl.arange(0, 2, layout=gl.SliceLayout(1, KS_L))[:, None]
    qs = gl.arange(0, 8, layout=gl.SliceLayout(0, KS_L))[None, :]
    if B4:
        ks_off = (D // 4) * hs + qs  # channel pair (without the 8 j)
    else:
        ks_off = (D // 4) * hs + 2 * (qs % 4) + qs // 4
    if D >= 128:  # a row's low-plane words [token, 8], high-plane words [token, 4], 4-bit words [token, 16] (256: half)
        trow, wcol = _row_index(KROW, 8, BT)
        trow16, wcol16 = _row_index(KROW16, 16, BT)
        trow4, hcol = _row_index(KROW4, 4, BT)
    else:  # head_dim 64: half of each (the names keep head_dim 128's word counts)
        trow, wcol = _row_index(KROW4, 4, BT)
        trow16, wcol16 = _row_index(KROW, 8, BT)
        trow4, hcol = _row_index(KROW2, 2, BT)
    tcs = gl.arange(0, BT, layout=gl.SliceLayout(1, KC_L))[:, None]
    qcs = gl.arange(0, 8, layout=gl.SliceLayout(0, KC_L))[None, :]
    # fragment order: register s + 2 (tau // 8 % 2) + 4 (tau // 16) of lane p % 4 + 4 (tau % 8), s = p // 4
    cs_off = 32 * ((qcs // 4) + 2 * ((tcs // 8) % 2) + 4 * (tcs // 16)) + (qcs % 4) + 4 * (tcs % 8)
    if B4:  # the channel (below 16, even) of a key pair, less 16 j (exact path)
        cs_ch = 2 * (qcs % 4) + 8 * (qcs // 4)
    else:
        cs_ch = 4 * (qcs % 4) + 2 * (qcs // 4)
    # value side invariants
    mh5 = gl.arange(0, 2, layout=V5_MH)[None, :, None, None, None]
    ml5 = gl.arange(0, 8, layout=V5_ML)[None, None, :, None, None]
    pl5 = gl.arange(0, 4, layout=V5_PL)[None, None, None, None, :]
    ph5 = gl.arange(0, 4, layout=V5_PH)[None, None, None, :, None]
    if B4:  # byte pl of word 4 i + 2 sw + mh -> bits 5-12; lane % 8
        v_base = 4 * (pl5 + 4 * (ml5 % 2)) + 0 * mh5
        v_rw = ((8 * pl5 - 5) & 31) + 0 * mh5
        v_tok4 = 8 * gl.arange(0, 4, layout=VW4_PH)[None, None, None, :] + \
            gl.arange(0, 8, layout=VW4_ML)[None, None, :, None]
        vw4 = 2 * gl.arange(0, 2, layout=VW4_SW)[:, None, None, None] + \
            gl.arange(0, 2, layout=VW4_MH)[None, :, None, None]
    else:
        v_base = 4 * (pl5 + 4 * ml5) + 0 * mh5
        v_rw = (2 * (8 * mh5 + 2 * pl5) - 7) & 31
        v_tok4 = None
        vw4 = None
    sw5 = gl.arange(0, 2, layout=V5_SW)[:, None, None, None, None]
    v_rh = (8 * mh5 + 2 * pl5 - 11 + 16 * sw5) & 31  # high-plane word i holds half-words 2 i + sw
    sww = gl.arange(0, 2, layout=VW_SW)[:, None, None]
    mlw = gl.arange(0, 8, layout=VW_ML)[None, :, None]
    phw = gl.arange(0, 4, layout=VW_PH)[None, None, :]
    v_tok = 8 * phw + mlw  # the token of a value pair before the transpose
    v_tok5 = 8 * ph5 + ml5  # (the same in the pairs' layout)
    v_pair = 16 * sw5 + 8 * mh5 + DV * vh  # a value pair's first channel, less 32 i and the lane's 2 pl
    if VRUN:  # the slot tile's addressing: its ldmatrix rows per lane
        lt_tok, lt_ch = _ldsm_rows(ml5, ph5, pl5)
        lt_ch += 0 * (sw5 + mh5)
    bk = gl.arange(0, 32, layout=gl.SliceLayout(1, b_l))
    bn = gl.arange(0, N, layout=gl.SliceLayout(0, b_l))
    # the query chunks rotated back by the split's first position p_split (RoPE(p + tau) = RoPE(tau) RoPE(p)); each
    # block then rotates them by its start's offset from p_split: from the table BROT where the block starts where
    # contiguous positions would put it, else from its own angles
    p_split = gl.load(QP + gl.minimum(lo_t, gl.maximum(n_q - 1, 0)))
    pf32 = p_split.to(gl.float32)
    q0 = _rot_q(_q_chunk(Qb, sqh, bn, bk, 0, qk_scale, GROUP, B4, D), (pf32, INVF), 0, N, False, B4)
    q1 = _rot_q(_q_chunk(Qb, sqh, bn, bk, 1, qk_scale, GROUP, B4, D), (pf32, INVF), 1, N, False, B4)
    if D >= 128:
        q2 = _rot_q(_q_chunk(Qb, sqh, bn, bk, 2, qk_scale, GROUP, B4, D), (pf32, INVF), 2, N, False, B4)
        q3q = _rot_q(_q_chunk(Qb, sqh, bn, bk, 3, qk_scale, GROUP, B4, D), (pf32, INVF), 3, N, False, B4)
    else:  # head_dim 64: two chunks (q2 and q3q are never read)
        q2 = q0
        q3q = q1
    if D == 256:  # eight chunks
        q4 = _rot_q(_q_chunk(Qb, sqh, bn, bk, 4, qk_scale, GROUP, B4, D), (pf32, INVF), 4, N, False, B4)
        q5 = _rot_q(_q_chunk(Qb, sqh, bn, bk, 5, qk_scale, GROUP, B4, D), (pf32, INVF), 5, N, False, B4)
        q6 = _rot_q(_q_chunk(Qb, sqh, bn, bk, 6, qk_scale, GROUP, B4, D), (pf32, INVF), 6, N, False, B4)
        q7 = _rot_q(_q_chunk(Qb, sqh, bn, bk, 7, qk_scale, GROUP, B4, D), (pf32, INVF), 7, N, False, B4)
    else:  # (never read)
        q4 = q0
        q5 = q0
        q6 = q0
        q7 = q0
    c_l: gl.constexpr = gl.SliceLayout(1, mma)
    h_l: gl.constexpr = gl.SliceLayout(0, mma)
    hn = gl.arange(0, N, layout=h_l)
    tc_ = gl.arange(0, BT, layout=c_l)
    m_i = gl.full([N], -1.0e30, gl.float32, layout=h_l)
    l_i = gl.zeros([N], gl.float32, layout=h_l)
    z_i = gl.zeros([N], gl.float32, layout=h_l)
    acc0 = gl.zeros([32, N], gl.float32, layout=mma)
    acc1 = gl.zeros([32, N], gl.float32, layout=mma)
    acc2 = gl.zeros([32, N], gl.float32, layout=mma)
    acc3 = gl.zeros([32, N], gl.float32, layout=mma)
    KC32 = KC.to(gl.pointer_type(gl.int32))
    VC32 = VC.to(gl.pointer_type(gl.int32))
    for t0 in range(lo_t, hi_t, BT):
        if PF > 0:  # the next block's rows (a row start per lane touches every line: rows are < 128 bytes)
            nxt = t0 + BT + lane_t
            pmask = nxt < hi_t
            if KEYS:
                _prefetch(KC + nxt * skc_t, pmask, PF)
            _prefetch(VC + nxt * svc_t, pmask, PF)
            _prefetch(VS + nxt * svs_t, pmask, PF)
            _prefetch(VZ + nxt * svs_t, pmask, PF)
            if KEYS:
                _prefetch(QP + nxt, pmask, PF)
            if CK:
                _prefetch(KOI + nxt * sko_t, pmask, PF)
                _prefetch(KOV + nxt * sko_t, pmask, PF)
            if VRUN:  # into L1: the slot scatter's chain of dependent loads (run ends, slots) hits there; the code
                # rows (read by the scatter until a77a63b, now by the value lookups only) as runs 61-74 measured
                _prefetch(VOI + nxt * svo_t, pmask, 1)
                _prefetch(VOV + nxt * svo_t, pmask, 1)
                _prefetch(VC + nxt * svc_t, pmask, 1)
                if VENDS:
                    _prefetch(VOE + nxt * soe_t, pmask, 1)
            elif CV:
                _prefetch(VOI + nxt * svo_t, pmask, PF)
                _prefetch(VOV + nxt * svo_t, pmask, PF)
            if HAS_MASK:
                _prefetch(MROW + nxt, pmask, PF)
        tmask = (t0 + tc_) < hi_t
        if KEYS:
            vsc = gl.load(VS + (t0 + tc_) * svs_t, mask=tmask, other=0.0).to(gl.float32)
            vzr = gl.load(VZ + (t0 + tc_) * svs_t, mask=tmask, other=0.0).to(gl.float32)
        if VRUN:  # head h's value slots, one token per lane, in level units ((exact - zero) / scale) into the block's
            # tile; the value chunks put them in place of their looked-up levels
            st_ = t0 + lane_t
            sm_ = st_ < hi_t
            if VENDS:  # head h's run [ends[h - 1], ends[h]) of the sorted slots
                s_lo = gl.load(VOE + st_ * soe_t + gl.maximum(hd - 1, 0), mask=sm_ & (hd > 0), other=0).to(gl.int32)
                s_hi = gl.load(VOE + st_ * soe_t + hd, mask=sm_, other=0).to(gl.int32)
                npass = gl.max(s_hi - s_lo, 0)
            else:  # every slot of the row, kept where it lies in head h
                s_lo = 0 * st_
                s_hi = gl.where(sm_, CV, 0)
                npass = CV
            s_z = gl.load(VZ + st_ * svs_t, mask=sm_, other=0.0).to(gl.float32)
            s_inv = 1.0 / gl.load(VS + st_ * svs_t, mask=sm_, other=1.0).to(gl.float32)
            col = s_lo  # each rank loads the next one's slot first
            vi_n = gl.load(VOI + st_ * svo_t + col, mask=col < s_hi, other=0)
            xv_n = gl.load(VOV + st_ * svo_t + col, mask=col < s_hi, other=0.0)
            for _r in range(npass):
                vi = vi_n.to(gl.int32) - hd * V_OFF - DV * vh  # (head_dim 256: the program's value half)
                xv = xv_n.to(gl.float32)
                ok = ((col < s_hi) & (vi >= 0)) & (vi < DV)
                col = col + 1
                vi_n = gl.load(VOI + st_ * svo_t + col, mask=col < s_hi, other=0)
                xv_n = gl.load(VOV + st_ * svo_t + col, mask=col < s_hi, other=0.0)
                res = gl.minimum(gl.maximum((xv - s_z) * s_inv, -65000.0), 65000.0)
                _sts16(_tile_off(lane_t, vi, DV), res.to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32), ok)
            _warp_sync(lane_t)
        if KEYS:  # the scores (every program but the value pass)
            # the block's positions: contiguous from its first token (the table path), and where that start lies
            bidx = (t0 - lo_t) // BT
            p_b = gl.load(QP + t0)
            pos = gl.load(QP + t0 + tc_, mask=tmask, other=0)
            contig = gl.max(gl.where(tmask & (pos != p_b + tc_), 1, 0), 0) == 0
            q_tab = (p_b - p_split == t0 - lo_t) & (bidx < n_brot)
            # the RoPE tables this block reads: the static ones, or (positions not contiguous, or the block start not
            # where contiguous positions put it) the program's scratch copy, filled here with computed angles in the
            # same order and layout as it is read (each thread reads what it wrote: no barrier); the chunk loop below
            # then has no branch, so the scheduler can hoist its loads
            csb = CSP
            qtb = BROT + bidx * D  # (D // 32 chunks of 32 fp32)
            if not contig:
                for jj in gl.static_range(D // 32):
                    dpos = (gl.load(QP + t0 + tcs, mask=(t0 + tcs) < hi_t, other=0) - p_b).to(gl.float32)
                    th = INVF + 16 * jj + cs_ch
                    c0, s0 = _cos_sin(dpos * gl.load(th))
                    c1, s1 = _cos_sin(dpos * gl.load(th + 1))
                    gl.store(SCR + cs_off + 512 * jj, _pack2(c0, c1))
                    gl.store(SCR + cs_off + 512 * jj + 256, _pack2(s0, s1))
                csb = SCR
            if not q_tab:
                for jj in gl.static_range(D // 32):
                    _q_table_store(_pick8(jj, q0, q1, q2, q3q, q4, q5, q6, q7), SCRQ + jj * 32,
                                   (p_b - p_split).to(gl.float32), INVF, jj, N, B4)
                qtb = SCRQ
            s = gl.zeros([BT, N], gl.float32, layout=mma)
            # the block's key rows, 16 bytes per load (head_dim 256: the words of chunks 0-3 here, of 4-7 at chunk 4)
            w_l0, w_l1, w_m0, w_m1, h_w0, h_w1 = _key_rows(KC32, t0, skc_t, hi_t, trow, wcol, trow16, wcol16, trow4,
                                                           hcol, 0, HI, B4, D)
            if KTILE:  # one lane per token: the cells, levels and chunks of its key slots in the key slot tile
                ksm = (t0 + lane_t) < hi_t
                ko0, kv0, kc0 = _key_slot_cell(KOI, KOV, KZI, t0 + lane_t, ksm, sko_t, 0, lane_t, KT_OFF, D, B4)
                if CK > 1:
                    ko1, kv1, kc1 = _key_slot_cell(KOI, KOV, KZI, t0 + lane_t, ksm, sko_t, 1, lane_t, KT_OFF, D, B4)
                if CK > 2:
                    ko2, kv2, kc2 = _key_slot_cell(KOI, KOV, KZI, t0 + lane_t, ksm, sko_t, 2, lane_t, KT_OFF, D, B4)
            elif CK:  # the block's key slots in code-level units, (exact - zero) / scale, to replace their levels
                kt = t0 + t3
                km = kt < hi_t
                k_val, k_keep, k_rel = _key_slot(KOI, KOV, KZI, kt, km, sko_t, 0, q3, B4, D)
                if CK > 1:
                    k_val1, k_keep1, k_rel1 = _key_slot(KOI, KOV, KZI, kt, km, sko_t, 1, q3, B4, D)
                if CK > 2:
                    k_val2, k_keep2, k_rel2 = _key_slot(KOI, KOV, KZI, kt, km, sko_t, 2, q3, B4, D)
            for j in gl.static_range(D // 32):
                # the words of chunk j (channels D / 2 half + 16 j ..): low-plane word (D / 32) half + j, high-plane
                # half-word j % 2 of word (D / 64) half + j // 2 (head_dim 256: of the words loaded for chunks 4-7 from
                # chunk 4 on, as j % 4)
                if D == 256 and j == 4:
                    w_l0, w_l1, w_m0, w_m1, h_w0, h_w1 = _key_rows(KC32, t0, skc_t, hi_t, trow, wcol, trow16, wcol16,
                                                                   trow4, hcol, 1, HI, B4, D)
                if D >= 128:
                    w = _pick4(j % 4, gl.split(w_l0)[0], gl.split(w_l1)[0], gl.split(w_l0)[1], gl.split(w_l1)[1])
                else:
                    w = _pick4(j, w_l0, w_l1, w_l0, w_l1)
                w = gl.convert_layout(w, KW_L, assert_trivial=True)
                if B4:  # the word of the register's s = p // 4 (a constant per register)
                    if D >= 128:
                        w1 = _pick4(j % 4, gl.split(w_m0)[0], gl.split(w_m1)[0], gl.split(w_m0)[1], gl.split(w_m1)[1])
                    else:
                        w1 = _pick4(j, w_m0, w_m1, w_m0, w_m1)
                    w1 = gl.convert_layout(w1, KW_L, assert_trivial=True)
                    ws = gl.where(q3 < 4, w[:, :, None], w1[:, :, None])
                    lev = _lookup(ws, ws, k_rw, k_rw, k_base, 0, False, True)
                else:
                    if HI:
                        h = gl.convert_layout(h_w0 if j % 4 < 2 else h_w1, KW_L, assert_trivial=True)
                    else:
                        h = w
                    rh = k_rh if j % 2 == 0 else k_rh16
                    lev = _lookup(w[:, :, None], h[:, :, None], k_rw, rh, k_base, 0, HI)
                if KTILE:  # the chunk's key scale / zero and RoPE table loads first (the compiler does not move loads
                    # across the tile's stores and syncs: issued after them, their waits cost run 120 the tile's gain),
                    # then the slots through the tile: each lane clears the cells it wrote for the last chunk, writes
                    # those of this one, and every key register takes the tile's numbers in place of its levels
                    ksz = ks_off + 8 * j
                    k_sc = gl.load(KSZ + ksz)[None, :, :]
                    k_zr = gl.load(KSZ + D // 2 + ksz)[None, :, :]
                    cw = gl.load(csb + cs_off + 512 * j)
                    sw = gl.load(csb + cs_off + 512 * j + 256)
                    if j > 0:
                        _sts16(ko0, kv0 * 0 - 1, ksm)
                        if CK > 1:
                            _sts16(ko1, kv1 * 0 - 1, ksm)
                        if CK > 2:
                            _sts16(ko2, kv2 * 0 - 1, ksm)
                    _sts16(ko0, kv0, kc0 == j)
                    if CK > 1:
                        _sts16(ko1, kv1, kc1 == j)
                    if CK > 2:
                        _sts16(ko2, kv2, kc2 == j)
                    _warp_sync(lane_t)
                    lev = _tile_merge(lev, _ldsm4(kt_rows))
                    _warp_sync(lane_t)  # (every lane's ldmatrix before the next chunk's clears)
                    k = _hfma2(lev, k_sc, k_zr)
                else:
                    if CK:  # the slot's exact level in place of the looked-up one, before the affine map and RoPE
                        lev = gl.where(k_rel == k_pair + 16 * j, (lev & k_keep) | k_val, lev)
                    if CK > 1:  # (head_dim 256 without the tile: up to 3 slots, one after the other)
                        lev = gl.where(k_rel1 == k_pair + 16 * j, (lev & k_keep1) | k_val1, lev)
                    if CK > 2:
                        lev = gl.where(k_rel2 == k_pair + 16 * j, (lev & k_keep2) | k_val2, lev)
                    ksz = ks_off + 8 * j
                    k = _hfma2(lev, gl.load(KSZ + ksz)[None, :, :], gl.load(KSZ + D // 2 + ksz)[None, :, :])
                    # RoPE by each token's offset from the block start (fragment order: one line per warp-wide load)
                    cw = gl.load(csb + cs_off + 512 * j)
                    sw = gl.load(csb + cs_off + 512 * j + 256)
                k1, k2 = gl.split(gl.permute(k, [0, 2, 1]))
                r1, r2 = _rope2(k1, k2, gl.convert_layout(cw, k1.type.layout, assert_trivial=True),
                                gl.convert_layout(sw, k1.type.layout, assert_trivial=True))
                kr = _to_operand(gl.reshape(gl.permute(gl.join(r1, r2), [0, 2, 1]), [BT, 16]), a_l, BT)
                # the query chunk rotated on from p_split to the block start p_b
                qr = _rot_q(_pick8(j, q0, q1, q2, q3q, q4, q5, q6, q7), qtb + j * 32, j, N, True, B4)
                s = mma_v2(kr, gl.convert_layout(qr, b_l), s)
            if KTILE:  # the last chunk's cells, cleared for the next block (its lanes' ldmatrix are behind the sync
                # above)
                _sts16(ko0, kv0 * 0 - 1, ksm)
                if CK > 1:
                    _sts16(ko1, kv1 * 0 - 1, ksm)
                if CK > 2:
                    _sts16(ko2, kv2 * 0 - 1, ksm)
            if HAS_MASK:  # the additive mask, natural-log units
                s += gl.load(MROW + t0 + tc_, mask=tmask, other=0.0)[:, None] * 1.4426950408889634
            # online softmax over the block's tokens (axis 0), base 2 (qk_scale holds log2 e / sqrt(D))
            s = gl.where(tmask[:, None], s, -1.0e30)
            m_new = gl.maximum(m_i, gl.max(s, 0))
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - m_new[None, :])
            l_i = l_i * alpha + gl.sum(p, 0)
            z_i = z_i * alpha + gl.sum(p * vzr[:, None], 0)
            m_i = m_new
            pv = gl.convert_layout((p * vsc[:, None]).to(gl.float16), b_l)
            if PASS == 1:  # the block's P and alpha for the value pass (the group's heads)
                pb = PS + GROUP + ((t0 - lo_t) // BT) * PW
                gl.store(pb.to(gl.pointer_type(gl.float16)) + bn[None, :] * BT + bk[:, None], pv,
                         mask=(bn[None, :] < GROUP) & (bk[:, None] >= 0))
                gl.store(pb + BT * GROUP // 2 + hn, alpha, mask=hn < GROUP)
        else:  # the value pass: the scores pass's P and alpha of this block
            pb = PS + GROUP + ((t0 - lo_t) // BT) * PW
            pv = gl.load(pb.to(gl.pointer_type(gl.float16)) + bn[None, :] * BT + bk[:, None],
                         mask=(bn[None, :] < GROUP) & (bk[:, None] >= 0), other=0.0)
            alpha = gl.load(pb + BT * GROUP // 2 + hn, mask=hn < GROUP, other=1.0)
        vmask = (t0 + v_tok) < hi_t
        if B4:
            vmask4 = (t0 + v_tok4) < hi_t
        else:
            vmask4 = vmask
        if CV and not VRUN:  # the block's value slots, as for keys: (exact - zero) / scale
            vt5 = t0 + v_tok5
            vm = vt5 < hi_t
            vi = gl.load(VOI + vt5 * svo_t, mask=vm, other=255).to(gl.int32)  # [1, 1, 8, 4, 1]
            xv = gl.load(VOV + vt5 * svo_t, mask=vm, other=0.0).to(gl.float32)
            vs5 = gl.load(VS + vt5 * svs_t, mask=vm, other=1.0).to(gl.float32)
            vz5 = gl.load(VZ + vt5 * svs_t, mask=vm, other=0.0).to(gl.float32)
            v_val, v_keep, v_sp = _slot_word((xv - vz5) / vs5, vi)
            v_rel = v_sp - 2 * pl5  # [1, 1, 8, 4, 4]
        for i in gl.static_range(DV // 32):  # channels 32 i .. 32 i + 31 (of the program's value half DV vh ..):
            # low-plane words 2 i + sw, high half-words too (4-bit: words 4 i + 2 sw + mh)
            lev = _vlookup(VC32, t0, v_tok, svc_t, sww, vmask, v_rw, v_rh, v_base, i, D, HI, B4, v_tok4, vw4,
                           vmask4, (DV // 32) * vh)
            if VRUN:  # the slots' exact levels from the tile, in the same pair layout, in place of the looked-up ones
                lev = _tile_merge(lev, _ldsm4(_tile_off(lt_tok, 32 * i + lt_ch, DV)))
            elif CV:
                lev = gl.where(v_rel == v_pair + 32 * i, (lev & v_keep) | v_val, lev)
            lev = gl.inline_asm_elementwise("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", "=r,r", [lev],
                                            dtype=gl.int32, is_pure=True, pack=1)
            vt = _to_operand(gl.reshape(lev, [32, BT // 2]), a_l, 32)
            if i == 0:
                acc0 = mma_v2(vt, pv, acc0 * alpha[None, :])
            elif i == 1:
                acc1 = mma_v2(vt, pv, acc1 * alpha[None, :])
            elif i == 2:
                acc2 = mma_v2(vt, pv, acc2 * alpha[None, :])
            else:
                acc3 = mma_v2(vt, pv, acc3 * alpha[None, :])
        if VRUN:  # refill the tile with NaN (no slot) for the next block (after every lane's ldmatrix)
            _warp_sync(lane_t)
            for cc in gl.static_range(_TILE_ROWS * DV // 512):  # (the tile's BT 2 DV bytes)
                _clear16(_TILE_OFF + cc * 512 + 16 * lane_t)
            _warp_sync(lane_t)  # (before the next block's scatter)
    if PASS == 1:  # the z term for the value pass
        gl.store(PS + hn, z_i, mask=hn < GROUP)
    elif PASS == 2:
        z_i = gl.load(PS + hn, mask=hn < GROUP, other=0.0)
    # partials: O^T chunks [32 channels, N] (natural channel order) + the zero term, for the group's heads only
    oc = gl.arange(0, 32, layout=c_l)[:, None]
    oh = gl.arange(0, N, layout=h_l)[None, :]
    om = (oh < GROUP) & (oc >= 0)
    base = PACC + (row0 + oh.to(gl.int64) * (NSPLIT_Q + 1)) * D + DV * vh
    gl.store(base + oc, acc0 + z_i[None, :], mask=om)
    gl.store(base + 32 + oc, acc1 + z_i[None, :], mask=om)
    if DV == 128:
        gl.store(base + 64 + oc, acc2 + z_i[None, :], mask=om)
        gl.store(base + 96 + oc, acc3 + z_i[None, :], mask=om)
    # one read of the tables after the loop keeps their allocation alive (inline PTX reads it: Triton cannot see
    # that), so no scratch buffer can alias it; the term is 0 unless n_q < 0
    keep = gl.sum(gl.sum(tab.slice(0, 1, dim=0).load(tb_l), 1), 0)
    if VRUN:
        keep += gl.sum(gl.sum(tile.slice(0, 1, dim=0).load(tb_l), 1), 0)
    if KTILE:
        keep += gl.sum(gl.sum(ktile.slice(0, 1, dim=0).load(tb_l), 1), 0)
    m_i += gl.where(n_q < 0, keep.to(gl.float32), 0.0)
    if PASS == 2:  # (the value pass writes no m and l: its hand-over words take the term instead)
        gl.store(PS + hn, z_i + gl.where(n_q < 0, keep.to(gl.float32), 0.0), mask=hn < GROUP)
    else:
        prow = row0 + hn.to(gl.int64) * (NSPLIT_Q + 1)
        pmask = hn < GROUP
        if PASS == 0 and NV == 2:  # (both value halves hold the same m and l)
            pmask = pmask & (vh == 0)
        gl.store(PM + prow, m_i, mask=pmask)
        gl.store(PL + prow, l_i, mask=pmask)


# ---------------------------------------------------------------------------------------------------- host side
SUPPORTED_TRITON = ((3, 6),)  # Gluon is experimental: the (major, minor) versions this kernel was built and run on
MEASURED_GPUS = ((9, 0),)  # capabilities it was tested and timed on (H200): the default only there


def default_here(device_index: int) -> bool:
    """Whether decode_attention picks the pairs kernel by default on this GPU (tested there; elsewhere on sm_80+ it
    runs when asked for with kernel="pairs")."""
    return available(device_index) and torch.cuda.get_device_capability(device_index) in MEASURED_GPUS


@functools.lru_cache(maxsize=None)
def available(device_index: int = 0) -> bool:
    """Whether the pairs kernel can run here: a tested Triton version and an NVIDIA GPU of sm_80 or newer (mma.sync
    m16n8k16, movmatrix)."""
    try:
        ver = tuple(int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    if ver not in SUPPORTED_TRITON or not torch.cuda.is_available() or torch.version.hip:
        return False
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def pair_table(levels: torch.Tensor) -> torch.Tensor:
    """[64, 32] int32: entry idx = lo_a | lo_b << 2 | hi_a << 4 | hi_b << 5 holds the fp16 pair (levels[a],
    levels[b]) with a = lo_a | hi_a << 2, b likewise (core/packing.py's 3-bit planes: 2 low bits, 1 high bit),
    replicated over the 32 lanes. Four levels (2-bit codes: the low plane alone) fill the entries idx < 16; the
    others repeat level 0 and are never read. Sixteen levels (4-bit codes): the 256 entries idx = a | b << 4 (a
    packed byte), replicated over 8 lane groups (word 8 idx + lane % 8; lanes of a group that read different
    entries of one bank wait on each other)."""
    if levels.numel() == 16:
        idx = torch.arange(256)
        lev = levels.detach().reshape(-1).half().cpu()
        bits = torch.stack([lev[idx & 15], lev[idx >> 4]], 1).contiguous().view(torch.int32)[:, 0]
        return bits[:, None].expand(256, 8).reshape(64, 32).contiguous().to(levels.device)
    if levels.numel() not in (4, 8):
        raise ValueError(f"the pairs kernel's tables take 4, 8 or 16 levels (2-, 3- or 4-bit codes), got "
                         f"{levels.numel()}.")
    idx = torch.arange(64)
    a = (idx & 3) | (((idx >> 4) & 1) << 2)
    b = ((idx >> 2) & 3) | (((idx >> 5) & 1) << 2)
    lev = levels.detach().reshape(-1).half().cpu()
    lev = torch.cat([lev, lev[:1].expand(8 - lev.numel())])
    bits = torch.stack([lev[a], lev[b]], 1).contiguous().view(torch.int32)[:, 0]
    return bits[:, None].expand(64, 32).contiguous().to(levels.device)


def half_pairs(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 n] -> [..., n] int32 holding (x[2 i], x[2 i + 1]) as fp16 pairs."""
    return x.half().contiguous().view(torch.int32)


def fragment_rope_table(inv_freq: torch.Tensor, bits: int = 3) -> torch.Tensor:
    """[D/32, 2, 8, 32] int32: for chunk j, cos / sin, register r and lane l, the fp16 pair of channel pair
    8 j + 2 (l % 4) + (r % 2) (4-bit codes: 8 j + l % 4 + 4 (r % 2), _kchan's order) at block offset
    l // 4 + 8 (r // 2 % 2) + 16 (r // 4): the values a thread of the key layout holds, so a warp's load reads one
    contiguous line."""
    tau = torch.arange(BT, dtype=torch.float64, device=inv_freq.device)[:, None] * inv_freq.double()[None, :]
    cs = torch.stack([half_pairs(tau.cos()), half_pairs(tau.sin())])  # [2, BT, D/4]
    chunks = inv_freq.numel() // 16  # D / 32
    j, r, lane = torch.arange(chunks)[:, None, None], torch.arange(8)[None, :, None], torch.arange(32)[None, None, :]
    tok = lane // 4 + 8 * (r // 2 % 2) + 16 * (r // 4)
    cp = 8 * j + (lane % 4) + 4 * (r % 2) if bits == 4 else 8 * j + 2 * (lane % 4) + r % 2
    return cs[:, tok.to(cs.device), cp.to(cs.device)].permute(1, 0, 2, 3).contiguous()


def block_rope_table(inv_freq: torch.Tensor, n_blocks: int, bits: int = 3) -> torch.Tensor:
    """[n_blocks, D/32, 2, 16] fp32: for the block offset b BT in a split, chunk j, cos / sin of b BT theta for the
    query K index m (< 16) of chunk j, i.e. channel _kchan(m, j) (computed in float64)."""
    m = torch.arange(16)
    order = m if bits == 4 else 4 * ((m // 2) % 4) + 2 * (m // 8) + m % 2
    ch = (16 * torch.arange(inv_freq.numel() // 16)[:, None] + order).to(inv_freq.device)  # [D/32, 16]
    ang = (torch.arange(n_blocks, device=inv_freq.device).double() * BT)[:, None, None] * inv_freq.double()[ch]
    return torch.stack([ang.cos(), ang.sin()], 2).float().contiguous()


BROT_BLOCKS = 512  # blocks per split served by the query-rotation table (16K tokens); further blocks compute angles


def tables(key_levels, key_scale, key_zero, value_levels, inv_freq) -> dict:
    """The kernel's derived inputs, from the storage's affine key table (levels [4], [8] or [16], scale / zero [H, D]),
    value levels (as many) and RoPE frequencies [D/2]."""
    bits = {4: 2, 8: 3, 16: 4}.get(key_levels.numel(), 3)
    return dict(
        TAB=torch.cat([pair_table(key_levels), pair_table(value_levels)]).contiguous(),
        KSZ=torch.stack([half_pairs(key_scale), half_pairs(key_zero)], 1).contiguous(),  # [H, 2, D/2]
        KZI=torch.stack([key_zero.float(), 1.0 / key_scale.float()], 1).contiguous(),  # [H, 2, D]
        CSP=fragment_rope_table(inv_freq, bits), BROT=block_rope_table(inv_freq, BROT_BLOCKS, bits),
        INVF=inv_freq.float().contiguous())


def key_tile_off(vrun: bool) -> int:
    """Where the key slots' tile (KTILE) starts: after the tables and, with slot runs, the value slots' tile."""
    return TILE_OFF + (TILE_BYTES if vrun else 0)


def _check_shared(compiled, vrun: bool, ktile: bool = False) -> None:
    """The inline PTX reads the tables (and with slot runs the value tile after them, then with KTILE the key tile)
    at offset 0 of Triton's shared memory: the allocation must be all there is, each tile at its offset."""
    got = compiled.metadata.shared
    want = TABLE_SHARED_BYTES + (TILE_BYTES if vrun else 0) + (KTILE_BYTES if ktile else 0)
    llir = compiled.asm.get("llir")
    at = [off for off, on in ((TILE_OFF, vrun), (key_tile_off(vrun), ktile)) if on]  # the tiles' keep-alive reads
    if got != want or (llir is not None and any(
            f"getelementptr (i8, ptr addrspace(3) @global_smem, i32 {off})" not in llir for off in at)):
        what = " and the value slot tile" * bool(vrun) + " and the key slot tile" * bool(ktile)
        raise RuntimeError(f"the pairs kernel was compiled with {got} B of shared memory; its inline PTX expects "
                           f"exactly {want} B (the tables{what}). This Triton version lays it out differently: use "
                           "kernel='natural'.")


_CHECKED: set = set()


#: head_dim 256: key slots go through a per-chunk shared-memory tile (KTILE) instead of being merged into every key
#: register (3 slots x 3 instructions x 16 registers per chunk, 1150 of the 4261 instructions per block, and 72 live
#: registers: ptxas spilled). Run 121 (benchmarks/gpu_runs/run121/probe.txt, Gemma-3-4B heads, 128K): 1.03-1.28x the
#: merge (nuq3-1% head-group batch 1 310.6 against 385.2 us). False: the merge (an experiment knob)
KEY_SLOT_TILE = True


def key_slot_tile(head_dim: int, ck: int) -> bool:
    """The kernel's key-slot variant (constexpr KTILE): the tile at head_dim 256 with slots, else the merge."""
    return bool(KEY_SLOT_TILE and head_dim == 256 and ck > 0)


def value_slots(v_token: bool, cv: int, has_ends: bool, head_dim: int = D) -> dict:
    """The kernel's value-slot variant (constexprs VRUN, VENDS, V_OFF): slot runs through the tile for token-group
    rows with slots (their elements span all KV heads: head h's are h D ..) and for head-group rows with several
    slots; token-group rows without slots take the plain path; VENDS where the storage keeps the runs' ends."""
    vrun = (v_token and cv > 0) or cv > 1
    return dict(VRUN=vrun, VENDS=vrun and has_ends, V_OFF=head_dim if v_token else 0)


def launch(q, pacc, pm, pl, quant, tb, bias, lengths, scaling_log2, n_s, n_q, chunk, nsq, group, ck, cv, voe=None,
           bits=3):
    """Launch the kernel over ``nsq`` splits (grid nsq x KV heads x batch; head_dim 256: the scores pass, then the
    value pass, each over that grid; without SCORES_ONCE one launch of two programs per split, 2 nsq x KV heads x
    batch); see _pairs_kernel for the arguments. ``bits``: the codes' width (3; 2: rows of the low plane
    alone; 4: a byte per channel pair); head_dim 64, 128 or 256, read from the rows' width; ``ck`` key slots per
    vector, at most MAX_KEY_SLOTS[head_dim].
    ``quant``: the storage's (k_codes, k_out_idx, k_out_val, v_codes, v_zero, v_scale, v_out_idx, v_out_val, q_pos);
    token-group values (v_zero [B, 1, ..]) with slots and head-group values with more than one slot run the slot
    passes into the tile, with ``voe`` (v_out_ends) where the storage has it."""
    kc, koi, kov, vc, vz, vs, voi, vov, qpos = quant
    B, H = int(kc.shape[0]), int(kc.shape[1])
    d = int(kc.shape[-1]) * 8 // max(bits, 1)
    if (bits not in (2, 3, 4) or d not in HEAD_DIMS or kc.shape[-1] != d * bits // 8 or vc.shape[-1] != kc.shape[-1]
            or q is not None and q.shape[-1] != d):
        raise ValueError(f"the pairs kernel reads 2-, 3- or 4-bit code rows of {' or '.join(map(str, HEAD_DIMS))} "
                         f"channels; got bits={bits} with key / value rows of {kc.shape[-1]} / {vc.shape[-1]} bytes"
                         f"{'' if q is None else f' and head_dim {q.shape[-1]}'}.")
    if ck > MAX_KEY_SLOTS[d]:
        raise ValueError(f"the pairs kernel merges at most {MAX_KEY_SLOTS[d]} key slot(s) per vector at head_dim {d}, "
                         f"got {ck}.")
    v_token = int(vz.shape[1]) == 1 and H > 1
    slots = value_slots(v_token, cv, voe is not None, d)
    vrun = slots["VRUN"]
    ktile = key_slot_tile(d, ck)
    mask = bias if bias is not None else pm
    # (the split rule's token count: the capacity in CUDA-graph steps, else the quantized length)
    token_heads = B * H * (int(kc.shape[2]) if lengths is not None else int(n_q))
    two = scores_once(d, token_heads)
    nv = programs_per_split(d, token_heads)
    halves = 1 + d // 256  # value halves
    # each program's scratch for the RoPE of odd blocks: SCRATCH_WORDS per 128 key channels (head_dim 256: twice)
    scratch = torch.empty(B * H * nsq * halves * (SCRATCH_WORDS * halves), device=q.device, dtype=torch.int32)
    passes = (1, 2) if two else (0,)
    if PASSES is not None and two:  # (timing one pass alone)
        passes = PASSES
    p_blocks = 0
    hand = scratch
    if two:  # the scores pass's hand-over to the value pass: per program group + p_blocks p_words(group)
        # words, for its longest split (with device lengths, of the storage's capacity)
        p_blocks = max(chunk // BT, math.ceil(math.ceil(int(kc.shape[2]) / nsq) / BT))
        hand = torch.empty(B * H * nsq * (group + p_blocks * p_words(group)), device=q.device, dtype=torch.float32)
    ends = voe if voe is not None else qpos
    svh = 0 if v_token else 1  # token-group rows: one zero / scale / slot row for every KV head
    k = None
    for pss in passes:
        keys = pss != 2  # (the value pass reads no key slot, key tile or mask)
        kp = _pairs_kernel[(nsq * nv, H, B)](
            q, pacc, pm, pl, kc, koi, kov, vc, vz, vs, voi, vov, ends, qpos, mask,
            lengths if lengths is not None else qpos,
            tb["TAB"], tb["KSZ"], tb["KZI"], tb["CSP"], tb["BROT"], tb["INVF"], scratch,
            scaling_log2, q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
            koi.stride(0), koi.stride(1), koi.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
            vs.stride(0), svh * vs.stride(1), vs.stride(2), voi.stride(0), svh * voi.stride(1), voi.stride(2),
            ends.stride(0), ends.stride(-2) if voe is not None else 0, qpos.stride(0),
            bias.stride(0) if bias is not None else 0, n_s, n_q, chunk, nsq, BROT_BLOCKS, hand, p_blocks,
            H_KV=H, GROUP=group, CK=ck if keys else 0, CV=cv, **slots, KTILE=ktile and keys,
            HAS_MASK=bias is not None and keys, DEVLEN=lengths is not None, PF=2, HI=bits == 3, B4=bits == 4, BT=BT,
            D=d, N=N, PASS=pss, num_warps=1, **({} if MAXNREG is None else {"maxnreg": MAXNREG}))
        if id(kp) not in _CHECKED:
            _check_shared(kp, vrun, ktile and keys)
            _CHECKED.add(id(kp))
        k = k or kp
    return k


# Resident programs and the register cap (experiment knobs, read at launch): ptxas gives the kernel 251-254
# registers uncapped, so 8 one-warp programs fit an SM (2 warps per scheduler, each with its own 16K registers).
# A third warp per scheduler needs <= 170 registers: capped at 168 with 12 programs per SM ptxas spills and nuq2-1%
# at 128K batch 1 took 154.4 us against 133.7 (run 75, benchmarks/gpu_runs/run75_pairs_probe_maxnreg.txt)
MAXNREG = None
PROGRAMS_PER_SM = 8


#: head_dim 256 in two launches: the scores pass (value half 0) hands P to the value pass (value half 1), so each
#: block's scores are computed once. False: one launch of two programs per split, one per value half, each computing
#: all the scores (an experiment knob, read at launch and by the split rule)
SCORES_ONCE = True
#: ... from this many quantized token-heads (batch x KV heads x tokens; in CUDA-graph steps, of the capacity): below
#: it one launch. Run 134 (Gemma-3-4B heads, nuq3-1% head-group): one launch 1.14x faster at 4K batch 1 (16K
#: token-heads: 46.2 against 52.5 us), two passes 1.06x faster at 16K batch 1 (65K: 63.1 against 66.9), 1.16-1.46x
#: from there up (runs 133-134). The threshold lies between the two points.
SCORES_ONCE_MIN_TOKEN_HEADS = 32768
#: (experiment knob) launch only these of head_dim 256's two passes, e.g. (1,): to time one pass alone (the outputs
#: are then wrong: the value pass reads a hand-over that was not written)
PASSES = None


def scores_once(head_dim: int, token_heads: int) -> bool:
    """Whether head_dim 256 runs as two launches (the scores pass, then the value pass) for this many quantized
    token-heads."""
    return bool(SCORES_ONCE and head_dim == 256 and token_heads >= SCORES_ONCE_MIN_TOKEN_HEADS)


def programs_per_split(head_dim: int, token_heads: int = 1 << 62) -> int:
    """Programs per split and KV head in one launch: head_dim 256 in one launch (not scores_once) takes two, one per
    value half (each computes all the scores)."""
    return 2 if head_dim == 256 and not scores_once(head_dim, token_heads) else 1


def splits(n_tokens: int, programs: int, num_sms: int, head_dim: int = D) -> tuple[int, int]:
    """(splits, chunk) for ``programs`` (sequence, KV head) pairs: one wave of one-warp programs, 8 per SM (H200
    sweep, benchmarks/gpu_runs/run44: 128 splits for 8 KV heads at 128K beat 256), as little as one block each, so
    that short contexts fill the wave too. Run 69 (gpu_splits_sweep.py, Llama-3-8B shape, batch 1): 128 splits
    against the former 256-token minimum's 16 took 4K from 46.3 to 24.3 us, and 128 against 64 took 16K from 46.6 to
    36.7 us. Where the wave is already full (batch 8) the split counts are those of the former rule. head_dim 256:
    two programs per split (programs_per_split) and at least two blocks each (run 108, Gemma-3-4B heads, 4K batch 1:
    64 splits against the one-block rule's 128, nuq3-1% head-group 56.3 against 62.7 us, token-group 59.6 against
    65.5; at 16K the rule's 128 splits of four blocks stay: 92.4 us against 109.0 with 64 and 176.8 with 256). With
    two passes (scores_once) each launch has one program per split: twice the splits, still of two blocks or more."""
    if n_tokens <= 0:
        return 0, BT
    nv = programs_per_split(head_dim, n_tokens * programs)
    # (rounded down: a second, nearly empty wave doubles the time)
    want = max(1, PROGRAMS_PER_SM * num_sms // max(programs * nv, 1))
    # (the cap rounds up: 4095 quantized tokens, 4K less a sink, in 128 one-block splits, not 64 of two blocks; run
    # 69, Llama-3-8B shape, 4K batch 1: 24.3 against 25.5 us)
    return _block_splits(n_tokens, want, BT * (2 if head_dim == 256 else 1), BT)
