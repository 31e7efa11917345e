"""Where a kernel's warps wait, per SASS line, from an Nsight Compute source page (run on any machine).

    ncu --set full --import-source yes -k regex:_pairs_kernel -c 1 -o pairs python3 benchmarks/gpu_ncu.py ...
    ncu -i pairs.ncu-rep --page source --csv --print-source sass > pairs_source.csv
    python3 benchmarks/ncu_stalls.py pairs_source.csv[.gz] [--top 25] [--context 3] [--cubin _pairs_kernel.cubin]

``--cubin`` (the profiled kernel's cubin, from its Triton cache entry; the pairs kernel only): the samples and
executed instructions per region of the kernel (codes, slots, RoPE, ...: ptx_count.py's regions, from nvdisasm's
source lines), the source page's rows matched to the cubin's instructions in order.

Prints the share of all warp-state samples per stall reason, then the SASS lines with the most samples, each with its
execution count and main stall reasons, and a few lines before it (a stall is charged to the instruction that waits,
so the load it waits for is usually a few lines up).
"""

from __future__ import annotations

import argparse
import csv
import gzip
from collections import Counter

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def read(path: str) -> list[dict]:
    with (gzip.open(path, "rt", newline="") if path.endswith(".gz") else open(path, newline="")) as f:
        rows = list(csv.reader(f))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    cols = rows[head]
    out = []
    for r in rows[head + 1:]:
        if r and r[0].startswith("0x"):
            out.append(dict(zip(cols, r)))
    if not out:
        raise SystemExit(f"{path}: no SASS rows (export with --page source --csv --print-source sass)")
    return out


def num(row: dict, col: str) -> int:
    try:
        return int(float(row.get(col, "0") or 0))
    except ValueError:
        return 0


def by_region(rows: list[dict], cubin: bytes) -> None:
    """Samples, their main reasons and executed instructions per region of the pairs kernel."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ptx_count import REGION_NOTE, pairs_line_regions

    ins, _ = pairs_line_regions(cubin)
    if len(ins) != len(rows) or any(r["Source"].split()[0].lstrip("@!P0123456789 ") not in t for r, (_, t, _) in
                                    zip(rows, ins) if r.get("Source")):
        raise SystemExit(f"the cubin's {len(ins)} instructions do not match the profile's {len(rows)} SASS rows")
    reasons = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
    total = sum(num(r, SAMPLES) for r in rows)
    agg: dict = {}
    for r, (_, _, reg) in zip(rows, ins):
        d = agg.setdefault(reg, Counter())
        d["samples"] += num(r, SAMPLES)
        d["executed"] += num(r, EXECUTED)
        for c in reasons:
            d[c[len("stall_"):]] += num(r, c)
    print("\nby region (share of all samples; warp instructions executed; main reasons, as shares of the region's "
          "samples):")
    for reg, d in sorted(agg.items(), key=lambda x: -x[1]["samples"]):
        main = Counter({k: v for k, v in d.items() if k not in ("samples", "executed")}).most_common(4)
        print(f"  {REGION_NOTE.get(reg, reg):52s} {d['samples'] / total:6.1%}  {d['executed']:>12,}  "
              + ", ".join(f"{k} {v / max(d['samples'], 1):.0%}" for k, v in main))
    print()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--context", type=int, default=3, help="lines shown before each top line")
    ap.add_argument("--cubin", default=None, help="the profiled pairs kernel's cubin: samples per region")
    a = ap.parse_args()
    rows = read(a.csv)
    if a.cubin:
        by_region(rows, open(a.cubin, "rb").read())
    reasons = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
    total = sum(num(r, SAMPLES) for r in rows)
    by_reason = Counter({c[len("stall_"):]: sum(num(r, c) for r in rows) for c in reasons})
    print(f"{a.csv}: {len(rows)} SASS lines, {sum(num(r, EXECUTED) for r in rows):,} warp instructions executed, "
          f"{total:,} samples")
    print("samples by reason: " + ", ".join(f"{k} {v / total:.1%}" for k, v in by_reason.most_common(8)))
    top = sorted(range(len(rows)), key=lambda i: -num(rows[i], SAMPLES))[: a.top]
    print(f"\nthe {a.top} lines with the most samples (share of all samples; main reasons):")
    for i in sorted(top):
        for j in range(max(0, i - a.context), i + 1):
            r = rows[j]
            s = num(r, SAMPLES)
            why = Counter({c[len("stall_"):]: num(r, c) for c in reasons}).most_common(2)
            tag = (f"{s / total:6.2%}  " + ", ".join(f"{k} {v}" for k, v in why if v)) if j == i else ""
            print(f"  {j:5d} x{num(r, EXECUTED):>8,}  {r['Source'].strip()[:70]:70s} {tag}")
        print()


if __name__ == "__main__":
    main()
