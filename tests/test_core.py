"""The quantization core: packing, codebooks, k-means, codecs, RoPE un-rotation."""

from __future__ import annotations

import pytest
import torch

from kvquant.core.codebook import (
    boundaries_of,
    lloyd_max_gaussian_levels,
    nearest_code,
    normal_float_levels,
    qnorm_levels,
    uniform_levels,
)
from kvquant.core.codec import (
    Codebook,
    LayerCodec,
    decode_channel,
    decode_token,
    encode_channel,
    encode_token,
    outlier_capacity,
    token_range,
)
from kvquant.core.kmeans import WeightedHistogram, histogram_sse, weighted_kmeans_1d
from kvquant.core.packing import pack_codes, packed_size, unpack_codes
from kvquant.core.rope import apply_rope, rope_specs, unapply_rope
from kvquant.models import TINY_ROPE_VARIANTS, tiny_random_model


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_roundtrip_and_size(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 2, 7, 64), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == packed_size(64, bits) == 64 * bits // 8
    assert torch.equal(unpack_codes(packed, bits, 64), codes)


def test_bad_bits_and_fraction_are_clear_errors():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_codes(torch.zeros(8, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="outlier fraction"):
        outlier_capacity(0.7, 64)
    with pytest.raises(ValueError, match="outlier fraction"):
        outlier_capacity(-0.01, 64)


def test_nearest_code_matches_bruteforce():
    lv = torch.sort(torch.rand(8) * 2 - 1).values
    x = torch.rand(1000) * 2 - 1
    brute = (x[:, None] - lv[None]).abs().argmin(1)
    fast = nearest_code(x, boundaries_of(lv))
    # ties are measure-zero for random data
    assert torch.equal(brute, fast)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fixed_codebooks_sorted_in_range(bits):
    for lv in (uniform_levels(bits), normal_float_levels(bits)):
        assert lv.numel() == 2**bits
        assert (lv[1:] > lv[:-1]).all() and lv.abs().max() <= 1 + 1e-6
    lm = lloyd_max_gaussian_levels(bits)
    assert torch.allclose(lm, -lm.flip(0), atol=1e-4)


def _bruteforce_kmeans(x, w, k):
    """Exhaustive search over contiguous partitions of a tiny sorted sample."""
    import itertools

    order = x.argsort()
    x, w = x[order].double(), w[order].double()
    best = None
    for cuts in itertools.combinations(range(1, len(x)), k - 1):
        edges = (0, *cuts, len(x))
        cost = 0.0
        for a, b in zip(edges[:-1], edges[1:]):
            c = (w[a:b] * x[a:b]).sum() / w[a:b].sum()
            cost += float((w[a:b] * (x[a:b] - c) ** 2).sum())
        best = cost if best is None else min(best, cost)
    return best


def test_kmeans_is_exact_on_small_data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, generator=g) * 2 - 1
    w = torch.rand(12, generator=g) + 0.1
    h = WeightedHistogram.empty(bins=100000)  # one point per bin: the DP is exact over points
    h.add(x, w)
    for k in (2, 3, 4):
        lv = weighted_kmeans_1d(h, k, max_cells=100000)
        assert histogram_sse(h, lv) == pytest.approx(_bruteforce_kmeans(x, w, k), rel=1e-6, abs=1e-9)


def test_kmeans_beats_uniform_on_gaussian():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(100000, generator=g) / 3).clamp(-1, 1)
    h = WeightedHistogram.empty()
    h.add(x)
    for bits in (2, 3, 4):
        assert histogram_sse(h, weighted_kmeans_1d(h, 2**bits)) < histogram_sse(h, uniform_levels(bits))


def test_qnorm_matches_mean_and_std():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(50000, generator=g) * 0.3 + 0.1).clamp(-1, 1)
    lv = uniform_levels(2)
    idx = nearest_code(x, boundaries_of(lv))
    counts = torch.bincount(idx, minlength=4).double()
    sx = torch.bincount(idx, x.double(), 4)
    sx2 = torch.bincount(idx, x.double() ** 2, 4)
    dec = qnorm_levels(lv, counts, sx, sx2)
    xq = dec[idx]
    assert xq.mean() == pytest.approx(float(x.mean()), abs=1e-4)
    assert xq.std() == pytest.approx(float(x.std()), rel=1e-3)


def _keys_with_outliers(seed=0, shape=(2, 3, 17, 64)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 5] *= 30  # an outlier channel
    x[0, 1, 3, 7] = 500.0  # a single huge element
    return x.half().float()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_channel_codec_error_bound_and_exact_outliers(bits):
    x = _keys_with_outliers()
    d = x.shape[3]
    lo = x.amin((0, 2))
    hi = x.amax((0, 2)).clamp_max(60)
    zero, scale = (hi + lo) / 2, (hi - lo) / 2
    cb = Codebook.fixed(uniform_levels(bits))
    cap = outlier_capacity(0.01, d)
    blk = encode_channel(x, zero, scale, cb, cap)
    out = decode_channel(blk, zero, scale, cb)
    # exact slots: every stored (index, value) is restored bit-exactly
    got = out.gather(-1, blk.out_idx.long())
    assert torch.equal(got, blk.out_val.float())
    assert out[0, 1, 3, 7] == 500.0  # the clamped outlier was kept in a slot
    # dense error bound: half a level gap times the channel scale, for elements inside the range
    step = 2 / (2**bits - 1)
    inside = ((x - zero[None, :, None]).abs() <= scale[None, :, None])
    err = (out - x).abs()
    assert bool((err[inside] <= (step / 2 * scale[None, :, None].expand_as(x))[inside] + 1e-4).all())
    assert blk.nbytes() == x.numel() * bits // 8 + x[..., 0].numel() * cap * 3


