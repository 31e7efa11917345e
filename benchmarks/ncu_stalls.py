"""Where a kernel's warps wait, per SASS line, from an Nsight Compute source page (run on any machine).

    ncu --set full --import-source yes -k regex:_pairs_kernel -c 1 -o pairs python3 benchmarks/gpu_ncu.py ...
    ncu -i pairs.ncu-rep --page source --csv --print-source sass > pairs_source.csv
    python3 benchmarks/ncu_stalls.py pairs_source.csv [--top 25] [--context 3]

Prints the share of all warp-state samples per stall reason, then the SASS lines with the most samples, each with its
execution count and main stall reasons, and a few lines before it (a stall is charged to the instruction that waits,
so the load it waits for is usually a few lines up).
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def read(path: str) -> list[dict]:
    with open(path, newline="") as f:
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--context", type=int, default=3, help="lines shown before each top line")
    a = ap.parse_args()
    rows = read(a.csv)
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
