"""Static instruction counts of the fused decode kernel compiled for sm_90 (no GPU needed).

`PYTHONPATH=src python benchmarks/ptx_count.py [--dump DIR]` compiles `_kvq_decode_kernel` for the Llama-3-8B decode
shape (GQA group 4 -> GP 16, D 128, BT 64, nuq3, Ck 1, token-group values with Cv 10 -- and Cv 0 for comparison) with
`triton.compile(..., target=GPUTarget("cuda", 90, 32))`, and prints PTX lines/instructions and, when ptxas and nvdisasm
are on the PATH (triton ships them), the SASS instruction count of the quantized-token loop body (the hot loop).
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

PTR = {"Q": "*bf16", "PACC": "*fp32", "PM": "*fp32", "PL": "*fp32", "KC": "*u8", "KOI": "*u8", "KOV": "*fp16",
       "VC": "*u8", "VZ": "*fp16", "VS": "*fp16", "VOI": "*i16", "VOV": "*fp16", "QPOS": "*i32",
       "VLEVH": "*fp16", "SK": "*bf16", "SV": "*bf16", "WK": "*bf16", "WV": "*bf16", "MASK": "*fp32"}


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


def compile_decode(bits=3, cv=10, ck=1, has_mask=False, v_token=True, extra=None, bt=64, num_warps=4, fn=None,
                   maxnreg=None):
    const = dict(H_KV=8, GROUP=4, GP=16, BITS=bits, D=128, CK=ck, CV=cv, V_TOKEN=v_token, BT=bt,
                 HAS_MASK=has_mask, USE_DOT=True, F32=False, K_AFFINE=True, GR=4, VCORR=cv > 0, VA=16)
    const.update(extra or {})
    fn = fn or K._kvq_decode_kernel
    params = inspect.signature(fn.fn).parameters
    const = {k: v for k, v in const.items() if k in params}
    src = ASTSource(fn, signature(fn, const), constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=1,
                                                                      **({} if maxnreg is None else
                                                                         {"maxnreg": maxnreg})))


def ptx_stats(ptx: str):
    lines = ptx.splitlines()
    ins = [ln.strip() for ln in lines
           if re.match(r"^\s+[a-z@]", ln) and not ln.strip().startswith(("//", ".", "{", "}"))]
    ops = Counter(re.sub(r"^@%p\d+\s+", "", i).split()[0].split(".")[0] for i in ins)
    return len(lines), len(ins), ops


def sass_loop(cubin: bytes):
    """SASS instruction count of the whole kernel and of its largest backward-branch loop."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        with open(p, "wb") as f:
            f.write(cubin)
        try:
            txt = subprocess.run(["nvdisasm", "-c", p], capture_output=True, text=True, check=True).stdout
        except Exception:
            try:
                import triton.backends.nvidia as nv
                tool = os.path.join(os.path.dirname(nv.__file__), "bin", "nvdisasm")
                txt = subprocess.run([tool, "-c", p], capture_output=True, text=True, check=True).stdout
            except Exception:
                return None
    ins = []
    labels = {}
    pending = []
    for ln in txt.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", ln)
        if m:
            a = int(m.group(1), 16)
            ins.append((a, m.group(2)))
            for lb in pending:
                labels[lb] = a
            pending = []
        lm = re.match(r"^(\.L_x_\d+):", ln.strip())
        if lm:
            pending.append(lm.group(1))
    # loops: BRA to an earlier address
    loops = []
    for addr, text in ins:
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if m and labels.get(m.group(1), 1 << 40) < addr:
            loops.append((labels[m.group(1)], addr))
    body = max(((a, b) for a, b in loops), key=lambda x: x[1] - x[0], default=None)
    n_body = sum(1 for a, _ in ins if body and body[0] <= a <= body[1]) if body else 0
    ops = Counter(t.split()[0] if not t.startswith("@") else t.split()[1] for a, t in ins
                  if body and body[0] <= a <= body[1])
    spills = sum(1 for _, t in ins if re.search(r"\b(STL|LDL)", t))
    return len(ins), n_body, ops, spills


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default=None)
    ap.add_argument("--bits", type=int, nargs="*", default=[3])
    ap.add_argument("--bt", type=int, default=64)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--cv", type=int, nargs="*", default=[10, 0])
    a = ap.parse_args()
    for bits in a.bits:
        for cv in a.cv:
            k = compile_decode(bits=bits, cv=cv, bt=a.bt, num_warps=a.warps)
            ptx = k.asm["ptx"]
            n_lines, n_ins, ops = ptx_stats(ptx)
            smem = k.metadata.shared
            regs = getattr(k, "n_regs", None)
            s = sass_loop(k.asm["cubin"])
            print(f"nuq{bits} Cv={cv} BT={a.bt} warps={a.warps}: PTX {n_lines} lines / {n_ins} instr, shared {smem} B"
                  + (f", regs {regs}, SASS {s[0]} instr ({s[3]} local ld/st), hot loop {s[1]} instr" if s else ""))
            print("   PTX top:", ", ".join(f"{o} {c}" for o, c in ops.most_common(14)))
            if s:
                print("   SASS loop top:", ", ".join(f"{o} {c}" for o, c in s[2].most_common(16)))
            if a.dump:
                os.makedirs(a.dump, exist_ok=True)
                with open(os.path.join(a.dump, f"nuq{bits}_cv{cv}.ptx"), "w") as f:
                    f.write(ptx)
                with open(os.path.join(a.dump, f"nuq{bits}_cv{cv}.cubin"), "wb") as f:
                    f.write(k.asm["cubin"])


if __name__ == "__main__":
    main()