@pytest.mark.parametrize("group", ["head", "token"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_token_codec_error_bound_and_exact_outliers(bits, group):
    x = _keys_with_outliers(1)
    h, d = x.shape[1], x.shape[3]
    n = d if group == "head" else h * d
    cap = outlier_capacity(0.01, n)
    cb = Codebook.fixed(uniform_levels(bits))
    blk = encode_token(x, cb, cap, group)
    out = decode_token(blk, cb, group, h, d)
    assert out.shape == x.shape
    # outliers (the largest magnitudes) restored exactly
    assert out[0, 1, 3, 7] == 500.0
    scale = blk.scale.float()
    step = 2 / (2**bits - 1)
    v = x if group == "head" else x.transpose(1, 2).reshape(x.shape[0], 1, x.shape[2], h * d)
    o = out if group == "head" else out.transpose(1, 2).reshape_as(v)
    assert bool(((o - v).abs() <= step / 2 * scale * 1.01 + 1e-3).all())


def test_token_group_slots_sorted_with_head_runs():
    # token-wide vectors with >= 5 slots: slots sorted by element, out_ends[h] = slots in heads 0..h; the same slots and
    # the same decoded values as the unsorted selection; fewer slots or per-head vectors: no out_ends
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 6, 16, generator=g)
    x[:, 2, :, 3] *= 40  # outliers concentrated in head 2
    cb = Codebook.fixed(uniform_levels(3))
    blk = encode_token(x, cb, 6, "token")
    idx = blk.out_idx.long()
    assert bool((idx[..., 1:] > idx[..., :-1]).all())
    v = x.transpose(1, 2).reshape(2, 1, 6, 64)
    assert torch.equal(idx.sort(-1).values, token_range(v, 6)[2].sort(-1).values)
    assert torch.equal(blk.out_val, v.gather(-1, idx).half())
    head = idx // 16
    want = torch.stack([(head <= h).sum(-1) for h in range(4)], -1)
    assert blk.out_ends.shape == (2, 1, 6, 4) and torch.equal(blk.out_ends.long(), want)
    assert bool((blk.out_ends[..., 2] - blk.out_ends[..., 1] >= 1).all())  # head 2 holds its outlier
    assert blk.nbytes() == sum(t.numel() * t.element_size() for t in
                               (blk.codes, blk.out_idx, blk.out_val, blk.zero, blk.scale, blk.out_ends))
    dec = decode_token(blk, cb, "token", 4, 16)
    assert torch.equal(dec.transpose(1, 2).reshape(2, 1, 6, 64).gather(-1, idx), blk.out_val.float())
    assert encode_token(x, cb, 4, "token").out_ends is None
    assert encode_token(x, cb, 6, "head").out_ends is None


def test_layer_codec_roundtrip_shapes():
    x = _keys_with_outliers(2)
    h, d = x.shape[1], x.shape[3]
    cb = Codebook.fixed(uniform_levels(4))
    lc = LayerCodec(cb, cb, h, d, key_zero=torch.zeros(h, d), key_scale=x.abs().amax((0, 2)),
                    key_capacity=1, value_capacity=2)
    assert lc.decode_keys(lc.encode_keys(x)).shape == x.shape
    assert lc.decode_values(lc.encode_values(x)).shape == x.shape
    assert lc.key_lut().shape == (h, d, 16)
    with pytest.raises(ValueError, match="key_zero"):
        LayerCodec(cb, cb, h, d)


@pytest.mark.parametrize("variant", sorted(TINY_ROPE_VARIANTS))
def test_rope_unrotate_rerotate_exact(variant):
    """Pre-RoPE un-rotation and re-rotation within 1e-5 in fp32, for every RoPE variant transformers offers."""
    arch = "phi3" if variant == "longrope" else "llama"
    model = tiny_random_model(arch, rope_parameters=TINY_ROPE_VARIANTS[variant])
    spec = rope_specs(model)[0]
    rot = [m for n, m in model.named_modules() if n.endswith("rotary_emb")][0]
    g = torch.Generator().manual_seed(0)
    d = model.config.head_dim if getattr(model.config, "head_dim", None) else 16
    pos = torch.arange(0, 300).unsqueeze(0)
    k = torch.randn(1, 2, 300, d, generator=g)
    cos_t, sin_t = rot(k, pos)  # transformers' own cos/sin
    cos, sin = spec.cos_sin(pos)
    assert torch.allclose(cos, cos_t.float(), atol=1e-5) and torch.allclose(sin, sin_t.float(), atol=1e-5)
    post = apply_rope(k, cos_t, sin_t)
    back = unapply_rope(post, cos, sin)
    assert (back - k).abs().max() < 1e-5
    assert (apply_rope(back, cos, sin) - post).abs().max() < 1e-5


def test_rope_gemma3_per_layer_type():
    model = tiny_random_model("gemma3")
    specs = rope_specs(model)
    types = model.config.layer_types
    assert len(specs) == len(types)
    local = [s for s, t in zip(specs, types) if t == "sliding_attention"]
    glob = [s for s, t in zip(specs, types) if t == "full_attention"]
    assert local and glob and not torch.equal(local[0].inv_freq, glob[0].inv_freq)
