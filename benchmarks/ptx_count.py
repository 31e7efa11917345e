"""Static instruction counts of the fused decode kernels compiled for sm_90 (no GPU needed).

`PYTHONPATH=src python benchmarks/ptx_count.py [--dump DIR]` compiles `_kvq_decode_kernel` (the tiles kernel) for the
Llama-3-8B decode shape (GQA group 4 -> GP 16, D 128, BT 64, nuq3, Ck 1, token-group values with Cv 10 -- and Cv 0 for
comparison) with `triton.compile(..., target=GPUTarget("cuda", 90, 32))`, and prints PTX lines/instructions and, when
ptxas and nvdisasm are on the PATH (triton ships them), the SASS instruction count of the quantized-token loop body
(the hot loop).

`--kernel fields|natural` compiles `_kvq_decode_fields_kernel` in that mode instead (head-group values, register
lookup table; `--ck/--cv` slots, `--bt`, `--warps`, `--maxnreg`; `--token-group` for token-group value rows, e.g.
`--cv 11`), and `--div` adds the divisibility-by-16 hints
that Triton attaches at run time to pointers and to the strides and sizes that are multiples of 16 (without them the
loads do not vectorise as they do on the device). Results depend on the triton version: the H200 runs had 3.6.

`--kernel pairs` compiles the Gluon pairs kernel (kvquant/kernels/_gluon.py; needs triton 3.6, e.g. installed with `pip
install --no-deps --target /tmp/t36 triton==3.6.0` and put first on PYTHONPATH) for the Llama-3-8B shape with `--ck`
slots per key and value vector (0 or 1), `--bits 3 2 4` (3-, 2- or 4-bit codes), `--mask`, and `--token-group`
(token-group values, `--cv` slots per row, 10 by default: the slot passes); its hot loop count includes the blocks that
compute RoPE angles for non-contiguous positions, which contiguous blocks skip. `--maxnreg` caps its registers.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from kvquant.kernels import _triton as K  # noqa: E402

PTR = {"KW": "*i32", "VW": "*i32", "KDLH": "*fp16", "TAU": "*fp16",
       "Q": "*bf16", "PACC": "*fp32", "PM": "*fp32", "PL": "*fp32", "KC": "*u8", "KOI": "*u8", "KOV": "*fp16",
       "VC": "*u8", "VZ": "*fp16", "VS": "*fp16", "VOI": "*i16", "VOV": "*fp16", "QPOS": "*i32",
       "VLEVH": "*fp16", "LENS": "*i32", "VOE": "*u8",
       "SK": "*bf16", "SV": "*bf16", "WK": "*bf16", "WV": "*bf16", "MASK": "*fp32"}


def signature(fn, const):
    sig = {}
    names = list(inspect.signature(fn.fn).parameters)
    n_ptr = names.index("qk_scale")  # every argument before the scalars is a pointer
    for i, name in enumerate(names):
        if name in const:
            sig[name] = "constexpr"
        elif name in PTR:
            sig[name] = PTR[name]
        elif i < n_ptr:
            sig[name] = "*fp32"
        elif name in ("qk_scale", "rope_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


DIV16 = ("skc_b", "skc_h", "skc_t", "svc_b", "svc_g", "svc_t", "chunk")  # multiples of 16 in the benchmark shapes


def compile_decode(bits=3, cv=10, ck=1, has_mask=False, v_token=True, extra=None, bt=64, num_warps=4, fn=None,
                   maxnreg=None, div=False):
    const = dict(H_KV=8, GROUP=4, GP=16, BITS=bits, D=128, CK=ck, CV=cv, V_TOKEN=v_token, BT=bt,
                 HAS_MASK=has_mask, USE_DOT=True, F32=False, K_AFFINE=True, GR=4, VCORR=cv > 0, VA=16)
    const.update(extra or {})
    fn = fn or K._kvq_decode_kernel
    params = inspect.signature(fn.fn).parameters
    const = {k: v for k, v in const.items() if k in params}
    sig = signature(fn, const)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
             if div and (sig[n].startswith("*") or n in DIV16)}
    src = ASTSource(fn, sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=1,
                                                                      **({} if maxnreg is None else
                                                                         {"maxnreg": maxnreg})))


def ptx_stats(ptx: str):
    lines = ptx.splitlines()
    ins = [ln.strip() for ln in lines
           if re.match(r"^\s+[a-z@]", ln) and not ln.strip().startswith(("//", ".", "{", "}"))]
    ops = Counter(re.sub(r"^@%p\d+\s+", "", i).split()[0].split(".")[0] for i in ins)
    return len(lines), len(ins), ops


def cuda_tool(tool: str, cubin: bytes, *args: str) -> str | None:
    """Output of ``tool`` (nvdisasm, cuobjdump: on the PATH, else triton's copy) on ``cubin``; None if absent."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        with open(p, "wb") as f:
            f.write(cubin)
        for exe in (tool, None):
            try:
                if exe is None:
                    import triton.backends.nvidia as nv
                    exe = os.path.join(os.path.dirname(nv.__file__), "bin", tool)
                return subprocess.run([exe, *args, p], capture_output=True, text=True, check=True).stdout
            except Exception:
                continue
    return None


def resource_usage(cubin: bytes) -> str:
    """"R registers, S B stack" of the kernel in ``cubin`` (cuobjdump; spills live on the stack), or "?"."""
    m = re.search(r"REG:(\d+) STACK:(\d+)", cuda_tool("cuobjdump", cubin, "--dump-resource-usage") or "")
    return f"{m.group(1)} registers, {m.group(2)} B stack" if m else "?"


def _parse_sass(txt: str):
    """[(address, instruction, source line or None)] of nvdisasm's listing (lines from ``-gi`` comments) and the
    address range of its largest backward-branch loop (None if it has none)."""
    ins = []
    labels = {}
    pending = []
    line = None
    for ln in txt.splitlines():
        lm = re.search(r'//## File ".*", line (\d+)', ln)
        if lm:
            line = int(lm.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", ln)
        if m:
            a = int(m.group(1), 16)
            ins.append((a, m.group(2), line))
            for lb in pending:
                labels[lb] = a
            pending = []
        lm = re.match(r"^(\.L_x_\d+):", ln.strip())
        if lm:
            pending.append(lm.group(1))
    # loops: BRA to an earlier address
    loops = []
    for addr, text, _ in ins:
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if m and labels.get(m.group(1), 1 << 40) < addr:
            loops.append((labels[m.group(1)], addr))
    return ins, max(((a, b) for a, b in loops), key=lambda x: x[1] - x[0], default=None)


def sass_loop(cubin: bytes):
    """SASS instruction count of the whole kernel and of its largest backward-branch loop."""
    txt = cuda_tool("nvdisasm", cubin, "-c")
    if txt is None:
        return None
    ins, body = _parse_sass(txt)
    n_body = sum(1 for a, _, _ in ins if body and body[0] <= a <= body[1]) if body else 0
    ops = Counter(t.split()[0] if not t.startswith("@") else t.split()[1] for a, t, _ in ins
                  if body and body[0] <= a <= body[1])
    spills = sum(1 for _, t, _ in ins if re.search(r"\b(STL|LDL)", t))
    return len(ins), n_body, ops, spills


# --regions: the pairs kernel's hot loop by what its instructions do, from the source line nvdisasm -gi gives each
# one: the helper function it was inlined from, else keywords of the kernel's statement
_HELPER_REGION = {
    "_entry": "codes", "_entry_lo": "codes", "_entry_byte": "codes", "_lds": "codes", "_lookup": "codes",
    "_vlookup": "codes", "_key_rows": "codes", "_key_slot": "slots", "_pick8": "query rotation",
    "_cos_sin": "exact RoPE", "_q_table_store": "exact RoPE", "_pack2": "exact RoPE",
    "_rot_q": "query rotation", "_pick4": "query rotation",
    "_hfma2": "key affine + RoPE", "_rope2": "key affine + RoPE", "_to_operand": "key affine + RoPE",
    "_slot_word": "slots", "_tile_off": "slots", "_sts16": "slots", "_clear16": "slots", "_warp_sync": "slots",
    "_ldsm4": "slots", "_tile_merge": "slots", "_ldsm_rows": "slots", "_ktile_off": "slots", "_ktile_rows": "slots",
    "_key_slot_cell": "slots", "_prefetch": "other",
}
_STATEMENT_REGION = (  # (region, keywords), first match wins
    ("slots", ("k_rel", "v_rel", "KOI", "KOV", "KZI", "VOI", "VOV", "VOE", "vs5", "vz5", "s_row", "s_inv", "s_z",
               "ent = ", "+ ent", "res = ", "col = ", "npass", "ksm", "ko0", "ko1", "ko2", "kt_rows")),
    ("exact RoPE", ("dpos", "_cos_sin", "SCR", "_pack2", "_q_table_store")),
    ("codes", ("wrow", "hrow", "_lookup", "_vlookup", "h_w", " w = ", " h = ", "w1 = ", "ws = ", "w_s0", "w_l", "w_m")),
    ("MMA + movmatrix", ("movmatrix", "mma_v2", "acc")),
    ("key affine + RoPE", ("cw =", "sw =", "_rope2", "_hfma2")),
    ("query rotation", ("_rot_q",)),
    ("softmax, value scale / zero", ("m_new", "alpha", "exp2", "l_i", "z_i", "pv =", "vsc", "vzr", "MROW", "tmask")),
    ("position check", ("contig", "q_tab", "p_b", "pos =", "bidx")),
)
REGION_NOTE = {"exact RoPE": "exact RoPE (blocks with non-contiguous positions only)"}


def pairs_line_regions(cubin: bytes):
    """([(address, instruction, region)] for every SASS instruction of a Gluon pairs kernel cubin (see
    _STATEMENT_REGION), the hot loop's address range). The cubin must come from the kernels/_gluon.py on disk."""
    from kvquant.kernels import _gluon as G

    src = inspect.getsource(G).splitlines()
    ins, body = _parse_sass(cuda_tool("nvdisasm", cubin, "-c", "-gi") or "")

    def region(line):
        if not line or line > len(src):
            return "other"
        j = line - 1
        while j >= 0 and not src[j].startswith("def "):
            j -= 1
        fn = re.match(r"def (\w+)", src[j]).group(1) if j >= 0 else ""
        if fn != "_pairs_kernel":
            return _HELPER_REGION.get(fn, "other")
        stmt = src[line - 1]
        return next((r for r, keys in _STATEMENT_REGION if any(k in stmt for k in keys)), "other")

    return [(a, t, region(ln)) for a, t, ln in ins], body


def pairs_regions(cubin: bytes) -> Counter:
    """Hot-loop SASS instructions of the Gluon pairs kernel per region."""
    ins, body = pairs_line_regions(cubin)
    return Counter(r for a, _, r in ins if body and body[0] <= a <= body[1])


def compile_pairs(slots=1, has_mask=False, group=4, heads=8, token_group=0, bits=3, maxnreg=None, head_dim=128,
                  pss=None):
    """The Gluon pairs kernel for sm_90 (divisibility hints on the code pointers and strides, as at run time: the row
    stride only where it is a multiple of 16 bytes); ``token_group``: token-group values with that many slots per row
    (0: head-group, ``slots`` per vector); ``pss``: the pass (head_dim 256: 1 scores, 2 values, 0 both in one launch;
    None: as the library launches it, the scores pass where it takes two)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from kvquant.core.codec import uses_head_ends
    from kvquant.kernels import _gluon as G

    ptrs = {"Q": "*bf16", "PACC": "*fp32", "PM": "*fp32", "PL": "*fp32", "KC": "*u8", "KOI": "*u8", "KOV": "*fp16",
            "VC": "*u8", "VZ": "*fp16", "VS": "*fp16", "VOI": "*i16" if token_group else "*u8", "VOV": "*fp16",
            "VOE": "*u8", "QPOS": "*i32", "MASK": "*fp32",
            "LENS": "*i32", "TAB": "*i32", "KSZ": "*i32", "KZI": "*fp32", "CSP": "*i32", "BROT": "*fp32",
            "INVF": "*fp32", "SCR": "*i32", "PSC": "*fp32", "qk_scale": "fp32"}
    names = [n for n in inspect.signature(G._pairs_kernel.fn).parameters]
    sig = {n: ptrs.get(n, "i32") for n in names if n not in _PAIRS_CONST}
    cv = token_group or slots
    if pss is None:
        pss = 1 if head_dim == 256 and G.programs_per_split(head_dim) == 1 else 0
    keys = pss != 2
    cx = dict(H_KV=heads, GROUP=group, CK=slots if keys else 0, CV=cv,
              **G.value_slots(bool(token_group), cv, uses_head_ends("token", heads, token_group), head_dim),
              KTILE=G.key_slot_tile(head_dim, slots) and keys, HAS_MASK=has_mask and keys, DEVLEN=False, PF=2,
              HI=bits == 3, B4=bits == 4, BT=G.BT, D=head_dim, N=G.N, PASS=pss)
    order = list(sig)
    div = [["tt.divisibility", 16]]
    hinted = ("KC", "VC", "skc_h", "svc_h", "skc_b", "svc_b")
    hinted += ("skc_t", "svc_t") if head_dim * bits % 128 == 0 else ()
    attrs = {(order.index(n),): div for n in hinted}
    return triton.compile(GluonASTSource(G._pairs_kernel, sig, constexprs=cx, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=1, **({} if maxnreg is None else {"maxnreg": maxnreg})))


_PAIRS_CONST = ("H_KV", "GROUP", "CK", "CV", "VRUN", "VENDS", "V_OFF", "KTILE", "HAS_MASK", "DEVLEN", "PF", "HI",
                "B4", "BT", "D", "N", "PASS")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default=None)
    ap.add_argument("--kernel", default="tiles", choices=["tiles", "fields", "natural", "pairs"])
    ap.add_argument("--mask", action="store_true", help="pairs: with the additive mask")
    ap.add_argument("--bits", type=int, nargs="*", default=[3])
    ap.add_argument("--bt", type=int, default=None, help="tokens per block (default: 64 tiles, 32 fields/natural)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--maxnreg", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=128, help="pairs: 64, 128 or 256")
    ap.add_argument("--ck", type=int, default=None, help="key slots (default: 1 tiles, 2 fields/natural)")
    ap.add_argument("--cv", type=int, nargs="*", default=None, help="value slots (default: 10 and 0 / 2)")
    ap.add_argument("--div", action="store_true", help="run-time divisibility hints (see the module docstring)")
    ap.add_argument("--token-group", action="store_true",
                    help="fields/natural/pairs: token-group values (one slot row for all 8 KV heads; e.g. --cv 11; "
                    "pairs: --cv 10, the default)")
    ap.add_argument("--regions", action="store_true", help="pairs: the hot loop's instructions by region (codes, "
                    "slots, RoPE, ...), from nvdisasm's source lines")
    ap.add_argument("--pf", type=int, default=2, help="fields/natural: prefetch the next block into L1 (1), L2 (2, the "
                    "default) or not (0)")
    a = ap.parse_args()
    if a.kernel == "pairs":
        tg = (a.cv or [10])[0] if a.token_group else 0
        for bits, slots in [(b, s) for b in a.bits for s in ([a.ck] if a.ck is not None else [1, 0])]:
            k = compile_pairs(slots, a.mask, token_group=tg, bits=bits, maxnreg=a.maxnreg, head_dim=a.head_dim)
            tot, loop, ops, loc = sass_loop(k.asm["cubin"])
            print(f"pairs nuq{bits} d{a.head_dim} slots={slots} token-group slots={tg} mask={a.mask} "
                  f"maxnreg={a.maxnreg} "
                  f"(triton {triton.__version__}): "
                  f"{resource_usage(k.asm['cubin'])}, shared {k.metadata.shared} B, SASS {tot} instr ({loc} local "
                  f"ld/st), hot loop {loop} instr")
            print("   SASS loop top:", ", ".join(f"{o} {c}" for o, c in ops.most_common(16)))
            if a.regions:
                reg = pairs_regions(k.asm["cubin"])
                print("   hot loop by region:", ", ".join(f"{REGION_NOTE.get(r, r)} {n}" for r, n in reg.most_common()))
        return
    tiles = a.kernel == "tiles"
    bt = a.bt or (64 if tiles else 32)
    ck = a.ck if a.ck is not None else (1 if tiles else 2)
    cvs = a.cv if a.cv is not None else ([10, 0] if tiles else [2])
    fn = None if tiles else K._kvq_decode_fields_kernel
    extra = None if tiles else dict(LUTX=True, PREFETCH=False, F32=False, NATURAL=a.kernel == "natural",
                                    RELOAD=False, WIDE=False, PF=a.pf)
    for bits in a.bits:
        for cv in cvs:
            k = compile_decode(bits=bits, cv=cv, ck=ck, bt=bt, num_warps=a.warps, fn=fn, maxnreg=a.maxnreg,
                               v_token=tiles or a.token_group, extra=extra, div=a.div)
            ptx = k.asm["ptx"]
            n_lines, n_ins, ops = ptx_stats(ptx)
            smem = k.metadata.shared
            s = sass_loop(k.asm["cubin"])
            print(f"{a.kernel} nuq{bits} Ck={ck} Cv={cv} BT={bt} warps={a.warps} maxnreg={a.maxnreg} div={a.div} "
                  f"(triton {triton.__version__}): PTX {n_lines} lines / {n_ins} instr, shared {smem} B"
                  + (f", SASS {s[0]} instr ({s[3]} local ld/st), hot loop {s[1]} instr" if s else ""))
            print("   PTX top:", ", ".join(f"{o} {c}" for o, c in ops.most_common(14)))
            if s:
                print("   SASS loop top:", ", ".join(f"{o} {c}" for o, c in s[2].most_common(16)))
                mem = sorted((o, c) for o, c in s[2].items() if o.startswith(("LDG", "STS", "LDS", "BAR", "HMMA")))
                print("   SASS loop memory/barrier/MMA:", ", ".join(f"{o} {c}" for o, c in mem))
            if a.dump:
                os.makedirs(a.dump, exist_ok=True)
                with open(os.path.join(a.dump, f"{a.kernel}_nuq{bits}_cv{cv}.ptx"), "w") as f:
                    f.write(ptx)
                with open(os.path.join(a.dump, f"{a.kernel}_nuq{bits}_cv{cv}.cubin"), "wb") as f:
                    f.write(k.asm["cubin"])


if __name__ == "__main__":
    main()
