"""Codebooks on the normalised range [-1, 1]: levels, decision boundaries, nearest-level search, Q-Norm.

A codebook has ``2^bits`` sorted *encode* levels; the decision boundaries are the midpoints between neighbours, so the
nearest level is found with one ``bucketize`` (a binary search, the same thing the GPU kernel does with comparisons)
instead of a brute-force distance search. Q-Norm may shift the *decode* levels afterwards (mean/std correction), so a
codebook carries both.
"""

from __future__ import annotations

import math

import torch


def boundaries_of(levels: torch.Tensor) -> torch.Tensor:
    """Sorted levels [L] -> decision boundaries [L-1] (midpoints)."""
    return 0.5 * (levels[1:] + levels[:-1])


def nearest_code(x: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for every element of ``x`` (ties go up). Returns int64 codes."""
    return torch.bucketize(x.float().contiguous(), boundaries.to(x.device, torch.float32).contiguous())


def uniform_levels(bits: int) -> torch.Tensor:
    """Uniform (integer) quantization on [-1, 1]: 2^bits evenly spaced levels including both ends."""
    return torch.linspace(-1.0, 1.0, 2**bits)


def normal_float_levels(bits: int) -> torch.Tensor:
    """NormalFloat-N levels (QLoRA): quantiles of N(0,1) rescaled to [-1, 1], with an exact zero.

    Follows QLoRA's construction: 2^(b-1) positive quantiles and 2^(b-1)-1 negative ones plus 0.
    """
    from statistics import NormalDist

    nd = NormalDist()
    offset = 0.9677083
    n_pos, n_neg = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    pos = [nd.inv_cdf(p) for p in torch.linspace(offset, 0.5, n_pos + 1)[:-1].tolist()]
    neg = [-nd.inv_cdf(p) for p in torch.linspace(offset, 0.5, n_neg + 1)[:-1].tolist()]
    v = torch.tensor(sorted(pos + [0.0] + neg))
    return v / v.abs().max()


def lloyd_max_gaussian_levels(bits: int, iters: int = 200) -> torch.Tensor:
    """Lloyd-Max (MSE-optimal) levels for a standard normal, in units of the standard deviation."""
    from statistics import NormalDist

    nd = NormalDist()
    n = 2**bits
    levels = torch.tensor([nd.inv_cdf((i + 0.5) / n) for i in range(n)], dtype=torch.float64)
    for _ in range(iters):
        b = torch.cat((torch.tensor([-math.inf]), boundaries_of(levels), torch.tensor([math.inf])))
        new = []
        for i in range(n):
            lo, hi = b[i].item(), b[i + 1].item()
            mass = nd.cdf(hi) - nd.cdf(lo)
            pdf_lo = 0.0 if math.isinf(lo) else nd.pdf(lo)
            pdf_hi = 0.0 if math.isinf(hi) else nd.pdf(hi)
            new.append((pdf_lo - pdf_hi) / max(mass, 1e-300))
        levels = torch.tensor(new, dtype=torch.float64)
    return levels.float()


def qnorm_levels(levels: torch.Tensor, counts: torch.Tensor, sum_x: torch.Tensor, sum_x2: torch.Tensor) -> torch.Tensor:
    """Q-Norm: affine-correct decode levels so the dequantized data has the original mean and std.

    ``counts``, ``sum_x``, ``sum_x2`` [L] are per-level statistics of the (unweighted) calibration data assigned to each
    level: how many elements, their sum and their sum of squares. Returns corrected decode levels [L].
    """
    counts, sum_x, sum_x2, lv = counts.double(), sum_x.double(), sum_x2.double(), levels.double()
    n = counts.sum()
    if n <= 0:
        return levels.clone()
    mu_x = sum_x.sum() / n
    var_x = (sum_x2.sum() / n - mu_x**2).clamp_min(0)
    mu_q = (counts * lv).sum() / n
    var_q = ((counts * lv * lv).sum() / n - mu_q**2).clamp_min(0)
    if var_q <= 1e-20:
        return levels.clone()
    out = (lv - mu_q) * torch.sqrt(var_x / var_q) + mu_x
    return out.to(levels.dtype)
