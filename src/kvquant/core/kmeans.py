"""Exact weighted 1-D k-means on a histogram, by dynamic programming.

The reference implementation ran sklearn's k-means on ~10^8 points per layer. In one dimension the optimal clusters are
contiguous intervals, so the problem is solved *exactly* over interval partitions with prefix sums and a DP
(O(K * B^2) for B histogram bins, vectorised). Calibration streams the data into a histogram with per-bin sums of
``w``, ``w*x`` and ``w*x^2`` (``WeightedHistogram``), so memory is O(B) whatever the number of tokens, and the
within-bin statistics are exact: the only approximation is that cluster edges fall on bin edges (B=2048 bins on
[-1, 1], i.e. a resolution of 0.001).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WeightedHistogram:
    """Per-bin sums over [lo, hi]: ``w`` (weight), ``wx``, ``wx2`` [B] in float64."""

    w: torch.Tensor
    wx: torch.Tensor
    wx2: torch.Tensor
    lo: float = -1.0
    hi: float = 1.0

    @classmethod
    def empty(cls, bins: int = 2048, lo: float = -1.0, hi: float = 1.0) -> WeightedHistogram:
        z = torch.zeros(bins, dtype=torch.float64)
        return cls(z.clone(), z.clone(), z.clone(), lo, hi)

    @property
    def bins(self) -> int:
        return self.w.numel()

    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Accumulate values ``x`` (any shape, inside [lo, hi]) with optional same-shape weights."""
        if self.w.device != x.device:
            # accumulate where the data is (a GPU calibration would otherwise copy every batch to the host and bin
            # it there); :meth:`cpu` brings the sums back for fitting and saving
            self.w, self.wx, self.wx2 = (t.to(x.device) for t in (self.w, self.wx, self.wx2))
        x = x.reshape(-1).double()
        w = torch.ones_like(x) if weight is None else weight.reshape(-1).double()
        idx = ((x - self.lo) / (self.hi - self.lo) * self.bins).long().clamp_(0, self.bins - 1)
        self.w += torch.bincount(idx, w, self.bins)
        self.wx += torch.bincount(idx, w * x, self.bins)
        self.wx2 += torch.bincount(idx, w * x * x, self.bins)

    def total(self) -> float:
        return float(self.w.sum())

    def cpu(self) -> WeightedHistogram:
        """Move the sums to the host in place (returns self)."""
        self.w, self.wx, self.wx2 = self.w.cpu(), self.wx.cpu(), self.wx2.cpu()
        return self


def weighted_kmeans_1d(hist: WeightedHistogram, k: int, max_cells: int = 1024) -> torch.Tensor:
    """Optimal ``k`` levels (sorted, float32) minimising sum_i w_i (x_i - level(x_i))^2 over the histogram's data,
    with clusters restricted to unions of whole cells. Exact (global optimum) under that restriction.

    Cells are the occupied bins; if there are more than ``max_cells``, runs of consecutive occupied bins are merged
    (their sums are exact), which bounds the O(k * cells^2) DP at ~0.1 s per codebook."""
    keep = hist.w > 0
    w, s, q = hist.w[keep].double(), hist.wx[keep].double(), hist.wx2[keep].double()
    if w.numel() > max_cells:
        g = -(-w.numel() // max_cells)
        pad = (-w.numel()) % g
        w, s, q = (torch.nn.functional.pad(t, (0, pad)).reshape(-1, g).sum(1) for t in (w, s, q))
        keep2 = w > 0
        w, s, q = w[keep2], s[keep2], q[keep2]
    b = w.numel()
    if b == 0:
        return torch.linspace(hist.lo, hist.hi, k)
    if b <= k:
        cent = (s / w).tolist()
        # Fewer occupied bins than levels: every bin is its own level; pad with evenly spread unused levels.
        extra = torch.linspace(hist.lo, hist.hi, k + 2)[1:-1].tolist()
        levels = sorted(cent + extra[: k - b])
        return torch.tensor(levels, dtype=torch.float32)
    zero = torch.zeros(1, dtype=torch.float64)
    W, S, Q = torch.cat((zero, w.cumsum(0))), torch.cat((zero, s.cumsum(0))), torch.cat((zero, q.cumsum(0)))
    # cost[j, i] = SSE of bins j..i-1 as one cluster (j < i); +inf elsewhere.
    dW = W[None, :] - W[:, None]
    dS = S[None, :] - S[:, None]
    dQ = Q[None, :] - Q[:, None]
    cost = dQ - dS * dS / dW.clamp_min(1e-300)
    cost = cost.clamp_min(0)
    j_idx = torch.arange(b + 1)
    cost = torch.where(j_idx[:, None] < j_idx[None, :], cost, torch.full_like(cost, float("inf")))
    # D[i] = best cost of covering bins 0..i-1 with the current number of clusters.
    D = cost[0].clone()
    back = []
    for _ in range(1, k):
        tot = D[:, None] + cost
        D, arg = tot.min(0)
        back.append(arg)
    # Backtrack from i = b.
    edges = [b]
    i = b
    for arg in reversed(back):
        i = int(arg[i])
        edges.append(i)
    edges.append(0)
    edges = edges[::-1]
    levels = []
    for lo_e, hi_e in zip(edges[:-1], edges[1:]):
        ww = W[hi_e] - W[lo_e]
        levels.append(float((S[hi_e] - S[lo_e]) / ww) if ww > 0 else float("nan"))
    return torch.sort(torch.tensor(levels, dtype=torch.float64)).values.float()


def histogram_sse(hist: WeightedHistogram, levels: torch.Tensor) -> float:
    """Weighted squared error of quantizing the histogram's data to the nearest of ``levels`` (bin-exact)."""
    keep = hist.w > 0
    w, s, q = hist.w[keep], hist.wx[keep], hist.wx2[keep]
    c = s / w
    lv = levels.double().to(c.device)
    idx = torch.bucketize(c, 0.5 * (lv[1:] + lv[:-1]))
    L = lv[idx]
    return float((q - 2 * L * s + L * L * w).sum())
