"""Weighted 1-D k-means: kvquant's exact histogram DP vs scikit-learn's KMeans (what the reference code used).

Command (as run for the committed results):

    PYTHONPATH=src python3 benchmarks/kmeans_vs_sklearn.py --out benchmarks

Data: activations normalised to [-1, 1] as calibration sees them (range from the 0.5%/99.5% percentiles, i.e. with
1% outliers removed, then clipped; a heavy-tailed Student-t and a Gaussian), with
Fisher-like weights (products of squared Gaussians: a few elements dominate). Both solvers minimise the same weighted
squared error; the error is evaluated on the raw points for both. Our time includes building the histogram.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from kvquant.core.kmeans import WeightedHistogram, weighted_kmeans_1d
from kvquant.evaluation.report import environment


def weighted_sse(x: np.ndarray, w: np.ndarray, levels: np.ndarray) -> float:
    levels = np.sort(levels)
    b = 0.5 * (levels[1:] + levels[:-1])
    q = levels[np.searchsorted(b, x)]
    return float((w * (x - q) ** 2).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args()
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    rows = []
    for dist in ("student-t(4)", "gaussian"):
        x = rng.standard_t(4, args.points) if dist.startswith("student") else rng.standard_normal(args.points)
        # normalised like calibration data: range set by the 0.5% / 99.5% percentiles (outliers removed), clipped
        lo, hi = np.quantile(x, [0.005, 0.995])
        x = np.clip((x - (hi + lo) / 2) / ((hi - lo) / 2), -1, 1)
        w = (rng.standard_normal(args.points) * rng.standard_normal(args.points)) ** 2
        for bits in (2, 3, 4):
            k = 2**bits
            t0 = time.perf_counter()
            h = WeightedHistogram.empty()
            h.add(torch.from_numpy(x), torch.from_numpy(w))
            ours = weighted_kmeans_1d(h, k).numpy()
            t_ours = time.perf_counter() - t0
            t0 = time.perf_counter()
            km = KMeans(n_clusters=k, n_init=3, random_state=0).fit(x[:, None], sample_weight=w)
            t_sk = time.perf_counter() - t0
            sk = km.cluster_centers_[:, 0]
            e_ours, e_sk = weighted_sse(x, w, ours), weighted_sse(x, w, sk)
            rows.append({"data": dist, "bits": bits, "points": args.points, "ours_s": round(t_ours, 3),
                         "sklearn_s": round(t_sk, 3), "speedup": round(t_sk / t_ours, 1), "ours_sse": e_ours,
                         "sklearn_sse": e_sk, "sse_ratio": round(e_ours / e_sk, 5)})
            print(rows[-1])
    env = environment()
    import sklearn

    env["scikit-learn"] = sklearn.__version__
    out = Path(args.out)
    (out / "kmeans_vs_sklearn.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Weighted 1-D k-means: exact histogram DP (kvquant) vs scikit-learn KMeans",
        "",
        "Command: `PYTHONPATH=src python3 benchmarks/kmeans_vs_sklearn.py`  ",
        f"Machine: {env['machine']}; torch {env['torch']}, scikit-learn {env['scikit-learn']}; {env['date']}.  ",
        f"{args.points:,} weighted points per problem; sklearn with n_init=3 (k-means++); errors on the raw points. "
        "sse ratio < 1 means kvquant's solution has lower weighted error. Known limit: the histogram has 2048 bins, so "
        "data squeezed into a few percent of [-1, 1] (e.g. normalising by the absolute max of heavy-tailed data) loses "
        "resolution; in that setting we measured a ratio of 1.0004 at 3 bits.",
        "",
        "| data | bits | kvquant s | sklearn s | speedup | weighted SSE ratio (ours / sklearn) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['data']} | {r['bits']} | {r['ours_s']} | {r['sklearn_s']} | {r['speedup']}x | "
                     f"{r['sse_ratio']:.5f} |")
    (out / "kmeans_vs_sklearn.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
