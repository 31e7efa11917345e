"""Study (not part of the library): the register-layout decode kernel planned in
benchmarks/gpu_notes.md, in Gluon, for the simplest storage. That storage is 3-bit keys and values, head_dim 128,
head-group values, no outlier slots, contiguous positions and no mask. It writes split-K partials like the library's
kernels.

Design, per program (one warp; a KV head's chunk of tokens; up to 8 query heads):
- scores S^T = K Q^T with the tokens as the mma.sync M and the query heads as N = 8;
- the key tile is built in four chunks of 32 K indices. Chunk j pairs channels 16 j + m and 64 + 16 j + m, RoPE's
  rotate-half partners, which sit in the same thread's registers;
- codes come from today's packed rows (core/packing.py), read per lane as 32-bit words and extracted in place;
- levels come from the codebook through ``gl.gather``, then the per-channel affine and RoPE from a table of the
  offsets in a block; the query is rotated back by the block start;
- online softmax over the tokens, within the warp;
- values as O^T = V^T P^T, in four chunks of 32 channels, the per-token scale folded into P and the zero into one
  term per query head.
No shared-memory round trip is left for the operands: the layout conversions are ``assert_trivial``, except P's
move from the accumulator to the B operand.

    PYTHONPATH=src python benchmarks/gluon_decode_study.py          # compile for sm_90, print static SASS counts
    PYTHONPATH=src python benchmarks/gluon_decode_study.py --run    # on CUDA: check against PyTorch, time at 128K
    PYTHONPATH=src python benchmarks/gluon_decode_study.py --mirror # CPU: the same algorithm in PyTorch

The mirror (the kernel's chunks, word extraction, rotations, online softmax and merge, op for op in PyTorch) matches
the reference to 8e-5 and 1.3e-4 (fp16 rounding). On an H200 (run 36, benchmarks/gpu_runs/run36_gluon_study.txt) the
kernel matched the reference to 5e-5 / 6e-5 and took 292 us at 128K with a torch merge of the splits (about 250 us
alone; predicted 180-250). ``gluon_decode_pairs.py`` rebuilds it on pair tables: 106 us (run 44).

Static result (triton 3.6, sm_90, 2026-11-30): 255 registers, 9 local loads/stores, 512 B of shared memory.
- The hot loop is 3716 SASS instructions per 32-token block on one warp, i.e. 14.5 per key or value element per
  thread (triton 3.9: 3477, 13.6). The library's natural kernel takes 22.4 (2868 per block per thread, 2 warps).
- Most of the rest is known waste: per-element loads of the cos/sin and key scale/zero tables (296 ``LDG.E.U16``),
  and the naive code extraction (about 5.5 integer ops per element). A pair table and nibble extraction would cut
  those.
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
from ptx_count import resource_usage, sass_loop  # noqa: E402

BT, D, N = 32, 128, 8
SIG = {"KC": "*u8", "VC": "*u8", "VS": "*fp16", "VZ": "*fp16", "KS": "*fp16", "KZ": "*fp16", "KLUT": "*fp16",
       "VLUT": "*fp16", "CS": "*fp16", "INVF": "*fp32", "Q": "*fp16", "PACC": "*fp32", "PM": "*fp32", "PL": "*fp32",
       "n_tok": "i32", "chunk": "i32", "pos0": "i32", "qk_scale": "fp32", "skc": "i32", "svc": "i32", "skh": "i64",
       "svh": "i64", "NSPLIT": "i32"}


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
def _q_chunk(Q, bn, bk, off: gl.constexpr, qk_scale, D: gl.constexpr):
    """The B operand [32, N] of chunk off / 16: K index k -> channel 64 (k // 16) + off + k % 16, scaled, fp16."""
    return (gl.load(Q + bn[None, :] * D + (64 * (bk // 16) + off + bk % 16)[:, None]).to(gl.float32)
            * qk_scale).to(gl.float16)


@gluon.jit
def _cos_sin(ang):
    k = gl.floor(ang * 0.15915494309189535 + 0.5)
    r = gl.fma(-k, 6.28125, ang)
    r = gl.fma(-k, 0.0019353071795864769, r)
    c = gl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [r], dtype=gl.float32, is_pure=True, pack=1)
    s = gl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [r], dtype=gl.float32, is_pure=True, pack=1)
    return c, s


@gluon.jit
def _halves(x, BT: gl.constexpr):
    """[R, 32] (K index 16 half + m) -> its two [R, 16] halves (register subsets)."""
    return gl.split(gl.permute(gl.reshape(x, [BT, 2, 16]), [0, 2, 1]))


@gluon.jit
def _unhalves(x1, x2, BT: gl.constexpr):
    return gl.reshape(gl.permute(gl.join(x1, x2), [0, 2, 1]), [BT, 32])


@gluon.jit
def _decode_split(KC, VC, VS, VZ, KS, KZ, KLUT, VLUT, CS, INVF, Q, PACC, PM, PL, n_tok, chunk, pos0, qk_scale,
                  skc, svc, skh, svh, NSPLIT, BT: gl.constexpr, D: gl.constexpr, N: gl.constexpr):
    """The planned kernel on one warp, for one KV head and the tokens [pid * chunk, pid * chunk + chunk) of a
    3-bit head-group storage without outlier slots, at contiguous positions pos0 + t: key codes KC [T, 3 D / 8]
    (row stride skc bytes), value codes VC (svc), per-token value scale/zero VS/VZ [T] fp16, per-channel key
    scale/zero KS/KZ [D] fp16, codebooks KLUT/VLUT [8] fp16, cos/sin of the offsets in a block CS [2, BT, D/2] fp16,
    inverse frequencies INVF [D/2] fp32, queries Q [N, D] fp16 (query heads of this KV head, padded to N = 8).
    Grid (NSPLIT, KV heads): head h reads KC + h skh, VC + h svh (bytes), VS/VZ + h n_tok, KS/KZ + h D, Q + h N D.
    Writes the unnormalised partial PACC [h, pid, N, D] fp32, its max PM and sum PL [h, pid, N] (log2 domain)."""
    pid = gl.program_id(0)
    hd = gl.program_id(1).to(gl.int64)
    KC += hd * skh
    VC += hd * svh
    VS += hd * n_tok
    VZ += hd * n_tok
    KS += hd * D
    KZ += hd * D
    Q += hd * N * D
    PACC += hd * NSPLIT * N * D
    PM += hd * NSPLIT * N
    PL += hd * NSPLIT * N
    lo = pid * chunk
    hi = gl.minimum(lo + chunk, n_tok)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    # --- key side layouts (tokens = M, K index 16 half + m = channel 64 half + 16 j + m in chunk j)
    l3: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [8, 0, 0], [0, 0, 8], [0, 1, 0], [16, 0, 0]],
        lane_bases=[[0, 0, 2], [0, 0, 4], [1, 0, 0], [2, 0, 0], [4, 0, 0]], warp_bases=[], block_bases=[],
        shape=[BT, 2, 16])
    # --- value side layouts (channels = M in chunks of 32: channel 32 i + 16 sw + m; tokens = K)
    v3: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 8, 0], [0, 0, 8], [0, 0, 16], [1, 0, 0]],
        lane_bases=[[0, 0, 2], [0, 0, 4], [0, 1, 0], [0, 2, 0], [0, 4, 0]], warp_bases=[], block_bases=[],
        shape=[2, 16, BT])
    kvec: gl.constexpr = gl.SliceLayout(0, a_l)
    kk = gl.arange(0, 32, layout=kvec)
    bk = gl.arange(0, 32, layout=gl.SliceLayout(1, b_l))
    bn = gl.arange(0, N, layout=gl.SliceLayout(0, b_l))
    # loop invariants: query chunks (B operand [32, N]), key scale/zero per chunk, codebooks
    q0 = _q_chunk(Q, bn, bk, 0, qk_scale, D)
    q1 = _q_chunk(Q, bn, bk, 16, qk_scale, D)
    q2 = _q_chunk(Q, bn, bk, 32, qk_scale, D)
    q3 = _q_chunk(Q, bn, bk, 48, qk_scale, D)
    tb: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [1, 1], [1, 0])
    tr = gl.arange(0, 8, layout=gl.SliceLayout(1, tb))[:, None]
    tc = gl.arange(0, 32, layout=gl.SliceLayout(0, tb))[None, :]
    klut = gl.convert_layout(gl.load(KLUT + tr + 0 * tc), a_l)
    vlut = gl.convert_layout(gl.load(VLUT + tr + 0 * tc), a_l)
    ta = gl.arange(0, BT, layout=gl.SliceLayout(1, a_l))
    m = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, l3)))[None, :][:, None, :]
    mv = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(0, v3)))[:, None][None, :, :]
    t_k = gl.arange(0, BT, layout=gl.SliceLayout(1, gl.SliceLayout(2, l3)))[:, None]
    h_k = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, l3)))[None, :]
    vsl: gl.constexpr = gl.SliceLayout(1, v3)
    sw_v = gl.arange(0, 2, layout=gl.SliceLayout(1, vsl))[:, None]
    t_v = gl.arange(0, BT, layout=gl.SliceLayout(0, vsl))[None, :]
    c_l: gl.constexpr = gl.SliceLayout(1, mma)
    h_l: gl.constexpr = gl.SliceLayout(0, mma)
    tc_ = gl.arange(0, BT, layout=c_l)
    m_i = gl.full([N], -1.0e30, gl.float32, layout=h_l)
    l_i = gl.zeros([N], gl.float32, layout=h_l)
    z_i = gl.zeros([N], gl.float32, layout=h_l)
    acc0 = gl.zeros([32, N], gl.float32, layout=mma)
    acc1 = gl.zeros([32, N], gl.float32, layout=mma)
    acc2 = gl.zeros([32, N], gl.float32, layout=mma)
    acc3 = gl.zeros([32, N], gl.float32, layout=mma)
    for t0 in range(lo, hi, BT):
        # loads of the block: key words, value words, value scale/zero
        tmask = (t0 + tc_) < hi
        vsc = gl.load(VS + t0 + tc_, mask=tmask, other=0.0).to(gl.float32)
        vzr = gl.load(VZ + t0 + tc_, mask=tmask, other=0.0).to(gl.float32)
        p0 = (pos0 + t0).to(gl.float32)
        s = gl.zeros([BT, N], gl.float32, layout=mma)
        for j in gl.static_range(4):
            kmask = (t0 + t_k) < hi
            wj = gl.load(KC.to(gl.pointer_type(gl.int32)) + (t0 + t_k) * (skc // 4) + 4 * h_k + j, mask=kmask, other=0)
            hj = gl.load(KC.to(gl.pointer_type(gl.int16)) + (t0 + t_k) * (skc // 2) + D // 8 + 4 * h_k + j,
                         mask=kmask, other=0).to(gl.int32)
            code = ((wj[:, :, None] >> (2 * m)) & 3) | (((hj[:, :, None] >> m) & 1) << 2)
            lev = gl.gather(klut, gl.convert_layout(gl.reshape(code, [BT, 32]), a_l, assert_trivial=True), 0)
            ch = 64 * (kk // 16) + 16 * j + kk % 16
            k = lev * gl.load(KS + ch)[None, :] + gl.load(KZ + ch)[None, :]
            cs = CS + ta[:, None] * (D // 2) + (16 * j + kk % 16)[None, :]
            k1, k2 = _halves(k, BT)
            c1, _c = _halves(gl.load(cs), BT)
            s1, _s = _halves(gl.load(cs + BT * (D // 2)), BT)
            r = gl.convert_layout(_unhalves(k1 * c1 - k2 * s1, k2 * c1 + k1 * s1, BT), a_l, assert_trivial=True)
            # the query chunk rotated back by the block start p0 (RoPE(p0 + tau) = RoPE(tau) RoPE(p0))
            qj = _pick4(j, q0, q1, q2, q3).to(gl.float32)
            cz, sz = _cos_sin(p0 * gl.load(INVF + 16 * j + bk % 16))
            qa, qb = gl.split(gl.permute(gl.reshape(qj, [2, 16, N]), [1, 2, 0]))
            ca, _c2 = gl.split(gl.permute(gl.reshape(cz[:, None] + 0.0 * qj, [2, 16, N]), [1, 2, 0]))
            sa, _s2 = gl.split(gl.permute(gl.reshape(sz[:, None] + 0.0 * qj, [2, 16, N]), [1, 2, 0]))
            qr = gl.reshape(gl.permute(gl.join(qa * ca + qb * sa, qb * ca - qa * sa), [2, 0, 1]), [32, N])
            s = mma_v2(r, gl.convert_layout(qr.to(gl.float16), b_l), s)
        # online softmax over the block's tokens (axis 0), base 2 (qk_scale holds log2 e / sqrt(D))
        s = gl.where(tmask[:, None], s, -1.0e30)
        m_new = gl.maximum(m_i, gl.max(s, 0))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + gl.sum(p, 0)
        z_i = z_i * alpha + gl.sum(p * vzr[:, None], 0)
        m_i = m_new
        pv = gl.convert_layout((p * vsc[:, None]).to(gl.float16), b_l)
        for i in gl.static_range(4):  # channels 32 i .. 32 i + 31: words 2 i, 2 i + 1
            vmask = (t0 + t_v) < hi
            wi = gl.load(VC.to(gl.pointer_type(gl.int32)) + (t0 + t_v) * (svc // 4) + 2 * i + sw_v, mask=vmask, other=0)
            hi_ = gl.load(VC.to(gl.pointer_type(gl.int16)) + (t0 + t_v) * (svc // 2) + D // 8 + 2 * i + sw_v,
                          mask=vmask, other=0).to(gl.int32)
            vcode = ((wi[:, None, :] >> (2 * mv)) & 3) | (((hi_[:, None, :] >> mv) & 1) << 2)
            vt = gl.gather(vlut, gl.convert_layout(gl.reshape(vcode, [32, BT]), a_l, assert_trivial=True), 0)
            if i == 0:
                acc0 = mma_v2(vt, pv, acc0 * alpha[None, :])
            elif i == 1:
                acc1 = mma_v2(vt, pv, acc1 * alpha[None, :])
            elif i == 2:
                acc2 = mma_v2(vt, pv, acc2 * alpha[None, :])
            else:
                acc3 = mma_v2(vt, pv, acc3 * alpha[None, :])
    # partials: O^T chunks [32 channels, N] + the zero term
    oc = gl.arange(0, 32, layout=c_l)[:, None]
    oh = gl.arange(0, N, layout=h_l)[None, :]
    base = PACC + pid * N * D + oh * D
    gl.store(base + oc, acc0 + z_i[None, :])
    gl.store(base + 32 + oc, acc1 + z_i[None, :])
    gl.store(base + 64 + oc, acc2 + z_i[None, :])
    gl.store(base + 96 + oc, acc3 + z_i[None, :])
    hh = gl.arange(0, N, layout=h_l)
    gl.store(PM + pid * N + hh, m_i)
    gl.store(PL + pid * N + hh, l_i)


def static_report():
    div16 = [["tt.divisibility", 16]]
    names = list(SIG)
    attrs = {(names.index(n),): div16 for n in ("KC", "VC", "skc", "svc")}
    src = GluonASTSource(_decode_split, SIG, constexprs={"BT": BT, "D": D, "N": N}, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1))
    tot, loop, ops, loc = sass_loop(k.asm["cubin"])
    print(f"triton {triton.__version__}, sm_90: {resource_usage(k.asm['cubin'])}, shared {k.metadata.shared} B, "
          f"SASS {tot} instructions, hot loop {loop} ({loop / (2 * BT * D / 32):.1f} per element and thread), "
          f"{loc} local loads/stores")
    print("   hot loop:", ", ".join(f"{o} {c}" for o, c in ops.most_common(16)))


def make_case(T, H, seed=0, device="cuda"):
    """Random codes and tables for H KV heads of T tokens, packed as the library packs them."""
    from kvquant.core.packing import pack_codes

    g = torch.Generator().manual_seed(seed)
    kcodes = torch.randint(0, 8, (H, T, D), generator=g)
    vcodes = torch.randint(0, 8, (H, T, D), generator=g)
    c = dict(
        kcodes=kcodes, vcodes=vcodes,
        KC=pack_codes(kcodes, 3).to(device), VC=pack_codes(vcodes, 3).to(device),
        VS=(torch.rand(H, T, generator=g) * 0.5 + 0.05).half().to(device),
        VZ=(torch.randn(H, T, generator=g) * 0.2).half().to(device),
        KS=(torch.rand(H, D, generator=g) + 0.1).half().to(device),
        KZ=(torch.randn(H, D, generator=g) * 0.3).half().to(device),
        KLUT=torch.sort(torch.randn(8, generator=g))[0].half().to(device),
        VLUT=torch.sort(torch.randn(8, generator=g))[0].half().to(device),
        INVF=(1.0 / (500000.0 ** (torch.arange(0, D, 2).float() / D))).to(device),
        Q=torch.zeros(H, N, D, dtype=torch.float16, device=device),
    )
    c["Q"][:, :4] = torch.randn(H, 4, D, generator=g).half().to(device)  # GQA 4, padded to N = 8
    tau = torch.arange(BT, device=device).float()[:, None] * c["INVF"][None, :]
    c["CS"] = torch.stack([tau.cos(), tau.sin()]).half().contiguous()
    return c


def _chunk(T, nsplit):
    """Tokens per split: ceil(T / nsplit) rounded up to whole blocks."""
    return math.ceil(math.ceil(T / nsplit) / BT) * BT


def run_kernel(c, T, H, nsplit, pos0=0):
    chunk = _chunk(T, nsplit)
    pacc = torch.empty(H, nsplit, N, D, device="cuda")
    pm = torch.empty(H, nsplit, N, device="cuda")
    pl = torch.empty(H, nsplit, N, device="cuda")
    qk = math.log2(math.e) / math.sqrt(D)
    _decode_split[(nsplit, H)](c["KC"], c["VC"], c["VS"], c["VZ"], c["KS"], c["KZ"], c["KLUT"], c["VLUT"], c["CS"],
                               c["INVF"], c["Q"], pacc, pm, pl, T, chunk, pos0, qk, c["KC"].stride(1),
                               c["VC"].stride(1), c["KC"].stride(0), c["VC"].stride(0), nsplit, BT=BT, D=D, N=N,
                               num_warps=1)
    mx = pm.max(1, keepdim=True).values
    w = torch.exp2(pm - mx)
    return ((pacc * w[..., None]).sum(1) / (pl * w).sum(1)[..., None])[:, :4]


def reference(c, T, H, pos0=0):
    dev = c["KC"].device
    k = c["KLUT"].float()[c["kcodes"].to(dev)] * c["KS"].float()[:, None] + c["KZ"].float()[:, None]
    v = c["VLUT"].float()[c["vcodes"].to(dev)] * c["VS"].float()[..., None] + c["VZ"].float()[..., None]
    ang = (pos0 + torch.arange(T, device=dev)).float()[:, None] * c["INVF"][None, :]
    k1, k2 = k[..., : D // 2], k[..., D // 2:]
    k = torch.cat([k1 * ang.cos() - k2 * ang.sin(), k2 * ang.cos() + k1 * ang.sin()], -1)
    q = c["Q"][:, :4].float()
    p = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D), -1)
    return p @ v


def mirror(c, T, H, nsplit, pos0=0):
    """The kernel's algorithm step by step in PyTorch (same chunks, word extraction, block-start rotation, online
    softmax, folded value scale/zero, partials and merge), on any device: checks the index math on a CPU."""
    dev = c["KC"].device
    chunk = _chunk(T, nsplit)
    qk = math.log2(math.e) / math.sqrt(D)
    outs = []
    for h in range(H):
        kw = c["KC"][h].contiguous().view(torch.int32).long()  # [T, 12]: 8 low-plane words, then the high plane
        kh = c["KC"][h, :, D // 4:].contiguous().view(torch.int16).long()  # [T, 8] high-plane half-words
        vw = c["VC"][h].contiguous().view(torch.int32).long()
        vh = c["VC"][h, :, D // 4:].contiguous().view(torch.int16).long()
        q = c["Q"][h].float() * qk  # [N, D]
        parts = []
        for pid in range(nsplit):
            lo, hi = pid * chunk, min(pid * chunk + chunk, T)
            m_i = torch.full((N,), -1.0e30, device=dev)
            l_i = torch.zeros(N, device=dev)
            z_i = torch.zeros(N, device=dev)
            acc = torch.zeros(D, N, device=dev)
            for t0 in range(lo, hi, BT):
                t = torch.arange(t0, t0 + BT, device=dev)
                tm = t < hi
                tc = t.clamp(max=T - 1)
                s = torch.zeros(BT, N, device=dev)
                p0 = float(pos0 + t0)
                mm = torch.arange(16, device=dev)
                for j in range(4):
                    wj = torch.stack([kw[tc, j], kw[tc, 4 + j]], 1) * tm[:, None]  # [BT, 2 (half)]
                    hj = torch.stack([kh[tc, j], kh[tc, 4 + j]], 1) * tm[:, None]
                    code = ((wj[..., None] >> (2 * mm)) & 3) | (((hj[..., None] >> mm) & 1) << 2)  # [BT, 2, 16]
                    ch = (64 * torch.arange(2, device=dev)[:, None] + 16 * j + mm).reshape(32)
                    kv = c["KLUT"].float()[code.reshape(BT, 32)] * c["KS"][h].float()[ch] + c["KZ"][h].float()[ch]
                    cs, sn = c["CS"][0].float()[:, 16 * j: 16 * j + 16], c["CS"][1].float()[:, 16 * j: 16 * j + 16]
                    k1, k2 = kv[:, :16], kv[:, 16:]
                    r = torch.cat([k1 * cs - k2 * sn, k2 * cs + k1 * sn], 1)
                    qj = q[:, ch].t().half().float()  # [32, N]
                    ang = p0 * c["INVF"][16 * j: 16 * j + 16]
                    qa, qb = qj[:16], qj[16:]
                    qr = torch.cat([qa * ang.cos()[:, None] + qb * ang.sin()[:, None],
                                    qb * ang.cos()[:, None] - qa * ang.sin()[:, None]])
                    s += r.half().float() @ qr.half().float()
                s = torch.where(tm[:, None], s, torch.tensor(-1.0e30, device=dev))
                m_new = torch.maximum(m_i, s.max(0).values)
                alpha = torch.exp2(m_i - m_new)
                p = torch.exp2(s - m_new)
                vs = torch.where(tm, c["VS"][h, tc].float(), torch.zeros((), device=dev))
                vz = torch.where(tm, c["VZ"][h, tc].float(), torch.zeros((), device=dev))
                l_i = l_i * alpha + p.sum(0)
                z_i = z_i * alpha + (p * vz[:, None]).sum(0)
                m_i = m_new
                pv = (p * vs[:, None]).half().float()
                vt = []
                for i in range(4):
                    wi = torch.stack([vw[tc, 2 * i], vw[tc, 2 * i + 1]]) * tm  # [2 (sw), BT]
                    hi_ = torch.stack([vh[tc, 2 * i], vh[tc, 2 * i + 1]]) * tm
                    vcode = ((wi[:, None] >> (2 * mm[:, None])) & 3) | (((hi_[:, None] >> mm[:, None]) & 1) << 2)
                    vt.append(c["VLUT"].float()[vcode.reshape(32, BT)])
                acc = acc * alpha + torch.cat(vt) @ pv
            parts.append((acc.t() + z_i[:, None], m_i, l_i))
        pm = torch.stack([x[1] for x in parts])
        pl = torch.stack([x[2] for x in parts])
        pacc = torch.stack([x[0] for x in parts])
        w = torch.exp2(pm - pm.max(0).values)
        outs.append(((pacc * w[..., None]).sum(0) / (pl * w).sum(0)[:, None])[:4])
    return torch.stack(outs)


def run_checks():
    from triton.testing import do_bench

    for T, pos0 in ((4096, 0), (3000, 12345)):
        c = make_case(T, 2)
        got, ref = run_kernel(c, T, 2, 8, pos0), reference(c, T, 2, pos0)
        err = ((got - ref).norm() / ref.norm()).item()
        print(f"correctness T={T} pos0={pos0}: relative error {err:.2e}")
    T, H = 131072, 8  # Llama-3-8B shape, one layer, batch 1
    c = make_case(T, H)
    for nsplit in (64, 128, 256):
        us = do_bench(lambda: run_kernel(c, T, H, nsplit), warmup=25, rep=200, return_mode="median") * 1e3  # noqa: B023
        print(f"study kernel, 128K, 8 KV heads, {nsplit} splits per head: {us:.1f} us (incl. the torch merge)")
    c.clear()  # free the study's tensors
    # same run: the library's natural kernel on a head-group nuq3 storage without outlier slots, and fp16 SDPA
    from gpu_suite import fill_storages

    from kvquant import kernels

    kf, vf, sts, _ = fill_storages(1, H, D, T, [(3, "head")], frac=0.0)
    q = torch.randn(1, 4 * H, 1, D, device="cuda").bfloat16()
    st = sts[(3, "head")]
    us = do_bench(lambda: kernels.decode_attention(q, st, D**-0.5), warmup=25, rep=200, return_mode="median") * 1e3
    print(f"library natural kernel (nuq3, no slots), same shape: {us:.1f} us")
    k16, v16 = kf.repeat_interleave(4, 1), vf.repeat_interleave(4, 1)
    us = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k16, v16), warmup=25, rep=200,
                  return_mode="median") * 1e3
    print(f"SDPA bf16, same shape: {us:.1f} us")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="store_true", help="on CUDA: correctness against PyTorch and timing at 128K")
    ap.add_argument("--mirror", action="store_true", help="on the CPU: the kernel's algorithm in PyTorch against "
                    "the reference (checks the index math, not the Gluon code)")
    a = ap.parse_args()
    if a.run:
        run_checks()
    elif a.mirror:
        for T, pos0, nsplit in ((200, 0, 3), (257, 9000, 2)):
            cc = make_case(T, 2, device="cpu")
            got, ref = mirror(cc, T, 2, nsplit, pos0), reference(cc, T, 2, pos0)
            print(f"mirror T={T} pos0={pos0} splits={nsplit}: relative error {((got - ref).norm() / ref.norm()):.2e}")
    else:
        static_report()
