"""Triton kernels for the compressed KV cache (see docs/storage-format.md).

Decode attention (Flash-Decoding split-K), three kernels with one launch contract (kernels.decode_attention picks):
"natural" (the default for 3/4-bit storage and token-group values) and "fields" (2-bit head-group), two modes of
_kvq_decode_fields_kernel, and _kvq_decode_kernel ("tiles", described below; any head_dim / slot count).
Grid (B * H_kv, n_splits + 1). Program (bh, s < n_splits) walks one chunk of the quantized region for one KV head and
*all* its GQA query heads; program (bh, n_splits) walks the fp16 sinks and recent window. Each writes an
unnormalised partial (acc, running max m, running sum l); a reduce kernel merges them.

Inside a quantized block of BT tokens:
  key bytes -> bit-plane unpack (in registers, natural channel order through tl.interleave) -> levels[code] * s + z
  (per-channel affine form of key_lut; the LUT gather if it is not affine) -> Ck exact slots overwrite -> RoPE at
  q_pos (cos/sin of pos * inv_freq with explicit 2*pi range reduction) -> tl.dot with the query group -> online
  softmax (exp2) -> value bytes -> (p * scale) @ levels[code] + p . zero -> Cv slots as a correction (value minus
  the dense value at the slot, scattered by a one-hot x one-hot dot; GQA with tl.dot) or an overwrite (otherwise).
The key tile is held as two halves [BT, D/2] (channels c and c + D/2) so that RoPE's rotate-half pairs sit in the same
register position; the query is split the same way, so no permutation is needed.

Quantize-and-append: keys [BT, D] per (b, h) program: undo RoPE, normalise per channel, count decision boundaries,
LUT-dequantize, pick the Ck largest errors with repeated argmax (same order as torch.topk), pack bit-planes, store at
token offset n_q. Values: one vector (head or token group) per row, Cv+1 smallest / largest by repeated argmin/argmax,
the split that minimises the remaining range (core.codec.token_range), fp16 zero/scale, codes, packed.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _cos_sin(ang, INTERP: tl.constexpr):
    # range-reduce to [-pi, pi] so that the hardware sin/cos (MUFU, abs err ~1e-6 there) are accurate for any position
    k = tl.floor(ang * 0.15915494309189535 + 0.5)
    r = tl.fma(-k, 6.28125, ang)
    r = tl.fma(-k, 0.0019353071795864769, r)
    if INTERP:
        return tl.cos(r), tl.sin(r)
    else:
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True, pack=1)
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True, pack=1)
        return c, s


@triton.jit
def _unpack_half(row_ptr, BITS: tl.constexpr, D: tl.constexpr, HF: tl.constexpr, BT: tl.constexpr, tmask,
                 row_stride):
    """codes [BT, D/2] (int32) of channels HF*D/2 + i, natural order, from packed rows at row_ptr[BT] (+ bytes)."""
    rows = row_ptr[:, None]
    if BITS == 4:
        NB: tl.constexpr = D // 4
        off = HF * NB + tl.arange(0, NB)
        b = tl.load(rows + off[None, :], mask=tmask[:, None], other=0).to(tl.int32)
        codes = tl.interleave(b & 15, b >> 4)
    else:
        NB2: tl.constexpr = D // 8
        off = HF * NB2 + tl.arange(0, NB2)
        b = tl.load(rows + off[None, :], mask=tmask[:, None], other=0).to(tl.int32)
        c0 = b & 3
        c1 = (b >> 2) & 3
        c2 = (b >> 4) & 3
        c3 = (b >> 6) & 3
        codes = tl.interleave(tl.interleave(c0, c2), tl.interleave(c1, c3))
        if BITS == 3:
            NB1: tl.constexpr = D // 16
            off1 = D // 4 + HF * NB1 + tl.arange(0, NB1)
            h = tl.load(rows + off1[None, :], mask=tmask[:, None], other=0).to(tl.int32)
            e = tl.interleave(tl.interleave((h >> 0) & 1, (h >> 4) & 1), tl.interleave((h >> 2) & 1, (h >> 6) & 1))
            o = tl.interleave(tl.interleave((h >> 1) & 1, (h >> 5) & 1), tl.interleave((h >> 3) & 1, (h >> 7) & 1))
            codes = codes | (tl.interleave(e, o) << 2)
    return codes


@triton.jit
def _unpack_full(row_ptr, lo_off, hi_off, BITS: tl.constexpr, D: tl.constexpr, tmask):
    """codes [BT, D] natural order for one head's D elements whose low plane starts at byte lo_off of each row
    (and, for 3 bits, whose 1-bit plane starts at hi_off)."""
    rows = row_ptr[:, None]
    if BITS == 4:
        NB: tl.constexpr = D // 2
        b = tl.load(rows + lo_off + tl.arange(0, NB)[None, :], mask=tmask[:, None], other=0).to(tl.int32)
        codes = tl.interleave(b & 15, b >> 4)
    else:
        NB2: tl.constexpr = D // 4
        b = tl.load(rows + lo_off + tl.arange(0, NB2)[None, :], mask=tmask[:, None], other=0).to(tl.int32)
        codes = tl.interleave(tl.interleave(b & 3, (b >> 4) & 3), tl.interleave((b >> 2) & 3, (b >> 6) & 3))
        if BITS == 3:
            NB1: tl.constexpr = D // 8
            h = tl.load(rows + hi_off + tl.arange(0, NB1)[None, :], mask=tmask[:, None], other=0).to(tl.int32)
            e = tl.interleave(tl.interleave((h >> 0) & 1, (h >> 4) & 1), tl.interleave((h >> 2) & 1, (h >> 6) & 1))
            o = tl.interleave(tl.interleave((h >> 1) & 1, (h >> 5) & 1), tl.interleave((h >> 3) & 1, (h >> 7) & 1))
            codes = codes | (tl.interleave(e, o) << 2)
    return codes


@triton.jit
def _mm(a, b, F32: tl.constexpr):
    """a @ b; F32 upcasts (the CPU interpreter multiplies bf16 wrongly)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _softmax_update(s, m_i, l_i, qk_scale, mask_ptr, mask_off, t, tmask, HAS_MASK: tl.constexpr):
    """One online-softmax step over raw scores s [GP, BT] of tokens t [BT]: scale to log2 units, add the additive
    mask (mask_ptr + mask_off + t), drop tokens outside tmask; -> (p, new running max, new running sum, the factor
    alpha every accumulator must be multiplied by)."""
    s = s * qk_scale
    if HAS_MASK:
        bias = tl.load(mask_ptr + mask_off + t, mask=tmask, other=0.0)
        s = s + bias[None, :] * 1.4426950408889634
    s = tl.where(tmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, m_new, l_i, alpha


@triton.jit
def _code_at(row_ptr, e, BITS: tl.constexpr, NV: tl.constexpr, tmask):
    """code of element e [BT] of each packed row (natural bit-plane order, core.packing): one byte per plane."""
    if BITS == 4:
        b = tl.load(row_ptr + (e >> 1), mask=tmask, other=0).to(tl.int32)
        code = (b >> ((e & 1) * 4)) & 15
    else:
        b = tl.load(row_ptr + (e >> 2), mask=tmask, other=0).to(tl.int32)
        code = (b >> ((e & 3) * 2)) & 3
        if BITS == 3:
            hb = tl.load(row_ptr + NV // 4 + (e >> 3), mask=tmask, other=0).to(tl.int32)
            code = code | (((hb >> (e & 7)) & 1) << 2)
    return code


@triton.jit
def _dense_block(q1, q2, k_base, v_base, t0, n_tok, skt, svt, mask_ptr, mask_off, m_i, l_i, acc, qk_scale,
                 D: tl.constexpr, BT: tl.constexpr, HAS_MASK: tl.constexpr, USE_DOT: tl.constexpr,
                 F32: tl.constexpr):
    """One block of fp16/bf16 post-RoPE keys/values (sinks, window, or the plain fp16 baseline)."""
    HALF: tl.constexpr = D // 2
    t = t0 + tl.arange(0, BT)
    tmask = t < n_tok
    ch = tl.arange(0, HALF)
    kp = k_base + t[:, None] * skt + ch[None, :]
    k1 = tl.load(kp, mask=tmask[:, None], other=0.0)
    k2 = tl.load(kp + HALF, mask=tmask[:, None], other=0.0)
    if USE_DOT:
        s = _mm(q1, tl.trans(k1), F32) + _mm(q2, tl.trans(k2), F32)
    else:
        s = tl.sum(q1.to(tl.float32) * k1.to(tl.float32), 1)[None, :] + \
            tl.sum(q2.to(tl.float32) * k2.to(tl.float32), 1)[None, :]
    p, m_i, l_i, alpha = _softmax_update(s, m_i, l_i, qk_scale, mask_ptr, mask_off, t, tmask, HAS_MASK)
    acc = acc * alpha[:, None]
    chd = tl.arange(0, D)
    v = tl.load(v_base + t[:, None] * svt + chd[None, :], mask=tmask[:, None], other=0.0)
    if USE_DOT:
        acc += _mm(p.to(v.dtype), v, F32)
    else:
        acc += tl.sum(p.reshape(BT, 1) * v.to(tl.float32), 0)[None, :]
    return m_i, l_i, acc


@triton.jit
def _value_bases(VC, b, h, svc_b, svc_g, svs_b, svs_g, svo_b, svo_g, D: tl.constexpr, V_TOKEN: tl.constexpr):
    """Where KV head h's values lie: (code row base, zero/scale offset, slot offset, first element index of the
    slots). The codes are stored per head either way (low plane at byte 0 of a row, high plane at D // 4);
    token-group storage (V_TOKEN) has one zero/scale and one row of slots per token for all heads."""
    if V_TOKEN:
        return VC + b * svc_b + h * svc_g, b * svs_b, b * svo_b, h * D
    else:
        return VC + b * svc_b + h * svc_g, b * svs_b + h * svs_g, b * svo_b + h * svo_g, 0


@triton.jit
def _dense_regions(q1, q2, m_i, l_i, acc, b, h, ns_hi, nw_hi, n_s, n_q, SK, SV, WK, WV, mask_row, qk_scale,
                   ssk_b, ssk_h, ssk_t, ssv_b, ssv_h, ssv_t, swk_b, swk_h, swk_t, swv_b, swv_h, swv_t,
                   D: tl.constexpr, BT: tl.constexpr, HAS_MASK: tl.constexpr, USE_DOT: tl.constexpr,
                   F32: tl.constexpr):
    """The fp16 sinks (ns_hi tokens) and recent window (nw_hi tokens) of KV head h, natural channel order."""
    sk_base = SK + b * ssk_b + h * ssk_h
    sv_base = SV + b * ssv_b + h * ssv_h
    for t0 in range(0, ns_hi, BT):
        m_i, l_i, acc = _dense_block(q1, q2, sk_base, sv_base, t0, ns_hi, ssk_t, ssv_t, mask_row, 0,
                                     m_i, l_i, acc, qk_scale, D, BT, HAS_MASK, USE_DOT, F32)
    wk_base = WK + b * swk_b + h * swk_h
    wv_base = WV + b * swv_b + h * swv_h
    for t0 in range(0, nw_hi, BT):
        m_i, l_i, acc = _dense_block(q1, q2, wk_base, wv_base, t0, nw_hi, swk_t, swv_t, mask_row, n_s + n_q,
                                     m_i, l_i, acc, qk_scale, D, BT, HAS_MASK, USE_DOT, F32)
    return m_i, l_i, acc


# Scalars that change from one decode step to the next (lengths, split sizes, the mask's row stride): Triton would
# otherwise compile a new variant whenever one of them becomes 1 or a multiple of 16 (seconds of JIT compilation in
# the middle of a generation); none of them sets the alignment of a vector load.
_DECODE_DYNAMIC = ("smask_b", "n_s", "n_q", "n_w", "chunk", "NSPLIT_Q")


@triton.jit
def _device_lengths(LENS, NSPLIT_Q, BT: tl.constexpr):
    """CUDA-graph replay (DEVLEN): the quantized length read from device memory, and each split's share of it."""
    n_q = tl.load(LENS)
    return n_q, tl.cdiv(tl.cdiv(n_q, NSPLIT_Q), BT) * BT


@triton.jit(do_not_specialize=_DECODE_DYNAMIC)
def _kvq_decode_kernel(
    Q, PACC, PM, PL,
    KC, KOI, KOV, VC, VZ, VS, VOI, VOV, QPOS,
    KLUT, VLEV, INVF, KDL, KSC, KZR, VLEVH,
    SK, SV, WK, WV, MASK,
    qk_scale, rope_scale,
    sqb, sqh,
    skc_b, skc_h, skc_t, sko_b, sko_h, sko_t,
    svc_b, svc_g, svc_t, svs_b, svs_g, svs_t, svo_b, svo_g, svo_t,
    sqp_b,
    ssk_b, ssk_h, ssk_t, ssv_b, ssv_h, ssv_t,
    swk_b, swk_h, swk_t, swv_b, swv_h, swv_t,
    smask_b,
    n_s, n_q, n_w, chunk, NSPLIT_Q,
    H_KV: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr,
    BITS: tl.constexpr, D: tl.constexpr, CK: tl.constexpr, CV: tl.constexpr,
    V_TOKEN: tl.constexpr, BT: tl.constexpr, HAS_MASK: tl.constexpr, USE_DOT: tl.constexpr,
    F32: tl.constexpr, K_AFFINE: tl.constexpr, GR: tl.constexpr, VCORR: tl.constexpr, VA: tl.constexpr,
    LENS=None, DEVLEN: tl.constexpr = False,
):
    HALF: tl.constexpr = D // 2
    L: tl.constexpr = 1 << BITS
    VDB: tl.constexpr = D // VA
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)  # 64-bit base offsets: caches of > 2^31 bytes
    h = (pid_bh % H_KV).to(tl.int64)
    nsplit = NSPLIT_Q + 1
    if DEVLEN:
        n_q, chunk = _device_lengths(LENS, NSPLIT_Q, BT)

    g = tl.arange(0, GP)
    gmask = g < GROUP
    ch = tl.arange(0, HALF)
    chd = tl.arange(0, D)
    # query rows are replicated GP // GR times (row g holds query head g % GR; GR = next pow2 >= GROUP, rows with
    # g % GR >= GROUP are zero): a copy of the real rows is then a reshape + reduction (value-slot correction below)
    gq = g % GR
    gload = gq < GROUP
    qp = Q + b * sqb + (h * GROUP + gq)[:, None] * sqh + ch[None, :]
    q1 = tl.load(qp, mask=gload[:, None], other=0.0)
    q2 = tl.load(qp + HALF, mask=gload[:, None], other=0.0)

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    mask_row = MASK + b * smask_b

    # ---------------- quantized region ----------------
    q_lo = pid_s * chunk
    q_hi = tl.minimum(q_lo + chunk, n_q)
    # dequantized operands are within fp16 range (fp16 outliers/scales): fp16 dots keep 3 more mantissa bits than bf16
    # RoPE's attention_scaling multiplies every rotated key element: fold it into the query (once per program)
    q1h = (q1.to(tl.float32) * rope_scale).to(tl.float16)
    q2h = (q2.to(tl.float32) * rope_scale).to(tl.float16)
    invf = tl.load(INVF + ch)
    if K_AFFINE:
        # key_lut[h, c, code] == KDL[code] * KSC[h, c] + KZR[h, c] (per-channel affine, checked on the host): a
        # 2^b-entry table (one L1 line, 32-bit offsets) + one FMA instead of a 64-bit-address per-channel gather
        ks1 = tl.load(KSC + h * D + ch)[None, :]
        kz1 = tl.load(KZR + h * D + ch)[None, :]
        ks2 = tl.load(KSC + h * D + HALF + ch)[None, :]
        kz2 = tl.load(KZR + h * D + HALF + ch)[None, :]
    else:
        lut1 = KLUT + (h * D + ch)[None, :] * L
        lut2 = KLUT + (h * D + HALF + ch)[None, :] * L
    kc_base = KC + b * skc_b + h * skc_h
    ko_base = b * sko_b + h * sko_h
    vc_base, vs_base, vo_base, v_idx_off = _value_bases(
        VC, b, h, svc_b, svc_g, svs_b, svs_g, svo_b, svo_g, D, V_TOKEN)
    if VCORR:
        # value slots as a correction after P@V: corr[a, (r, e)] accumulates sum_t p[r, t] * delta_t at channel
        # a * VDB + e through a one-hot x one-hot factorised dot ([VA, BT] @ [BT, GR * VDB]) per slot
        corr = tl.zeros([VA, GR * VDB], tl.float32)
        arow = tl.arange(0, VA)
        ecol = tl.arange(0, VDB)
    for t0 in range(q_lo, q_hi, BT):
        t = t0 + tl.arange(0, BT)
        tmask = t < q_hi
        krow = kc_base + t * skc_t
        c1 = _unpack_half(krow, BITS, D, 0, BT, tmask, skc_t)
        c2 = _unpack_half(krow, BITS, D, 1, BT, tmask, skc_t)
        if K_AFFINE:
            k1 = tl.load(KDL + c1) * ks1 + kz1
            k2 = tl.load(KDL + c2) * ks2 + kz2
        else:
            k1 = tl.load(lut1 + c1)
            k2 = tl.load(lut2 + c2)
        for j in tl.static_range(CK):
            oi = tl.load(KOI + ko_base + t * sko_t + j, mask=tmask, other=0).to(tl.int32)
            ov = tl.load(KOV + ko_base + t * sko_t + j, mask=tmask, other=0.0).to(tl.float32)
            k1 = tl.where(oi[:, None] == ch[None, :], ov[:, None], k1)
            k2 = tl.where(oi[:, None] == (ch + HALF)[None, :], ov[:, None], k2)
        pos = tl.load(QPOS + b * sqp_b + t, mask=tmask, other=0)
        ang = pos.to(tl.float32)[:, None] * invf[None, :]
        cs, sn = _cos_sin(ang, F32)
        r1 = k1 * cs - k2 * sn
        r2 = k2 * cs + k1 * sn
        if USE_DOT:
            s = _mm(q1h, tl.trans(r1.to(tl.float16)), F32) + _mm(q2h, tl.trans(r2.to(tl.float16)), F32)
        else:
            s = tl.sum(q1.to(tl.float32) * r1, 1)[None, :] + tl.sum(q2.to(tl.float32) * r2, 1)[None, :]
            s = s * rope_scale
        p, m_i, l_i, alpha = _softmax_update(s, m_i, l_i, qk_scale, mask_row, n_s, t, tmask, HAS_MASK)
        acc = acc * alpha[:, None]
        # values: v = level[code] * scale_t + zero_t -> p @ v = (p * scale) @ level + (p . zero)
        vrow = vc_base + t * svc_t
        vcodes = _unpack_full(vrow, 0, D // 4, BITS, D, tmask)
        vz = tl.load(VZ + vs_base + t * svs_t, mask=tmask, other=0.0).to(tl.float32)
        vsc = tl.load(VS + vs_base + t * svs_t, mask=tmask, other=0.0).to(tl.float32)
        if VCORR:
            lev = tl.load(VLEVH + vcodes)
            acc += _mm((p * vsc[None, :]).to(tl.float16), lev, F32)
            acc += tl.sum(p * vz[None, :], 1)[:, None]
            p_r = tl.max(tl.reshape(p, [GP // GR, GR, BT]), 0)
            a_r = tl.max(tl.reshape(alpha, [GP // GR, GR]), 0)
            corr = corr * tl.reshape(tl.broadcast_to(a_r[:, None], [GR, VDB]), [GR * VDB])[None, :]
            for j in tl.static_range(CV):
                oi = tl.load(VOI + vo_base + t * svo_t + j, mask=tmask, other=0).to(tl.int32)
                ov = tl.load(VOV + vo_base + t * svo_t + j, mask=tmask, other=0.0).to(tl.float32)
                c = oi - v_idx_off  # the slot's channel in head h (codes are stored per head)
                inside = (c >= 0) & (c < D)
                dense = tl.load(VLEV + _code_at(vrow, tl.where(inside, c, 0), BITS, D, tmask)) * vsc + vz
                delta = tl.where(inside, ov - dense, 0.0)
                lhs = tl.where((c // VDB)[None, :] == arow[:, None], 1.0, 0.0)  # [VA, BT]
                w = tl.trans(p_r * delta[None, :])  # [BT, GR]
                rhs = tl.where((c % VDB)[:, None, None] == ecol[None, None, :], w[:, :, None], 0.0)
                corr += _mm(lhs.to(tl.float16), tl.reshape(rhs, [BT, GR * VDB]).to(tl.float16), F32)
        else:
            lev = tl.load(VLEV + vcodes)
            v = lev * vsc[:, None] + vz[:, None]
            for j in tl.static_range(CV):
                oi = tl.load(VOI + vo_base + t * svo_t + j, mask=tmask, other=0).to(tl.int32) - v_idx_off
                ov = tl.load(VOV + vo_base + t * svo_t + j, mask=tmask, other=0.0).to(tl.float32)
                v = tl.where(oi[:, None] == chd[None, :], ov[:, None], v)
            v = tl.where(tmask[:, None], v, 0.0)
            if USE_DOT:
                acc += _mm(p.to(tl.float16), v.to(tl.float16), F32)
            else:
                acc += tl.sum(p.reshape(BT, 1) * v, 0)[None, :]
    if VCORR:
        # corr[a, (r, e)] -> [GR, D] (channel a * VDB + e), added to every copy of row r
        cr = tl.reshape(tl.permute(tl.reshape(corr, [VA, GR, VDB]), (1, 0, 2)), [GR, D])
        acc = tl.reshape(tl.reshape(acc, [GP // GR, GR, D]) + cr[None, :, :], [GP, D])

    # ---------------- fp16 sinks and recent window (last split only) ----------------
    last = pid_s == NSPLIT_Q
    m_i, l_i, acc = _dense_regions(q1, q2, m_i, l_i, acc, b, h, tl.where(last, n_s, 0), tl.where(last, n_w, 0),
                                   n_s, n_q, SK, SV, WK, WV, mask_row, qk_scale, ssk_b, ssk_h, ssk_t, ssv_b, ssv_h,
                                   ssv_t, swk_b, swk_h, swk_t, swv_b, swv_h, swv_t, D, BT, HAS_MASK, USE_DOT, F32)

    # partials: [B, Hq, nsplit, D], [B, Hq, nsplit]
    row = (b * H_KV * GROUP + h * GROUP + g) * nsplit + pid_s
    tl.store(PACC + row[:, None] * D + chd[None, :], acc, mask=gmask[:, None])
    tl.store(PM + row, m_i, mask=gmask)
    tl.store(PL + row, l_i, mask=gmask)


@triton.jit(do_not_specialize=("smask_b", "T", "chunk", "NSPLIT"))
def _fp16_decode_kernel(
    Q, PACC, PM, PL, K, V, MASK, qk_scale,
    sqb, sqh, skb, skh, skt, svb, svh, svt, smask_b,
    T, chunk, NSPLIT,
    H_KV: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
    HAS_MASK: tl.constexpr, USE_DOT: tl.constexpr, F32: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)  # 64-bit base offsets: caches of > 2^31 bytes
    h = (pid_bh % H_KV).to(tl.int64)
    g = tl.arange(0, GP)
    gmask = g < GROUP
    ch = tl.arange(0, HALF)
    chd = tl.arange(0, D)
    qp = Q + b * sqb + (h * GROUP + g)[:, None] * sqh + ch[None, :]
    q1 = tl.load(qp, mask=gmask[:, None], other=0.0)
    q2 = tl.load(qp + HALF, mask=gmask[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, T)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for t0 in range(lo, hi, BT):
        m_i, l_i, acc = _dense_block(q1, q2, k_base, v_base, t0, hi, skt, svt, MASK + b * smask_b, 0,
                                     m_i, l_i, acc, qk_scale, D, BT, HAS_MASK, USE_DOT, F32)
    row = (b * H_KV * GROUP + h * GROUP + g) * NSPLIT + pid_s
    tl.store(PACC + row[:, None] * D + chd[None, :], acc, mask=gmask[:, None])
    tl.store(PM + row, m_i, mask=gmask)
    tl.store(PL + row, l_i, mask=gmask)


@triton.jit(do_not_specialize=("NSPLIT",))
def _reduce_kernel(PACC, PM, PL, OUT, so_b, so_h, HQ, NSPLIT, SP: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
                   CS: tl.constexpr):
    """Merge the NSPLIT partials of one (sequence, query head) for channels DC c .. DC c + DC - 1 (grid axis 1): the
    largest max first (SP >= NSPLIT), then the accumulators CS splits at a time. (Reading all [SP, D] partials at once
    spilled: at head_dim 256 over 257 splits that took 115 us on the H200, benchmarks/gpu_runs/run131; one program per
    query head looping over the splits still took about 37, run 132.)"""
    pid = tl.program_id(0)
    b = pid // HQ
    hq = pid % HQ
    s = tl.arange(0, SP)
    mx = tl.max(tl.load(PM + pid * NSPLIT + s, mask=s < NSPLIT, other=float("-inf")), 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    chd = tl.program_id(1) * DC + tl.arange(0, DC)
    num = tl.zeros([DC], tl.float32)
    den = tl.zeros([CS], tl.float32)
    for s0 in range(0, NSPLIT, CS):
        sc = s0 + tl.arange(0, CS)
        smask = sc < NSPLIT
        m = tl.load(PM + pid * NSPLIT + sc, mask=smask, other=float("-inf"))
        w = tl.where(smask, tl.exp2(m - mx), 0.0)
        den += tl.load(PL + pid * NSPLIT + sc, mask=smask, other=0.0) * w
        acc = tl.load(PACC + (pid * NSPLIT + sc)[:, None] * D + chd[None, :], mask=smask[:, None], other=0.0)
        num += tl.sum(acc * w[:, None], 0)
    den_s = tl.sum(den, 0)
    out = tl.where(den_s > 0, num / den_s, 0.0)
    tl.store(OUT + b * so_b + hq * so_h + chd, out.to(OUT.dtype.element_ty))


# ------------------------------------------------------------------------------------------------------------------
# quantize-and-append
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _bucket(xn, BND, L: tl.constexpr):
    code = tl.zeros(xn.shape, tl.int32)
    for i in tl.static_range(L - 1):
        code += (xn > tl.load(BND + i)).to(tl.int32)
    return code


@triton.jit
def _pack_store(codes, out_row, BITS: tl.constexpr, BT: tl.constexpr, N: tl.constexpr, NVALID, lo_off, hi_off,
                tmask):
    """codes [BT, N] (natural order) -> bit-planes stored at out_row[BT] + lo_off (+ hi_off for the 1-bit plane)."""
    if BITS == 4:
        P: tl.constexpr = 2
        x = tl.reshape(codes, [BT, N // P, P])
        sh = tl.arange(0, P) * 4
        byt = tl.sum(x << sh[None, None, :], 2)
        j = tl.arange(0, N // P)
        tl.store(out_row[:, None] + lo_off + j[None, :], byt.to(tl.uint8),
                 mask=tmask[:, None] & (j[None, :] < NVALID // P))
    else:
        P2: tl.constexpr = 4
        x = tl.reshape(codes & 3, [BT, N // P2, P2])
        sh = tl.arange(0, P2) * 2
        byt = tl.sum(x << sh[None, None, :], 2)
        j = tl.arange(0, N // P2)
        tl.store(out_row[:, None] + lo_off + j[None, :], byt.to(tl.uint8),
                 mask=tmask[:, None] & (j[None, :] < NVALID // P2))
        if BITS == 3:
            P1: tl.constexpr = 8
            x1 = tl.reshape(codes >> 2, [BT, N // P1, P1])
            sh1 = tl.arange(0, P1)
            byt1 = tl.sum(x1 << sh1[None, None, :], 2)
            j1 = tl.arange(0, N // P1)
            tl.store(out_row[:, None] + hi_off + j1[None, :], byt1.to(tl.uint8),
                     mask=tmask[:, None] & (j1[None, :] < NVALID // P1))


@triton.jit
def _quant_keys(
    pid_bh, pid_t,
    K, POS, KZ, KS, KLUT, BND, INVF, rope_scale,
    KC, KOI, KOV, QPOS,
    sk_b, sk_h, sk_t, sp_b, sp_t,
    skc_b, skc_h, skc_t, sko_b, sko_h, sko_t, sqp_b,
    T, t_off, half_r,
    H: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, CK: tl.constexpr, BT: tl.constexpr,
    UNDO_ROPE: tl.constexpr, F32: tl.constexpr,
):
    L: tl.constexpr = 1 << BITS
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    t = pid_t * BT + tl.arange(0, BT)
    tmask = t < T
    c = tl.arange(0, D)
    kp = K + b * sk_b + h * sk_h + t[:, None] * sk_t
    x = tl.load(kp + c[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    pos = tl.load(POS + b * sp_b + t * sp_t, mask=tmask, other=0)
    if UNDO_ROPE:
        rot = c < 2 * half_r
        partner = tl.where(c < half_r, c + half_r, c - half_r)
        partner = tl.where(rot, partner, c)
        xp = tl.load(kp + partner[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
        fi = tl.where(c < half_r, c, c - half_r)
        fi = tl.where(rot, fi, 0)
        invf = tl.load(INVF + fi, mask=rot, other=0.0)
        ang = pos.to(tl.float32)[:, None] * invf[None, :]
        cs, sn = _cos_sin(ang, F32)
        cs = cs * rope_scale
        sn = sn * rope_scale
        sgn = tl.where(c < half_r, 1.0, -1.0)
        # unapply: (x*c - rotate_half(x)*s) / (c^2+s^2), rotate_half(x)[c] = -x[c+R/2] (c<R/2), x[c-R/2] (c>=R/2)
        pre = (x * cs + sgn[None, :] * xp * sn) / (cs * cs + sn * sn)
        x = tl.where(rot[None, :], pre, x)
    z = tl.load(KZ + h * D + c)
    s = tl.load(KS + h * D + c)
    xn = (x - z[None, :]) / s[None, :]
    xn = tl.minimum(tl.maximum(xn, -1.0), 1.0)
    code = _bucket(xn, BND, L)
    deq = tl.load(KLUT + (h * D + c)[None, :] * L + code)
    err = tl.abs(x - deq)
    ko = KOI + b * sko_b + h * sko_h + (t + t_off) * sko_t
    kv = KOV + b * sko_b + h * sko_h + (t + t_off) * sko_t
    for j in tl.static_range(CK):
        am = tl.argmax(err, 1)
        val = tl.sum(tl.where(c[None, :] == am[:, None], x, 0.0), 1)
        tl.store(ko + j, am.to(KOI.dtype.element_ty), mask=tmask)
        tl.store(kv + j, val.to(tl.float16), mask=tmask)
        err = tl.where(c[None, :] == am[:, None], -1.0, err)
    row = KC + b * skc_b + h * skc_h + (t + t_off) * skc_t
    _pack_store(code, row, BITS, BT, D, D, 0, D // 4, tmask)
    if h == 0:
        tl.store(QPOS + b * sqp_b + t + t_off, pos.to(tl.int32), mask=tmask)


@triton.jit
def _store_slots(s_i, s_v, jj, VOI, VOV, VOE, row_off_o, row_off_e, tmask, CV: tl.constexpr, D: tl.constexpr,
                 HP: tl.constexpr, H: tl.constexpr, ENDS: tl.constexpr):
    """Store the CV slots (element s_i, value s_v: [BT, CVP] tiles, columns >= CV unused) of each row in slot order,
    or with ENDS sorted by element (a slot's column is the number of slots with a smaller element: the elements of a
    row are distinct) plus the [BT, H] ends of each KV head's run of slots (core.codec.head_ends)."""
    valid = jj < CV
    if ENDS:
        smaller = valid[None, None, :] & (s_i[:, None, :] < s_i[:, :, None])  # [BT, j, i]: slot i before slot j
        col = tl.sum(smaller.to(tl.int32), 2)
    else:
        col = tl.zeros_like(s_i) + jj[None, :]
    m = tmask[:, None] & valid[None, :]
    tl.store(VOI + row_off_o[:, None] + col, s_i.to(VOI.dtype.element_ty), mask=m)
    tl.store(VOV + row_off_o[:, None] + col, s_v.to(tl.float16), mask=m)
    if ENDS:
        hh = tl.arange(0, HP)
        below = valid[None, None, :] & (s_i[:, None, :] < ((hh + 1) * D)[None, :, None])  # [BT, h, i]
        ends = tl.sum(below.to(tl.int32), 2)
        tl.store(VOE + row_off_e[:, None] + hh[None, :], ends.to(VOE.dtype.element_ty),
                 mask=tmask[:, None] & (hh < H)[None, :])


@triton.jit
def _quant_values(
    pid_bg, pid_t,
    V, BND, VC, VZ, VS, VOI, VOV,
    sv_b, sv_h, sv_t,
    svc_b, svc_g, svc_t, svs_b, svs_g, svs_t, svo_b, svo_g, svo_t,
    T, t_off,
    G: tl.constexpr, NV: tl.constexpr, NVP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, CV: tl.constexpr,
    CVP: tl.constexpr, BT: tl.constexpr, TOKEN: tl.constexpr,
    VOE, soe_b, soe_t, ENDS: tl.constexpr, HP: tl.constexpr,
):
    L: tl.constexpr = 1 << BITS
    b = (pid_bg // G).to(tl.int64)
    gi = (pid_bg % G).to(tl.int64)
    t = pid_t * BT + tl.arange(0, BT)
    tmask = t < T
    e = tl.arange(0, NVP)
    emask = e < NV
    if TOKEN:
        eo = (e // D) * sv_h + (e % D)
        vbase = V + b * sv_b
    else:
        eo = e
        vbase = V + b * sv_b + gi * sv_h
    m2 = tmask[:, None] & emask[None, :]
    x = tl.load(vbase + t[:, None] * sv_t + eo[None, :], mask=m2, other=0.0).to(tl.float32)
    row_off_s = b * svs_b + gi * svs_g + (t + t_off) * svs_t
    row_off_o = b * svo_b + gi * svo_g + (t + t_off) * svo_t
    if CV > 0:
        jj = tl.arange(0, CVP)
        lo_v = tl.zeros([BT, CVP], tl.float32)
        lo_i = tl.zeros([BT, CVP], tl.int32)
        hi_v = tl.zeros([BT, CVP], tl.float32)
        hi_i = tl.zeros([BT, CVP], tl.int32)
        w = tl.where(emask[None, :], x, float("inf"))
        for j in tl.static_range(CV + 1):  # j-th smallest -> position j
            am = tl.argmin(w, 1)
            val = tl.min(w, 1)
            lo_v = tl.where(jj[None, :] == j, val[:, None], lo_v)
            lo_i = tl.where(jj[None, :] == j, am[:, None], lo_i)
            w = tl.where(e[None, :] == am[:, None], float("inf"), w)
        w = tl.where(emask[None, :], x, float("-inf"))
        for j in tl.static_range(CV + 1):  # j-th largest -> position CV - j (so hi_v[i] = sorted[n-1-CV+i])
            am = tl.argmax(w, 1)
            val = tl.max(w, 1)
            hi_v = tl.where(jj[None, :] == CV - j, val[:, None], hi_v)
            hi_i = tl.where(jj[None, :] == CV - j, am[:, None], hi_i)
            w = tl.where(e[None, :] == am[:, None], float("-inf"), w)
        rng = tl.where(jj[None, :] <= CV, hi_v - lo_v, float("inf"))
        best = tl.argmin(rng, 1)
        lo = tl.sum(tl.where(jj[None, :] == best[:, None], lo_v, 0.0), 1)
        hi = tl.sum(tl.where(jj[None, :] == best[:, None], hi_v, 0.0), 1)
        # slot j: j < best -> j-th smallest; else -> hi position j + 1
        s_i = tl.where(jj[None, :] < best[:, None], lo_i, tl.zeros_like(hi_i))
        s_v = tl.where(jj[None, :] < best[:, None], lo_v, tl.zeros_like(hi_v))
        for j in tl.static_range(CV):
            sel = (jj[None, :] == j) & (j >= best)[:, None]
            s_i = tl.where(sel, tl.sum(tl.where(jj[None, :] == j + 1, hi_i, 0), 1)[:, None], s_i)
            s_v = tl.where(sel, tl.sum(tl.where(jj[None, :] == j + 1, hi_v, 0.0), 1)[:, None], s_v)
        _store_slots(s_i, s_v, jj, VOI, VOV, VOE, row_off_o, b * soe_b + (t + t_off) * soe_t, tmask, CV, D, HP,
                     NV // D, ENDS)
    else:
        lo = tl.min(tl.where(emask[None, :], x, float("inf")), 1)
        hi = tl.max(tl.where(emask[None, :], x, float("-inf")), 1)
    zero = ((hi + lo) * 0.5).to(tl.float16)
    scale = tl.maximum((hi - lo) * 0.5, 1e-5).to(tl.float16)
    tl.store(VZ + row_off_s, zero, mask=tmask)
    tl.store(VS + row_off_s, scale, mask=tmask)
    xn = (x - zero.to(tl.float32)[:, None]) / scale.to(tl.float32)[:, None]
    xn = tl.minimum(tl.maximum(xn, -1.0), 1.0)
    code = _bucket(xn, BND, L)
    code = tl.where(emask[None, :], code, 0)
    if TOKEN:  # codes stored per head (core.codec.encode_token): [BT, HP * D] -> HP rows of D per token
        hh = tl.arange(0, HP)
        rows = VC + b * svc_b + hh[None, :] * svc_g + (t + t_off)[:, None] * svc_t
        hm = tmask[:, None] & (hh < NV // D)[None, :]
        _pack_store(tl.reshape(code, [BT * HP, D]), tl.reshape(rows, [BT * HP]), BITS, BT * HP, D, D, 0, D // 4,
                    tl.reshape(hm, [BT * HP]))
    else:
        row = VC + b * svc_b + gi * svc_g + (t + t_off) * svc_t
        _pack_store(code, row, BITS, BT, NVP, NV, 0, NV // 4, tmask)


# ------------------------------------------------------------------------------------------------------------------
# decode attention, "field" layout (v4): no interleave. The packed bytes are read as they lie and split into four
# fields, field f of column j holding channel 4 j + f (2/3-bit: 2-bit field f of low-plane byte j, plus bit f of the
# high-plane byte j // 2 shifted by 4 (j % 2); 4-bit: nibble f of the 16-bit word j). A dot product does not care
# about channel order, so the query, the per-channel key scale/zero and the RoPE frequencies are gathered in the same
# order, and P@V accumulates four [GP, D/4] tiles stored at channels 4 j + f at the end.
# RoPE: positions inside a block of BT tokens are almost always consecutive (p0 + tau): R(p0 + tau) = R(p0) R(tau),
# so the query is rotated by R(p0)^T once per block and the keys by a fixed [BT, D/8] cos/sin table of tau (no
# per-element sin/cos); a block with non-consecutive positions (padding, custom position ids) computes them per
# element.
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _planes_raw(rows, lo_off, hi_off, W: tl.constexpr, BITS: tl.constexpr, tmask, WIDE: tl.constexpr = False):
    """Packed bytes of a [BT, W] block as loaded (u8; 4-bit: u16 words), and for 3 bits the high-plane nibble of
    each low byte in the low bits of a u8. WIDE: through 32-bit loads (_planes_w)."""
    if WIDE:
        return _planes_w(rows, lo_off, hi_off, W, BITS, tmask)
    j = tl.arange(0, W)
    m = tmask[:, None]
    if BITS == 4:
        w = tl.load((rows[:, None] + lo_off + 2 * j[None, :]).to(tl.pointer_type(tl.uint16)), mask=m, other=0)
        return w, w
    else:
        lo = tl.load(rows[:, None] + lo_off + j[None, :], mask=m, other=0)
        if BITS == 3:
            hi = tl.load(rows[:, None] + hi_off + (j // 2)[None, :], mask=m, other=0).to(tl.int32)
            hi = (hi >> (4 * (j % 2))[None, :]).to(tl.uint8)
        else:
            hi = lo
        return lo, hi


@triton.jit
def _planes(rows, lo_off, hi_off, W: tl.constexpr, BITS: tl.constexpr, tmask, WIDE: tl.constexpr = False):
    """_planes_raw as int32 (the gather path's code arithmetic)."""
    lo, hi = _planes_raw(rows, lo_off, hi_off, W, BITS, tmask, WIDE)
    return lo.to(tl.int32), hi.to(tl.int32)


@triton.jit
def _field_codes(lo, hi, f: tl.constexpr, BITS: tl.constexpr):
    if BITS == 4:
        return (lo >> (4 * f)) & 15
    else:
        c = (lo >> (2 * f)) & 3
        if BITS == 3:
            if f <= 2:
                c = c | ((hi << (2 - f)) & 4)
            else:
                c = c | ((hi >> 1) & 4)
        return c


@triton.jit
def _key_field(lo1, hi1, lo2, hi2, f: tl.constexpr, BITS: tl.constexpr, KDL, KSC, KZR, KOI, KOV, h, ko_row, tmask,
               C, S, qa1, qa2, D: tl.constexpr, W: tl.constexpr, CK: tl.constexpr, F32: tl.constexpr):
    """scores [GP, BT] of field f (channels 4 j + f of both halves), keys rotated by C/S (cos/sin of tau)."""
    HALF: tl.constexpr = D // 2
    ch = 4 * tl.arange(0, W) + f
    k1 = tl.load(KDL + _field_codes(lo1, hi1, f, BITS)) * tl.load(KSC + h * D + ch)[None, :] + \
        tl.load(KZR + h * D + ch)[None, :]
    k2 = tl.load(KDL + _field_codes(lo2, hi2, f, BITS)) * tl.load(KSC + h * D + HALF + ch)[None, :] + \
        tl.load(KZR + h * D + HALF + ch)[None, :]
    for j in tl.static_range(CK):
        oi = tl.load(KOI + ko_row + j, mask=tmask, other=0).to(tl.int32)
        ov = tl.load(KOV + ko_row + j, mask=tmask, other=0.0).to(tl.float32)
        k1 = tl.where(oi[:, None] == ch[None, :], ov[:, None], k1)
        k2 = tl.where(oi[:, None] == (ch + HALF)[None, :], ov[:, None], k2)
    r1 = k1 * C - k2 * S
    r2 = k2 * C + k1 * S
    return _mm(qa1, tl.trans(r1.to(tl.float16)), F32) + _mm(qa2, tl.trans(r2.to(tl.float16)), F32)


@triton.jit
def _value_field(acc, p16, lo, hi, f: tl.constexpr, BITS: tl.constexpr, VLEV, vsc, vz, VOI, VOV, vo_row, v_idx_off,
                 tmask, W: tl.constexpr, CV: tl.constexpr, F32: tl.constexpr):
    ch = 4 * tl.arange(0, W) + f
    v = tl.load(VLEV + _field_codes(lo, hi, f, BITS)) * vsc[:, None] + vz[:, None]
    for j in tl.static_range(CV):
        oi = tl.load(VOI + vo_row + j, mask=tmask, other=0).to(tl.int32) - v_idx_off
        ov = tl.load(VOV + vo_row + j, mask=tmask, other=0.0).to(tl.float32)
        v = tl.where(oi[:, None] == ch[None, :], ov[:, None], v)
    v = tl.where(tmask[:, None], v, 0.0)
    return acc + _mm(p16, v.to(tl.float16), F32)


# ------------------------------------------------------------------------------------------------------------------
# Register lookup table (LUTX): the 2^bits fp16 levels live in 2-8 32-bit words (low bytes and high bytes of the
# entries), and PRMT (byte permute) looks up four codes per instruction: one inline-PTX call turns 4 packed bytes
# (16 codes) into the four fields' fp16 values, with no memory gather. Words (host: kernels._lut_words):
# [lo(0-3), lo(4-7), hi(0-3), hi(4-7), lo(8-11), lo(12-15), hi(8-11), hi(12-15)].
# Operands with pack=4: $0-$7 the four fp16 outputs (2 registers each), then the packed input(s) ($8; $8-$9 for the
# 4-bit u16 words or 2/3-bit low + high planes), then the words (each a broadcast scalar: 4 registers, first used).
# ------------------------------------------------------------------------------------------------------------------
def _asm_lut23(bits: int) -> str:
    w = (10, 14, 18, 22)  # lo(0-3), lo(4-7), hi(0-3), hi(4-7)
    out = ["{", ".reg .b32 c, s, l, h;"]
    for f in range(4):
        out.append(f"shr.b32 c, $8, {2 * f};")
        out.append("and.b32 c, c, 0x03030303;")
        if bits == 3:  # high bit of field f: bit f of the high-plane nibble -> bit 2 of each byte
            out.append(f"shl.b32 s, $9, {2 - f};" if f < 3 else "shr.b32 s, $9, 1;")
            out.append("and.b32 s, s, 0x04040404;")
            out.append("or.b32 c, c, s;")
        out.append("shr.b32 s, c, 12;")  # byte codes (b0, b1, b2, b3) -> selector nibbles (b0, b2, b1, b3)
        out.append("or.b32 s, s, c;")
        out.append(f"prmt.b32 l, ${w[0]}, ${w[1]}, s;")
        out.append(f"prmt.b32 h, ${w[2]}, ${w[3]}, s;")
        out.append(f"prmt.b32 ${2 * f}, l, h, 0x6240;")  # (lo b0, hi b0, lo b1, hi b1)
        out.append(f"prmt.b32 ${2 * f + 1}, l, h, 0x7351;")
    out.append("}")
    return " ".join(out)


def _asm_lut4() -> str:
    w = (10, 14, 18, 22, 26, 30, 34, 38)
    out = ["{", ".reg .b32 a, b, s, t, i, m, la, lb, ha, hb, k;", "mov.b32 k, 0x00008000;"]
    for f in range(4):
        out += [f"shr.b32 a, $8, {4 * f};", "and.b32 a, a, 0x000F000F;",  # e0 @ 0, e1 @ 16
                f"shr.b32 b, $9, {4 * f};", "and.b32 b, b, 0x000F000F;",  # e2 @ 0, e3 @ 16
                "shr.b32 s, a, 12;", "or.b32 s, s, a;", "shl.b32 t, b, 8;", "or.b32 s, s, t;",
                "shr.b32 t, b, 4;", "or.b32 s, s, t;",  # nibbles (e0, e1, e2, e3)
                "and.b32 i, s, 0x7777;",
                "and.b32 m, s, 0x8888;", "shr.b32 t, m, 3;", "or.b32 m, m, t;",
                "prmt.b32 m, k, k, m;",  # 0xFF per byte whose code has bit 3 (sign-replicate of byte 1 = 0x80)
                f"prmt.b32 la, ${w[0]}, ${w[1]}, i;", f"prmt.b32 lb, ${w[4]}, ${w[5]}, i;",
                f"prmt.b32 ha, ${w[2]}, ${w[3]}, i;", f"prmt.b32 hb, ${w[6]}, ${w[7]}, i;",
                "xor.b32 t, la, lb;", "and.b32 t, t, m;", "xor.b32 la, la, t;",
                "xor.b32 t, ha, hb;", "and.b32 t, t, m;", "xor.b32 ha, ha, t;",
                f"prmt.b32 ${2 * f}, la, ha, 0x5140;", f"prmt.b32 ${2 * f + 1}, la, ha, 0x7362;"]
    out.append("}")
    return " ".join(out)


_ASM_LUT2 = tl.constexpr(_asm_lut23(2))
_ASM_LUT3 = tl.constexpr(_asm_lut23(3))
_ASM_LUT4 = tl.constexpr(_asm_lut4())
_CONS_LUT23 = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 18))
_CONS_LUT4 = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 34))


@triton.jit
def _lut_fields(lo, hi, WP, LEVH, BITS: tl.constexpr, INTERP: tl.constexpr):
    """fp16 levels of the four fields of packed bytes (lo, hi from _planes_raw) -> four [BT, W] fp16 tiles.
    INTERP (no inline PTX): gathers from the fp16 level table LEVH instead of the register words WP."""
    if INTERP:
        lo32 = lo.to(tl.int32)
        hi32 = hi.to(tl.int32)
        return (tl.load(LEVH + _field_codes(lo32, hi32, 0, BITS)), tl.load(LEVH + _field_codes(lo32, hi32, 1, BITS)),
                tl.load(LEVH + _field_codes(lo32, hi32, 2, BITS)), tl.load(LEVH + _field_codes(lo32, hi32, 3, BITS)))
    else:
        w0 = tl.load(WP + 0)
        w1 = tl.load(WP + 1)
        w2 = tl.load(WP + 2)
        w3 = tl.load(WP + 3)
        if BITS == 4:
            w4 = tl.load(WP + 4)
            w5 = tl.load(WP + 5)
            w6 = tl.load(WP + 6)
            w7 = tl.load(WP + 7)
            return tl.inline_asm_elementwise(_ASM_LUT4, _CONS_LUT4, [lo, w0, w1, w2, w3, w4, w5, w6, w7],
                                             dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True,
                                             pack=4)
        elif BITS == 3:
            return tl.inline_asm_elementwise(_ASM_LUT3, _CONS_LUT23, [lo, hi, w0, w1, w2, w3],
                                             dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True,
                                             pack=4)
        else:
            return tl.inline_asm_elementwise(_ASM_LUT2, _CONS_LUT23, [lo, hi, w0, w1, w2, w3],
                                             dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True,
                                             pack=4)


@triton.jit
def _fields_h(ptr):
    """The four fields' per-channel values (channels 4 j + f at ptr + 4 j + f, f = 0..3) as fp16."""
    return (tl.load(ptr + 0).to(tl.float16), tl.load(ptr + 1).to(tl.float16), tl.load(ptr + 2).to(tl.float16),
            tl.load(ptr + 3).to(tl.float16))


@triton.jit
def _slot(OI, OV, row, j: tl.constexpr, C: tl.constexpr, idx_off, tmask):
    """Outlier slot j of a block's rows: (index - idx_off as int32, fp16 value); a zero dummy when j >= C."""
    if j < C:
        return (tl.load(OI + row + j, mask=tmask, other=0).to(tl.int32) - idx_off,
                tl.load(OV + row + j, mask=tmask, other=0.0).to(tl.float16))
    else:
        return tl.zeros_like(row).to(tl.int32), tl.zeros_like(row).to(tl.float16)


@triton.jit
def _slots(OI, OV, row, C: tl.constexpr, idx_off, tmask):
    """The (<= 4) outlier slots of a block's rows, loaded once per block: a flat tuple (i0, v0, ..., i3, v3)."""
    i0, v0 = _slot(OI, OV, row, 0, C, idx_off, tmask)
    i1, v1 = _slot(OI, OV, row, 1, C, idx_off, tmask)
    i2, v2 = _slot(OI, OV, row, 2, C, idx_off, tmask)
    i3, v3 = _slot(OI, OV, row, 3, C, idx_off, tmask)
    return i0, v0, i1, v1, i2, v2, i3, v3


@triton.jit
def _overwrite(x, ch, sl, C: tl.constexpr):
    """x [BT, W] with the element at channel sl.i_j[t] (ch: the tile's channels [W]) set to sl.v_j[t], j < C."""
    if C > 0:
        x = tl.where(sl[0][:, None] == ch[None, :], sl[1][:, None], x)
    if C > 1:
        x = tl.where(sl[2][:, None] == ch[None, :], sl[3][:, None], x)
    if C > 2:
        x = tl.where(sl[4][:, None] == ch[None, :], sl[5][:, None], x)
    if C > 3:
        x = tl.where(sl[6][:, None] == ch[None, :], sl[7][:, None], x)
    return x


@triton.jit
def _run_bounds(OE, erow, h, tmask):
    """KV head h's run [lo, hi) of outlier slots in token-group value rows (core.codec.head_ends), per token [BT]."""
    lo = tl.load(OE + erow + tl.maximum(h - 1, 0), mask=tmask, other=0).to(tl.int32) * (h > 0).to(tl.int32)
    hi = tl.load(OE + erow + h, mask=tmask, other=0).to(tl.int32)
    return lo, hi


@triton.jit
def _overwrite_run(x, ch, OI, OV, lo, hi, row, idx_off):
    """x [BT, N] with KV head h's outlier slots set, for token-group value rows (one row holds every KV head's slots,
    sorted by element; head h's run is columns [lo, hi) = [OE[h - 1], OE[h]), _run_bounds): one overwrite pass per
    rank, up to the block's largest run (on average C / H slots per token)."""
    for r in range(0, tl.max(hi - lo, 0)):
        c = lo + r
        has = c < hi
        i = tl.load(OI + row + c, mask=has, other=0).to(tl.int32) - idx_off
        val = tl.load(OV + row + c, mask=has, other=0.0).to(x.dtype)
        x = tl.where((tl.where(has, i, -1))[:, None] == ch[None, :], val[:, None], x)
    return x


# PTX prefetch of the line at operand $1 where $2 != 0, into L1 or L2 (no register result: $0 is a dummy); shared
# with the Gluon pairs kernel (_gluon._prefetch: a Gluon kernel cannot call a triton.jit helper)
PREFETCH_L1 = tl.constexpr("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L1 [$1]; mov.b32 $0, 0; }")
PREFETCH_L2 = tl.constexpr("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }")


@triton.jit
def _prefetch(ptr, mask, PF: tl.constexpr):
    """Ask for the lines holding ptr (where mask) in L1 (PF 1) or L2 (PF 2), with no register result (PTX prefetch)."""
    if PF == 1:
        tl.inline_asm_elementwise(PREFETCH_L1, "=r,l,r", [ptr.to(tl.int64, bitcast=True), mask.to(tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)
    elif PF == 2:
        tl.inline_asm_elementwise(PREFETCH_L2, "=r,l,r", [ptr.to(tl.int64, bitcast=True), mask.to(tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_next(PF: tl.constexpr, tn, q_hi, QPOS, qpos_row, kc_base, skc_t, vc_base, svc_t, VZ, VS, vs_base, svs_t,
                   KOI, KOV, ko_base, sko_t, VOI, VOV, vo_base, svo_t, VOE, oe_base, soe_t,
                   CK: tl.constexpr, CV: tl.constexpr, F32: tl.constexpr):
    """Prefetch (PF 1: L1, 2: L2; nothing under the interpreter) the rows of the block at tokens tn [BT] that the
    decode kernels read: positions, key and value codes, value zero/scale, slots and run ends (a row's first byte;
    the rows of a block are contiguous, so every line of it holds a row start except possibly the last). The block
    is then on its way while the current one computes."""
    if PF > 0 and not F32:
        m = tn < q_hi
        _prefetch(QPOS + qpos_row + tn, m, PF)
        _prefetch(kc_base + tn * skc_t, m, PF)
        _prefetch(vc_base + tn * svc_t, m, PF)
        _prefetch(VZ + vs_base + tn * svs_t, m, PF)
        _prefetch(VS + vs_base + tn * svs_t, m, PF)
        if CK > 0:
            _prefetch(KOI + ko_base + tn * sko_t, m, PF)
            _prefetch(KOV + ko_base + tn * sko_t, m, PF)
        if CV > 0:
            _prefetch(VOI + vo_base + tn * svo_t, m, PF)
            _prefetch(VOV + vo_base + tn * svo_t, m, PF)
        if CV > 4:
            _prefetch(VOE + oe_base + tn * soe_t, m, PF)


@triton.jit
def _key_field_x(l1, l2, f: tl.constexpr, s1, z1, s2, z2, sl, C, S, qa1, qa2,
                 D: tl.constexpr, W: tl.constexpr, CK: tl.constexpr, F32: tl.constexpr):
    """LUTX scores [GP, BT] of field f: levels l1/l2 (fp16) -> per-channel affine, slot overwrite (slots sl
    preloaded by _slots), RoPE, all in fp16."""
    HALF: tl.constexpr = D // 2
    ch = 4 * tl.arange(0, W) + f
    k1 = _overwrite(l1 * s1[None, :] + z1[None, :], ch, sl, CK)
    k2 = _overwrite(l2 * s2[None, :] + z2[None, :], ch + HALF, sl, CK)
    r1 = k1 * C - k2 * S
    r2 = k2 * C + k1 * S
    return _mm(qa1, tl.trans(r1), F32) + _mm(qa2, tl.trans(r2), F32)


@triton.jit
def _value_field_x(acc, p16, lv, f: tl.constexpr, vsc, vz, sl, W: tl.constexpr, CV: tl.constexpr,
                   F32: tl.constexpr):
    """LUTX P@V of field f: levels lv (fp16) -> per-token affine (fp16 vsc/vz; masked tokens load scale 0 and zero 0,
    so their values are 0 and p = 0), slot overwrite."""
    v = _overwrite(lv * vsc[:, None] + vz[:, None], 4 * tl.arange(0, W) + f, sl, CV)
    return acc + _mm(p16, v, F32)


@triton.jit
def _rot_q(q1, q2, om, p0, F32: tl.constexpr):
    """R(p0)^T applied to the query pair tiles [GP, W] (om: the field's inverse frequencies [W]) -> fp16."""
    c0, s0 = _cos_sin(p0 * om, F32)
    c0 = c0[None, :]
    s0 = s0[None, :]
    return (q1 * c0 + q2 * s0).to(tl.float16), (q2 * c0 - q1 * s0).to(tl.float16)


@triton.jit
def _tau_cs(rel, om, F32: tl.constexpr):
    return _cos_sin(rel[:, None] * om[None, :], F32)


@triton.jit
def _block_start(pos, taui, tmask):
    """(p0, contig) of a block: p0 = min(pos - tau) over its valid tokens (the angle of the per-block query rotation)
    and whether every valid token sits at p0 + tau (then the fixed tau cos/sin table applies)."""
    d = pos - taui
    p0 = tl.min(tl.where(tmask, d, 2147483647), 0)
    return p0, p0 == tl.max(tl.where(tmask, d, -2147483647), 0)


@triton.jit
def _fetch_keys(t0, q_hi, taui, QPOS, qpos_row, kc_base, skc_t, k_half, D: tl.constexpr, NKC: tl.constexpr,
                BITS: tl.constexpr, LUTX: tl.constexpr, WIDE: tl.constexpr = False):
    """Positions and packed key bytes of one block of the fields kernel."""
    t = t0 + taui
    tmask = t < q_hi
    pos = tl.load(QPOS + qpos_row + t, mask=tmask, other=0)
    krow = kc_base + t * skc_t
    if LUTX:
        lo1, hi1 = _planes_raw(krow, 0, D // 4, NKC, BITS, tmask, WIDE)
        lo2, hi2 = _planes_raw(krow, k_half, D // 4 + D // 16, NKC, BITS, tmask, WIDE)
    else:
        lo1, hi1 = _planes(krow, 0, D // 4, NKC, BITS, tmask, WIDE)
        lo2, hi2 = _planes(krow, k_half, D // 4 + D // 16, NKC, BITS, tmask, WIDE)
    return pos, lo1, hi1, lo2, hi2


@triton.jit
def _fetch_values(t0, q_hi, taui, vc_base, svc_t, VZ, VS, vs_base, svs_t, NVC: tl.constexpr,
                  BITS: tl.constexpr, LUTX: tl.constexpr, WIDE: tl.constexpr = False):
    """Packed value bytes (a head's code rows: low plane at byte 0, high plane at NVC = D / 4) and per-token
    zero/scale of one block of the fields kernel (LUTX: fp16 as stored)."""
    t = t0 + taui
    tmask = t < q_hi
    if LUTX:
        vlo, vhi = _planes_raw(vc_base + t * svc_t, 0, NVC, NVC, BITS, tmask, WIDE)
        vz = tl.load(VZ + vs_base + t * svs_t, mask=tmask, other=0.0).to(tl.float16)
        vsc = tl.load(VS + vs_base + t * svs_t, mask=tmask, other=0.0).to(tl.float16)
    else:
        vlo, vhi = _planes(vc_base + t * svc_t, 0, NVC, NVC, BITS, tmask, WIDE)
        vz = tl.load(VZ + vs_base + t * svs_t, mask=tmask, other=0.0).to(tl.float32)
        vsc = tl.load(VS + vs_base + t * svs_t, mask=tmask, other=0.0).to(tl.float32)
    return vlo, vhi, vz, vsc


@triton.jit(do_not_specialize=_DECODE_DYNAMIC + ("split0",))
def _kvq_decode_fields_kernel(
    Q, PACC, PM, PL,
    KC, KOI, KOV, VC, VZ, VS, VOI, VOV, QPOS,
    KLUT, VLEV, INVF, KDL, KSC, KZR, VLEVH,
    SK, SV, WK, WV, MASK,
    qk_scale, rope_scale,
    sqb, sqh,
    skc_b, skc_h, skc_t, sko_b, sko_h, sko_t,
    svc_b, svc_g, svc_t, svs_b, svs_g, svs_t, svo_b, svo_g, svo_t,
    sqp_b,
    ssk_b, ssk_h, ssk_t, ssv_b, ssv_h, ssv_t,
    swk_b, swk_h, swk_t, swv_b, swv_h, swv_t,
    smask_b,
    n_s, n_q, n_w, chunk, NSPLIT_Q,
    H_KV: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr,
    BITS: tl.constexpr, D: tl.constexpr, CK: tl.constexpr, CV: tl.constexpr,
    V_TOKEN: tl.constexpr, BT: tl.constexpr, HAS_MASK: tl.constexpr, USE_DOT: tl.constexpr,
    F32: tl.constexpr, K_AFFINE: tl.constexpr, GR: tl.constexpr, VCORR: tl.constexpr, VA: tl.constexpr,
    PREFETCH: tl.constexpr = False, LUTX: tl.constexpr = False, KW=None, VW=None, KDLH=None,
    NATURAL: tl.constexpr = False, RELOAD: tl.constexpr = False, TAU=None, WIDE: tl.constexpr = False,
    LENS=None, DEVLEN: tl.constexpr = False, VOE=None, soe_b=0, soe_t=0, PF: tl.constexpr = 0, split0=0,
):
    """The fields kernel, and with NATURAL the natural kernel (LUTX levels; its own RELOAD / TAU / WIDE options; value
    rows with more than 4 slots, i.e. token-group values, through their per-head runs VOE, _overwrite_run):
    same launch contract, same partials. ``split0``: the split of the grid's first column (the pairs kernel's
    launch runs only the sinks/window split here: split0 = NSPLIT_Q, one column)."""
    HALF: tl.constexpr = D // 2
    NKC: tl.constexpr = D // 8  # columns per key half and field
    NVC: tl.constexpr = D // 4  # columns per value field
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1) + split0
    b = (pid_bh // H_KV).to(tl.int64)  # 64-bit base offsets: caches of > 2^31 bytes
    h = (pid_bh % H_KV).to(tl.int64)
    nsplit = NSPLIT_Q + 1
    if DEVLEN:
        n_q, chunk = _device_lengths(LENS, NSPLIT_Q, BT)
    g = tl.arange(0, GP)
    gmask = g < GROUP
    row = (b * H_KV * GROUP + h * GROUP + g) * nsplit + pid_s
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    mask_row = MASK + b * smask_b
    if pid_s < NSPLIT_Q:
        # where this program's quantized tokens [q_lo, q_hi) and KV head h lie
        kc_base = KC + b * skc_b + h * skc_h
        ko_base = b * sko_b + h * sko_h
        vc_base, vs_base, vo_base, v_idx_off = _value_bases(
            VC, b, h, svc_b, svc_g, svs_b, svs_g, svo_b, svo_g, D, V_TOKEN)
        if BITS == 4:
            k_half = D // 4
        else:
            k_half = D // 8
        q_lo = pid_s * chunk
        q_hi = tl.minimum(q_lo + chunk, n_q)
        if NATURAL:  # the natural-order path (see the section comment above _nat)
            ch = tl.arange(0, HALF)
            chd = tl.arange(0, D)
            qrow = Q + b * sqb + (h * GROUP + g)[:, None] * sqh
            gm = gmask[:, None]
            taui = tl.arange(0, BT)
            kso = KSC + h * D + ch
            kzo = KZR + h * D + ch
            if not RELOAD:  # loop invariants held in registers for the whole program
                q1, q2, om, C0, S0, ks1, kz1, ks2, kz2 = _nat_consts(qrow, gm, rope_scale, INVF, kso, kzo, TAU, ch,
                                                                     taui, HALF, BT, F32, RELOAD)
            acc = tl.zeros([GP, D], tl.float32)
            for t0 in range(q_lo, q_hi, BT):
                t = t0 + taui
                tmask = t < q_hi
                pos, lo1, hi1, lo2, hi2 = _fetch_keys(t0, q_hi, taui, QPOS, b * sqp_b, kc_base, skc_t, k_half, D,
                                                      NKC, BITS, True, WIDE)
                vlo, vhi, vz, vsc = _fetch_values(t0, q_hi, taui, vc_base, svc_t, VZ, VS,
                                                  vs_base, svs_t, NVC, BITS, True, WIDE)
                ksl = _slots(KOI, KOV, ko_base + t * sko_t, CK, 0, tmask)
                if CV <= 4:
                    vsl = _slots(VOI, VOV, vo_base + t * svo_t, CV, v_idx_off, tmask)
                _prefetch_next(PF, t + BT, q_hi, QPOS, b * sqp_b, kc_base, skc_t, vc_base, svc_t, VZ, VS, vs_base,
                               svs_t, KOI, KOV, ko_base, sko_t, VOI, VOV, vo_base, svo_t, VOE, b * soe_b, soe_t, CK, CV,
                               F32)
                if RELOAD:  # loop invariants re-read from L1 every block: fewer registers, more resident warps
                    q1, q2, om, C0, S0, ks1, kz1, ks2, kz2 = _nat_consts(qrow, gm, rope_scale, INVF, kso, kzo, TAU,
                                                                         ch, taui, HALF, BT, F32, RELOAD)
                p0, contig = _block_start(pos, taui, tmask)
                if contig:
                    c, s_ = C0, S0
                else:
                    c, s_ = _tau_cs((pos - p0).to(tl.float32), om, F32)
                    c = c.to(tl.float16)
                    s_ = s_.to(tl.float16)
                l10, l11, l12, l13 = _lut_fields(lo1, hi1, KW, KDLH, BITS, F32)
                k1 = _overwrite(_nat(l10, l11, l12, l13) * ks1 + kz1, ch, ksl, CK)
                l20, l21, l22, l23 = _lut_fields(lo2, hi2, KW, KDLH, BITS, F32)
                k2 = _overwrite(_nat(l20, l21, l22, l23) * ks2 + kz2, ch + HALF, ksl, CK)
                r1 = k1 * c - k2 * s_
                r2 = k2 * c + k1 * s_
                a1, a2 = _rot_q(q1, q2, om, p0.to(tl.float32), F32)
                s = _mm(a1, tl.trans(r1), F32) + _mm(a2, tl.trans(r2), F32)
                p, m_i, l_i, alpha = _softmax_update(s, m_i, l_i, qk_scale, mask_row, n_s, t, tmask, HAS_MASK)
                lv0, lv1, lv2, lv3 = _lut_fields(vlo, vhi, VW, VLEVH, BITS, F32)
                v = _nat(lv0, lv1, lv2, lv3) * vsc[:, None] + vz[:, None]
                if CV <= 4:
                    v = _overwrite(v, chd, vsl, CV)
                else:
                    rlo, rhi = _run_bounds(VOE, b * soe_b + t * soe_t, h, tmask)
                    v = _overwrite_run(v, chd, VOI, VOV, rlo, rhi, vo_base + t * svo_t, v_idx_off)
                acc = acc * alpha[:, None] + _mm(p.to(tl.float16), v, F32)
            tl.store(PACC + row[:, None] * D + chd[None, :], acc, mask=gmask[:, None])
        else:
            jk = tl.arange(0, NKC)
            jv = tl.arange(0, NVC)
            qrow = Q + b * sqb + (h * GROUP + g)[:, None] * sqh
            gm = gmask[:, None]
            # query (RoPE attention_scaling folded in), per field f: channels 4 j + f of each half
            q10 = tl.load(qrow + (4 * jk + 0)[None, :], mask=gm, other=0.0).to(tl.float32) * rope_scale
            q11 = tl.load(qrow + (4 * jk + 1)[None, :], mask=gm, other=0.0).to(tl.float32) * rope_scale
            q12 = tl.load(qrow + (4 * jk + 2)[None, :], mask=gm, other=0.0).to(tl.float32) * rope_scale
            q13 = tl.load(qrow + (4 * jk + 3)[None, :], mask=gm, other=0.0).to(tl.float32) * rope_scale
            q20 = tl.load(qrow + HALF + (4 * jk + 0)[None, :], mask=gm, other=0.0).to(tl.float32) * rope_scale
            q21 = tl.load(qrow + HALF + (4 * jk + 1)[None, :], mask=gm, other=0.0).to(tl.float32) * rope_scale
            q22 = tl.load(qrow + HALF + (4 * jk + 2)[None, :], mask=gm, other=0.0).to(tl.float32) * rope_scale
            q23 = tl.load(qrow + HALF + (4 * jk + 3)[None, :], mask=gm, other=0.0).to(tl.float32) * rope_scale
            om0 = tl.load(INVF + 4 * jk + 0)
            om1 = tl.load(INVF + 4 * jk + 1)
            om2 = tl.load(INVF + 4 * jk + 2)
            om3 = tl.load(INVF + 4 * jk + 3)
            tau = tl.arange(0, BT).to(tl.float32)
            C0, S0 = _tau_cs(tau, om0, F32)
            C1, S1 = _tau_cs(tau, om1, F32)
            C2, S2 = _tau_cs(tau, om2, F32)
            C3, S3 = _tau_cs(tau, om3, F32)
            if LUTX:  # fp16 RoPE tables and per-channel key scale/zero, held for the whole program
                C0, S0, C1, S1 = C0.to(tl.float16), S0.to(tl.float16), C1.to(tl.float16), S1.to(tl.float16)
                C2, S2, C3, S3 = C2.to(tl.float16), S2.to(tl.float16), C3.to(tl.float16), S3.to(tl.float16)
                kso = KSC + h * D + 4 * jk
                kzo = KZR + h * D + 4 * jk
                ks10, ks11, ks12, ks13 = _fields_h(kso)
                ks20, ks21, ks22, ks23 = _fields_h(kso + HALF)
                kz10, kz11, kz12, kz13 = _fields_h(kzo)
                kz20, kz21, kz22, kz23 = _fields_h(kzo + HALF)
            acc0 = tl.zeros([GP, NVC], tl.float32)
            acc1 = tl.zeros([GP, NVC], tl.float32)
            acc2 = tl.zeros([GP, NVC], tl.float32)
            acc3 = tl.zeros([GP, NVC], tl.float32)
            taui = tl.arange(0, BT)
            if PREFETCH:  # software double buffering: block i + 1's loads are in flight while block i computes
                pos, lo1, hi1, lo2, hi2 = _fetch_keys(q_lo, q_hi, taui, QPOS, b * sqp_b, kc_base, skc_t, k_half, D, NKC,
                                                      BITS, LUTX)
                vlo, vhi, vz, vsc = _fetch_values(q_lo, q_hi, taui, vc_base, svc_t, VZ, VS, vs_base,
                                                  svs_t, NVC, BITS, LUTX)
            for t0 in range(q_lo, q_hi, BT):
                t = t0 + taui
                tmask = t < q_hi
                if PREFETCH:
                    c_pos, c_lo1, c_hi1, c_lo2, c_hi2 = pos, lo1, hi1, lo2, hi2
                    c_vlo, c_vhi, c_vz, c_vsc = vlo, vhi, vz, vsc
                    pos, lo1, hi1, lo2, hi2 = _fetch_keys(t0 + BT, q_hi, taui, QPOS, b * sqp_b, kc_base, skc_t, k_half,
                                                          D, NKC, BITS, LUTX)
                    vlo, vhi, vz, vsc = _fetch_values(t0 + BT, q_hi, taui, vc_base, svc_t, VZ, VS,
                                                      vs_base, svs_t, NVC, BITS, LUTX)
                else:
                    c_pos, c_lo1, c_hi1, c_lo2, c_hi2 = _fetch_keys(t0, q_hi, taui, QPOS, b * sqp_b, kc_base, skc_t,
                                                                    k_half, D, NKC, BITS, LUTX)
                _prefetch_next(PF, t + BT, q_hi, QPOS, b * sqp_b, kc_base, skc_t, vc_base, svc_t, VZ, VS, vs_base,
                               svs_t, KOI, KOV, ko_base, sko_t, VOI, VOV, vo_base, svo_t, VZ, 0, 0, CK, CV, F32)
                p0, contig = _block_start(c_pos, taui, tmask)
                p0f = p0.to(tl.float32)
                if contig:
                    c0, s0, c1, s1, c2, s2, c3, s3 = C0, S0, C1, S1, C2, S2, C3, S3
                else:
                    rel = (c_pos - p0).to(tl.float32)
                    c0, s0 = _tau_cs(rel, om0, F32)
                    c1, s1 = _tau_cs(rel, om1, F32)
                    c2, s2 = _tau_cs(rel, om2, F32)
                    c3, s3 = _tau_cs(rel, om3, F32)
                    if LUTX:
                        c0, s0, c1, s1 = c0.to(tl.float16), s0.to(tl.float16), c1.to(tl.float16), s1.to(tl.float16)
                        c2, s2, c3, s3 = c2.to(tl.float16), s2.to(tl.float16), c3.to(tl.float16), s3.to(tl.float16)
                ko_row = ko_base + t * sko_t
                if LUTX:
                    l10, l11, l12, l13 = _lut_fields(c_lo1, c_hi1, KW, KDLH, BITS, F32)
                    l20, l21, l22, l23 = _lut_fields(c_lo2, c_hi2, KW, KDLH, BITS, F32)
                    ksl = _slots(KOI, KOV, ko_row, CK, 0, tmask)
                    a1, a2 = _rot_q(q10, q20, om0, p0f, F32)
                    s = _key_field_x(l10, l20, 0, ks10, kz10, ks20, kz20, ksl, c0, s0, a1, a2,
                                     D, NKC, CK, F32)
                    a1, a2 = _rot_q(q11, q21, om1, p0f, F32)
                    s += _key_field_x(l11, l21, 1, ks11, kz11, ks21, kz21, ksl, c1, s1, a1, a2,
                                      D, NKC, CK, F32)
                    a1, a2 = _rot_q(q12, q22, om2, p0f, F32)
                    s += _key_field_x(l12, l22, 2, ks12, kz12, ks22, kz22, ksl, c2, s2, a1, a2,
                                      D, NKC, CK, F32)
                    a1, a2 = _rot_q(q13, q23, om3, p0f, F32)
                    s += _key_field_x(l13, l23, 3, ks13, kz13, ks23, kz23, ksl, c3, s3, a1, a2,
                                      D, NKC, CK, F32)
                else:
                    a1, a2 = _rot_q(q10, q20, om0, p0f, F32)
                    s = _key_field(c_lo1, c_hi1, c_lo2, c_hi2, 0, BITS, KDL, KSC, KZR, KOI, KOV, h, ko_row, tmask,
                                   c0, s0, a1, a2, D, NKC, CK, F32)
                    a1, a2 = _rot_q(q11, q21, om1, p0f, F32)
                    s += _key_field(c_lo1, c_hi1, c_lo2, c_hi2, 1, BITS, KDL, KSC, KZR, KOI, KOV, h, ko_row, tmask,
                                    c1, s1, a1, a2, D, NKC, CK, F32)
                    a1, a2 = _rot_q(q12, q22, om2, p0f, F32)
                    s += _key_field(c_lo1, c_hi1, c_lo2, c_hi2, 2, BITS, KDL, KSC, KZR, KOI, KOV, h, ko_row, tmask,
                                    c2, s2, a1, a2, D, NKC, CK, F32)
                    a1, a2 = _rot_q(q13, q23, om3, p0f, F32)
                    s += _key_field(c_lo1, c_hi1, c_lo2, c_hi2, 3, BITS, KDL, KSC, KZR, KOI, KOV, h, ko_row, tmask,
                                    c3, s3, a1, a2, D, NKC, CK, F32)
                p, m_i, l_i, alpha = _softmax_update(s, m_i, l_i, qk_scale, mask_row, n_s, t, tmask, HAS_MASK)
                p16 = p.to(tl.float16)
                if not PREFETCH:
                    c_vlo, c_vhi, c_vz, c_vsc = _fetch_values(t0, q_hi, taui, vc_base, svc_t, VZ,
                                                              VS, vs_base, svs_t, NVC, BITS, LUTX)
                vo_row = vo_base + t * svo_t
                if LUTX:
                    lv0, lv1, lv2, lv3 = _lut_fields(c_vlo, c_vhi, VW, VLEVH, BITS, F32)
                    vsl = _slots(VOI, VOV, vo_row, CV, v_idx_off, tmask)
                    acc0 = _value_field_x(acc0 * alpha[:, None], p16, lv0, 0, c_vsc, c_vz, vsl, NVC,
                                          CV, F32)
                    acc1 = _value_field_x(acc1 * alpha[:, None], p16, lv1, 1, c_vsc, c_vz, vsl, NVC,
                                          CV, F32)
                    acc2 = _value_field_x(acc2 * alpha[:, None], p16, lv2, 2, c_vsc, c_vz, vsl, NVC,
                                          CV, F32)
                    acc3 = _value_field_x(acc3 * alpha[:, None], p16, lv3, 3, c_vsc, c_vz, vsl, NVC,
                                          CV, F32)
                else:
                    acc0 = _value_field(acc0 * alpha[:, None], p16, c_vlo, c_vhi, 0, BITS, VLEV, c_vsc, c_vz, VOI, VOV,
                                        vo_row, v_idx_off, tmask, NVC, CV, F32)
                    acc1 = _value_field(acc1 * alpha[:, None], p16, c_vlo, c_vhi, 1, BITS, VLEV, c_vsc, c_vz, VOI, VOV,
                                        vo_row, v_idx_off, tmask, NVC, CV, F32)
                    acc2 = _value_field(acc2 * alpha[:, None], p16, c_vlo, c_vhi, 2, BITS, VLEV, c_vsc, c_vz, VOI, VOV,
                                        vo_row, v_idx_off, tmask, NVC, CV, F32)
                    acc3 = _value_field(acc3 * alpha[:, None], p16, c_vlo, c_vhi, 3, BITS, VLEV, c_vsc, c_vz, VOI, VOV,
                                        vo_row, v_idx_off, tmask, NVC, CV, F32)
            out = PACC + row[:, None] * D + 4 * jv[None, :]
            tl.store(out + 0, acc0, mask=gmask[:, None])
            tl.store(out + 1, acc1, mask=gmask[:, None])
            tl.store(out + 2, acc2, mask=gmask[:, None])
            tl.store(out + 3, acc3, mask=gmask[:, None])
    else:
        # fp16 sinks and recent window (the last split), natural channel order
        ch = tl.arange(0, HALF)
        chd = tl.arange(0, D)
        qp = Q + b * sqb + (h * GROUP + g)[:, None] * sqh + ch[None, :]
        qd1 = tl.load(qp, mask=gmask[:, None], other=0.0)  # (names not shared with the quantized branch's fp32 q1/q2)
        qd2 = tl.load(qp + HALF, mask=gmask[:, None], other=0.0)
        acc = tl.zeros([GP, D], tl.float32)
        m_i, l_i, acc = _dense_regions(qd1, qd2, m_i, l_i, acc, b, h, n_s, n_w, n_s, n_q, SK, SV, WK, WV, mask_row,
                                       qk_scale, ssk_b, ssk_h, ssk_t, ssv_b, ssv_h, ssv_t, swk_b, swk_h, swk_t,
                                       swv_b, swv_h, swv_t, D, BT, HAS_MASK, True, F32)
        tl.store(PACC + row[:, None] * D + chd[None, :], acc, mask=gmask[:, None])
    tl.store(PM + row, m_i, mask=gmask)
    tl.store(PL + row, l_i, mask=gmask)


# ------------------------------------------------------------------------------------------------------------------
# The natural-order kernel (v5, "natural": _kvq_decode_fields_kernel with NATURAL): the four LUTX field tiles of a
# half are interleaved back into natural channel order in registers (tl.interleave of tensors that already hold 4
# consecutive bytes per thread: no data movement), so a block needs two key dots and one value dot over wide tiles
# (K = D/2 and N = D) instead of the fields kernel's twelve narrow ones, each behind its own shared-memory layout
# conversion.
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _nat(f0, f1, f2, f3):
    """Field tiles [BT, W] (f_f[t, j] = channel 4 j + f) -> [BT, 4 W] in natural channel order."""
    return tl.interleave(tl.interleave(f0, f2), tl.interleave(f1, f3))


@triton.jit
def _planes_w(rows, lo_off, hi_off, W: tl.constexpr, BITS: tl.constexpr, tmask):
    """_planes_raw through 32-bit loads: the [BT, W] bytes (4-bit: u16 words) of each row's low plane and, for 3 bits,
    the high-plane nibble of each low byte, loaded as int32 words (a thread reads whole words, so the loads are wide
    and coalesced) and split into bytes in registers (_nat order = byte order)."""
    m = tmask[:, None]
    if BITS == 4:
        NW4: tl.constexpr = W // 2
        jw = tl.arange(0, NW4)
        w = tl.load((rows[:, None] + lo_off + 4 * jw[None, :]).to(tl.pointer_type(tl.int32)), mask=m, other=0)
        u = tl.interleave(w & 0xFFFF, (w >> 16) & 0xFFFF).to(tl.uint16)
        return u, u
    else:
        NW: tl.constexpr = W // 4
        jw = tl.arange(0, NW)
        w = tl.load((rows[:, None] + lo_off + 4 * jw[None, :]).to(tl.pointer_type(tl.int32)), mask=m, other=0)
        lo = _nat(w & 255, (w >> 8) & 255, (w >> 16) & 255, (w >> 24) & 255).to(tl.uint8)
        if BITS == 3:
            NH: tl.constexpr = NW // 2
            jh = tl.arange(0, NH)
            hw = tl.load((rows[:, None] + hi_off + 4 * jh[None, :]).to(tl.pointer_type(tl.int32)), mask=m, other=0)
            h16 = tl.interleave(hw & 0xFFFF, (hw >> 16) & 0xFFFF)
            hi = _nat(h16 & 15, (h16 >> 4) & 15, (h16 >> 8) & 15, (h16 >> 12) & 15).to(tl.uint8)
        else:
            hi = lo
        return lo, hi


@triton.jit
def _nat_consts(qrow, gm, rope_scale, INVF, kso, kzo, TAU, ch, taui, HALF: tl.constexpr, BT: tl.constexpr,
                F32: tl.constexpr, RELOAD: tl.constexpr):
    """The natural kernel's loop invariants: query halves (fp32, RoPE attention_scaling folded in), inverse
    frequencies, the fp16 cos/sin table of tau = 0..BT-1 (RELOAD: read from the host table TAU [2, BT, HALF]), and
    the fp16 per-channel key scale/zero of both halves."""
    q1 = tl.load(qrow + ch[None, :], mask=gm, other=0.0).to(tl.float32) * rope_scale
    q2 = tl.load(qrow + HALF + ch[None, :], mask=gm, other=0.0).to(tl.float32) * rope_scale
    om = tl.load(INVF + ch)
    if RELOAD:
        tp = TAU + taui[:, None] * HALF + ch[None, :]
        C0 = tl.load(tp)
        S0 = tl.load(tp + BT * HALF)
    else:
        C0, S0 = _tau_cs(taui.to(tl.float32), om, F32)
        C0 = C0.to(tl.float16)
        S0 = S0.to(tl.float16)
    return (q1, q2, om, C0, S0, tl.load(kso).to(tl.float16)[None, :], tl.load(kzo).to(tl.float16)[None, :],
            tl.load(kso + HALF).to(tl.float16)[None, :], tl.load(kzo + HALF).to(tl.float16)[None, :])


@triton.jit(do_not_specialize=("T", "t_off", "n_key_progs", "n_tk", "n_tv"))
def _quant_kv_kernel(
    K, POS, KZ, KS, KLUT, KBND, INVF, rope_scale,
    KC, KOI, KOV, QPOS,
    sk_b, sk_h, sk_t, sp_b, sp_t,
    skc_b, skc_h, skc_t, sko_b, sko_h, sko_t, sqp_b,
    V, VBND, VC, VZ, VS, VOI, VOV,
    sv_b, sv_h, sv_t,
    svc_b, svc_g, svc_t, svs_b, svs_g, svs_t, svo_b, svo_g, svo_t,
    T, t_off, half_r, n_key_progs, n_tk, n_tv,
    H: tl.constexpr, D: tl.constexpr, KBITS: tl.constexpr, CK: tl.constexpr, BTK: tl.constexpr,
    UNDO_ROPE: tl.constexpr, F32: tl.constexpr,
    G: tl.constexpr, NV: tl.constexpr, NVP: tl.constexpr, VBITS: tl.constexpr, CV: tl.constexpr,
    CVP: tl.constexpr, BTV: tl.constexpr, TOKEN: tl.constexpr, LENS=None, DEVLEN: tl.constexpr = False,
    VOE=None, soe_b=0, soe_t=0, ENDS: tl.constexpr = False, HP: tl.constexpr = 1,
):
    """Quantize-and-append of a whole layer step in one launch: programs [0, n_key_progs) encode key blocks
    (B*H x n_tk), the rest value blocks (B*G x n_tv). DEVLEN: the write offset is read from device memory (LENS)."""
    pid = tl.program_id(0)
    if DEVLEN:
        t_off = tl.load(LENS)
    if pid < n_key_progs:
        _quant_keys(pid // n_tk, pid % n_tk,
                    K, POS, KZ, KS, KLUT, KBND, INVF, rope_scale, KC, KOI, KOV, QPOS,
                    sk_b, sk_h, sk_t, sp_b, sp_t, skc_b, skc_h, skc_t, sko_b, sko_h, sko_t, sqp_b,
                    T, t_off, half_r, H, D, KBITS, CK, BTK, UNDO_ROPE, F32)
    else:
        p = pid - n_key_progs
        _quant_values(p // n_tv, p % n_tv,
                      V, VBND, VC, VZ, VS, VOI, VOV, sv_b, sv_h, sv_t,
                      svc_b, svc_g, svc_t, svs_b, svs_g, svs_t, svo_b, svo_g, svo_t,
                      T, t_off, G, NV, NVP, D, VBITS, CV, CVP, BTV, TOKEN, VOE, soe_b, soe_t, ENDS, HP)
