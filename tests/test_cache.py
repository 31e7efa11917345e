"""The compressed KV cache (kvquant.cache): equality with the simulated path, storage invariants, generation on every
tiny architecture, refusal of mismatched quantizers, the context limit, and a soak test.

Tolerances: logits from KVQuantCache and from the simulated path (same quantizer, same tokens, fp32 tiny models) agree
to 1e-4 absolute (observed ~5e-7: only float summation order differs).
"""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from transformers import DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import kvquant.cache.kvquant_cache as kc
from kvquant import KVQuantCache, QuantizerError
from kvquant.cache import ContextLengthError, LayerStorage
from kvquant.cache import attention as kv_attention
from kvquant.calibration import CalibrationSettings, build_quantizer, cache_kwarg, collect_statistics
from kvquant.core.codec import outlier_capacity
from kvquant.core.rope import rope_specs
from kvquant.evaluation.harness import SIM_ATTENTION, SimulatedCache, use_sim_attention
from kvquant.evaluation.methods import KVQuantMethod
from kvquant.models import tiny_random_model
from kvquant.quantizer import QuantizerConfig

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"]
ATOL = 1e-4

warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")


_STATS: dict = {}


def _model(arch: str, **overrides):
    m = tiny_random_model(arch, **overrides)
    m.set_attn_implementation("sdpa")
    return m


def _quantizer(model, key: str, bits: int = 3, fraction: float = 0.01, recent_window: int = 0, n_sinks: int = 1):
    """Calibrate on 2 random-token windows (statistics cached per model key)."""
    if key not in _STATS:
        win = torch.randint(3, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
        _STATS[key] = collect_statistics(model, win, CalibrationSettings(outlier_fractions=(0.0, 0.01)),
                                         progress=False)
    cfg = QuantizerConfig(bits=bits, outlier_fraction=fraction, recent_window=recent_window, n_sinks=n_sinks)
    return build_quantizer(_STATS[key], cfg)


def _ids(b: int, t: int, seed: int = 1, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _teacher_forced(model, cache, ids, prefill: int) -> torch.Tensor:
    kw = cache_kwarg(model)
    outs = [model(ids[:, :prefill], use_cache=True, **{kw: cache}).logits[0]]
    for i in range(prefill, ids.shape[1]):
        outs.append(model(ids[:, i : i + 1], use_cache=True, **{kw: cache}).logits[0])
    return torch.cat(outs)


@torch.no_grad()
def _sim_logits(model, q, ids, recent_window: int, method=None) -> torch.Tensor:
    """The simulated evaluation's logits for ``ids`` (``method``: default KVQuantMethod(q))."""
    kw = cache_kwarg(model)
    if recent_window:
        use_sim_attention(model)
        # The simulated band attention needs the SDPA mask (sliding windows, padding) to be built for it.
        AttentionMaskInterface.register(SIM_ATTENTION, sdpa_mask)
    else:
        model.set_attn_implementation("sdpa")
    return model(ids, use_cache=True, **{kw: SimulatedCache(model, method or KVQuantMethod(q))}).logits[0]


# ---- equality with the simulated evaluation path ------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,R,bits",
    [("llama", 0, 3), ("llama", 4, 2), ("qwen3", 0, 4), ("gemma3", 0, 3), ("gemma3", 5, 3), ("phi3", 3, 3)],
)
def test_decode_logits_match_simulated_path(arch, R, bits):
    """Prefill 8 tokens, then feed tokens one by one: every step's logits equal the simulated path's full-sequence
    logits (gemma3: 40 tokens run well past its 16-token sliding window)."""
    m = _model(arch)
    q = _quantizer(m, arch, bits=bits, recent_window=R)
    ids = _ids(1, 40)
    sim = _sim_logits(m, q, ids, R)
    got = _teacher_forced(m, KVQuantCache(q, m, prefill="quantized"), ids, prefill=8)
    ref = m(ids).logits[0]
    assert (sim - ref).abs().max() > 1e-3  # quantization really happened
    torch.testing.assert_close(got, sim, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch,R", [("llama", 0), ("qwen3", 3), ("gemma3", 0)])
def test_exact_prefill_attends_the_prompt_unquantized(arch, R):
    """prefill="exact" (default): the prompt's logits are the fp16 model's; its tokens are stored compressed (layer 0
    holds the same codes as with prefill="quantized", whose keys do not depend on attention); decoding then reads
    the compressed tokens; a second multi-token chunk sees the first one as stored."""
    m = _model(arch)
    q = _quantizer(m, arch, bits=3, recent_window=R)
    ids = _ids(2, 30)
    kw = cache_kwarg(m)
    exact, quant = KVQuantCache(q, m), KVQuantCache(q, m, prefill="quantized")
    with torch.no_grad():
        got = m(ids[:, :20], use_cache=True, **{kw: exact}).logits
        m(ids[:, :20], use_cache=True, **{kw: quant})
        ref = m(ids[:, :20]).logits
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    sa, sb = exact.layers[0].storage, quant.layers[0].storage
    assert (sa.n_s, sa.n_q, sa.n_w) == (sb.n_s, sb.n_q, sb.n_w)
    assert sa.n_q == (20 - 1 - R if not exact.layers[0].is_sliding else m.config.sliding_window - 1)
    assert torch.equal(sa.k_codes[:, :, : sa.n_q], sb.k_codes[:, :, : sb.n_q])
    with torch.no_grad():
        step = m(ids[:, 20:21], use_cache=True, **{kw: exact}).logits[:, -1]
        full = m(ids[:, :21]).logits[:, -1]
        chunk = m(ids[:, 21:], use_cache=True, **{kw: exact}).logits
        full2 = m(ids).logits[:, 21:]
    assert torch.isfinite(step).all() and (step - full).abs().max() > 1e-4  # the cache really is quantized
    assert chunk.shape == full2.shape and (chunk - full2).abs().max() > 1e-4
    assert exact.get_seq_length() == 30


def test_prefill_mode_is_validated():
    m = _model("llama")
    with pytest.raises(ValueError, match="prefill must be"):
        KVQuantCache(_quantizer(m, "llama"), m, prefill="fp16")


# ---- storage invariants -------------------------------------------------------------------------------------------
def _storage(q, layer=0, R=3, sinks=2, batch=2):
    m = _model("llama")
    spec = rope_specs(m)[layer]
    return LayerStorage(q.layers[layer], spec, sinks, R, batch, torch.float32, "cpu", initial_capacity=4)


def test_storage_one_call_equals_token_by_token():
    m = _model("llama")
    q = _quantizer(m, "llama")
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 2, 37, 16, generator=g), torch.randn(2, 2, 37, 16, generator=g)
    pos = torch.arange(37).expand(2, 37)
    a, b = _storage(q), _storage(q)
    a.append(k, v, pos)
    for i in range(37):
        b.append(k[:, :, i : i + 1], v[:, :, i : i + 1], pos[:, i : i + 1])
    assert (a.n_s, a.n_q, a.n_w) == (b.n_s, b.n_q, b.n_w) == (2, 32, 3)
    for name, t in a.tensors().items():
        u = b.tensors()[name]
        n = a.n_q if name.startswith(("k_", "v_", "q_")) else None
        if t.dim() == 4:
            t, u = t[:, :, :n], u[:, :, :n]
        else:
            t, u = t[..., :n], u[..., :n]
        assert torch.equal(t, u), name
    ka, va = a.dequantize()
    kb, vb = b.dequantize()
    assert torch.equal(ka, kb) and torch.equal(va, vb)
    # sinks and window are exact; the quantized region is close to the input
    assert torch.equal(ka[:, :, :2], k[:, :, :2]) and torch.equal(ka[:, :, -3:], k[:, :, -3:])
    assert (ka - k).abs().mean() < 0.5 * k.abs().mean()


def test_model_prefill_equals_token_by_token_storage():
    """A 30-token prompt in one call and token by token leave the same cache contents (codes identical up to rare
    rounding flips from float summation order; decoded values within tolerance)."""
    m = _model("llama")
    q = _quantizer(m, "llama", recent_window=4)
    ids = _ids(1, 30)
    kw = cache_kwarg(m)
    a, b = KVQuantCache(q, m, prefill="quantized"), KVQuantCache(q, m)
    with torch.no_grad():
        m(ids, use_cache=True, **{kw: a})
        for i in range(30):
            m(ids[:, i : i + 1], use_cache=True, **{kw: b})
    for la, lb in zip(a.layers, b.layers):
        sa, sb = la.storage, lb.storage
        assert (sa.n_s, sa.n_q, sa.n_w) == (sb.n_s, sb.n_q, sb.n_w) == (1, 25, 4)
        assert torch.equal(sa.q_pos[:, : sa.n_q], sb.q_pos[:, : sb.n_q])
        flips = (sa.k_codes[:, :, : sa.n_q] != sb.k_codes[:, :, : sb.n_q]).float().mean()
        assert flips < 0.01
        ka, va = sa.dequantize()
        kb, vb = sb.dequantize()
        torch.testing.assert_close(ka, kb, atol=0.05, rtol=0)
        torch.testing.assert_close(va, vb, atol=0.05, rtol=0)


@pytest.mark.parametrize("R", [0, 3])
def test_storage_tensors_own_exactly_their_bytes(R):
    """Every tensor a layer holds owns exactly its bytes, so memory_report is the real allocation: an empty window
    sliced off the prompt's concatenation used to keep an fp16 copy of the whole prompt alive in every layer."""
    m = _model("llama")
    q = _quantizer(m, "llama", recent_window=R)
    cache = KVQuantCache(q, m)
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m(ids, use_cache=True, **{cache_kwarg(m): cache})
        for _ in range(3):
            out = m(out.logits[:, -1:].argmax(-1), use_cache=True, **{cache_kwarg(m): cache})
    for layer in cache.layers:
        for name, t in layer.storage.tensors().items():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (layer.layer_idx, name)
    # and the allocated bytes are the buffers' real sizes: a view that keeps a larger buffer alive is counted in full
    st = cache.layers[0].storage
    kv_before = sum(t.numel() * t.element_size() for t in (st.win_k, st.win_v))
    before = st.component_bytes(used=False)["window"]
    big = torch.zeros(1, st.heads, 100, st.head_dim, dtype=st.dtype)
    st.win_k, st.win_v = big[:, :, 100:], big[:, :, 100:]  # empty views of one buffer: counted once
    assert st.component_bytes(used=False)["window"] == before - kv_before + big.numel() * big.element_size()
    assert st.nbytes() >= big.numel() * big.element_size()


def test_storage_capacity_grows_geometrically():
    m = _model("llama")
    q = _quantizer(m, "llama")
    s = _storage(q, R=0, sinks=0, batch=1)
    caps = []
    for i in range(100):
        s.append(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), torch.tensor([[i]]))
        caps.append(s.capacity)
    assert sorted(set(caps)) == [4, 8, 16, 32, 64, 128]
    assert s.n_q == 100


def test_memory_linear_and_effective_bits():
    """Used bytes grow exactly linearly with tokens and match the stated bits plus outliers, scales and positions;
    allocation stays within 2x of use (geometric growth)."""
    m = _model("llama", head_dim=64, num_key_value_heads=2, num_attention_heads=4)
    kw = cache_kwarg(m)
    H, D, L = 2, 64, 2
    for bits in (2, 3, 4):
        q = _quantizer(m, "llama-d64", bits=bits)
        used = {}
        for n in (65, 129, 257):
            c = KVQuantCache(q, m)
            with torch.no_grad():
                m(_ids(1, n), use_cache=True, **{kw: c})
            r = c.memory_report()
            used[n] = r["bytes_used"]
            assert r["components"]["window"] == 0 and r["tokens"] == n
            assert r["bytes_allocated"] <= 2 * r["bytes_used"] + r["tables_bytes"]
            assert r["fp16_bytes"] == 2 * 2 * H * D * n * L
        assert used[257] - used[129] == 2 * (used[129] - used[65])
        per_tok = (used[129] - used[65]) / 64 / L  # bytes per quantized token per layer
        ck, cv = outlier_capacity(0.01, D), outlier_capacity(0.01, H * D)  # per key head vector, per token's values
        expect = 2 * H * D * bits / 8 + H * ck * 3 + cv * 3 + 4 + 4  # codes, k/v outliers, v zero+scale, q_pos
        assert per_tok == expect
        assert 8 * per_tok / (2 * H * D) <= bits + 0.7


# ---- generation ---------------------------------------------------------------------------------------------------
def _gen(model, cache, ids, am=None, n=20, **extra):
    kw = cache_kwarg(model)
    return model.generate(input_ids=ids, attention_mask=am if am is not None else torch.ones_like(ids),
                          max_new_tokens=n, min_new_tokens=n, **{kw: cache}, **extra)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_matches_simulated_greedy_and_beam(arch):
    """Greedy and beam search with KVQuantCache (R=0) give exactly the simulated path's tokens (batch of 2)."""
    m = _model(arch)
    q = _quantizer(m, arch, bits=2)
    ids = _ids(2, 10)
    for extra in (dict(do_sample=False), dict(num_beams=3, num_return_sequences=2, do_sample=False)):
        out = _gen(m, KVQuantCache(q, m, prefill="quantized"), ids, n=30, **extra)
        ref = _gen(m, SimulatedCache(m, KVQuantMethod(q)), ids, n=30, **extra)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_sampling_and_recent_window(arch):
    m = _model(arch)
    q = _quantizer(m, arch, bits=3, recent_window=4)
    ids = _ids(3, 7)
    torch.manual_seed(0)
    c = KVQuantCache(q, m)
    out = _gen(m, c, ids, n=25, do_sample=True, top_k=10)
    assert out.shape == (3, 32)
    st = c.layers[-1].storage
    assert (st.n_s, st.n_w, st.n_q) == (1, 4, 31 - 1 - 4)
    assert c.get_seq_length() == 31


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_left_padded_batch_equals_rows_alone(arch):
    """Left-padded batch generation uses each row's true RoPE positions: with no sinks (pads would take the sink
    slots) every row gives exactly what it gives alone."""
    m = _model(arch)
    q = _quantizer(m, arch, bits=3, n_sinks=0, recent_window=2)
    ids = _ids(2, 12)
    am = torch.ones_like(ids)
    am[1, :5] = 0
    ids = ids.masked_fill(am == 0, m.config.pad_token_id)
    batch = _gen(m, KVQuantCache(q, m), ids, am, n=20)
    for r, start in ((0, 0), (1, 5)):
        alone = _gen(m, KVQuantCache(q, m), ids[r : r + 1, start:], n=20)
        assert torch.equal(batch[r, 12:], alone[0, 12 - start :])


def test_sliding_window_layers_keep_their_window():
    """Gemma 3 sliding layers hold at most sliding_window - 1 tokens and agree with transformers' mask sizes."""
    m = _model("gemma3")
    sw = m.config.sliding_window
    q = _quantizer(m, "gemma3")
    c = KVQuantCache(q, m)
    ref = DynamicCache(config=m.config)
    out = _gen(m, c, _ids(1, 10), n=40)
    _gen(m, ref, _ids(1, 10), n=40)
    assert out.shape[1] == 50
    for layer, rl in zip(c.layers, ref.layers):
        assert layer.is_sliding == rl.is_sliding
        assert layer.get_seq_length() == rl.get_seq_length() == 49
        for t in (1, 3):
            assert layer.get_mask_sizes(t) == rl.get_mask_sizes(t)
        assert len(layer.storage) == (sw - 1 if layer.is_sliding else 49)


@pytest.mark.parametrize("R", [0, 5])
def test_fp16_sliding_layers(R):
    """sliding_layers="fp16": Gemma 3's sliding layer is transformers' own sliding-window layer (its keys exactly
    DynamicCache's), the global layer stays compressed, and the decode logits equal the simulated evaluation with
    that layer unquantized (KVQuantMethod(fp16_layers=...)), not the all-quantized ones."""
    m = _model("gemma3")
    q = _quantizer(m, "gemma3", bits=2, recent_window=R)
    ids = _ids(1, 40)
    c = KVQuantCache(q, m, prefill="quantized", sliding_layers="fp16")
    assert [type(layer).__name__ for layer in c.layers] == ["FP16SlidingLayer", "KVQuantLayer"]
    got = _teacher_forced(m, c, ids, prefill=8)
    sim = _sim_logits(m, q, ids, R, KVQuantMethod(q, fp16_layers=[0]))
    sim_all = _sim_logits(m, q, ids, R)
    torch.testing.assert_close(got, sim, atol=ATOL, rtol=0)
    assert (sim - sim_all).abs().max() > 1e-3  # the sliding layer really was left unquantized
    ref = DynamicCache(config=m.config)
    _teacher_forced(m, ref, ids, prefill=8)
    assert torch.equal(c.layers[0].keys, ref.layers[0].keys) and c.layers[0].keys.shape[-2] == 15
    assert len(c.layers[1].storage) == 40 and c.get_seq_length() == 40
    for t in (1, 3):
        assert c.layers[0].get_mask_sizes(t) == ref.layers[0].get_mask_sizes(t)
    r = c.memory_report()
    assert r["components"]["fp16_layers"] == 2 * 15 * m.config.num_key_value_heads * m.config.head_dim * 4  # fp32
    assert r["tokens"] == 40 and "fp16_layers" in str(r)
    quantized = KVQuantCache(q, m, prefill="quantized")
    _teacher_forced(m, quantized, ids, prefill=8)
    assert r["effective_bits"] > quantized.memory_report()["effective_bits"]
    out = _gen(m, KVQuantCache(q, m, sliding_layers="fp16"), _ids(2, 10), n=30)  # generate, batch 2
    assert out.shape == (2, 40)


def test_fp16_sliding_layers_errors():
    m = _model("gemma3")
    q = _quantizer(m, "gemma3")
    with pytest.raises(ValueError, match="sliding_layers must be 'quantized' or 'fp16'"):
        KVQuantCache(q, m, sliding_layers="bf16")
    with pytest.raises(ValueError, match=r"fp16_layers \[2\] are not layers"):
        KVQuantMethod(q, fp16_layers=[0, 2])
    mistral = _model("mistral", sliding_window=16)  # every layer sliding: nothing would be compressed
    q_sw = _quantizer(mistral, "mistral-sw")
    with pytest.raises(ValueError, match="every layer of this model is a sliding-window layer"):
        KVQuantCache(q_sw, mistral, sliding_layers="fp16")
    # (the default cache's layers are sliding where transformers' own are, layer_types or not)
    ref = DynamicCache(config=mistral.config)
    assert [layer.is_sliding for layer in KVQuantCache(q_sw, mistral).layers] == [x.is_sliding for x in ref.layers]
    assert all(layer.is_sliding for layer in ref.layers)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        KVQuantCache(q, m, sliding_layers="fp16").crop(1)


# ---- kernel plumbing ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through the Triton append kernel: interpreter only")
def test_kernel_mode_dispatch(monkeypatch):
    """When kvquant.kernels says it is available, decode steps hand the storage to kernels.decode_attention (here a
    reference implementation) and skip dequantizing in update: the logits stay the same."""
    import kvquant.kernels as kernels

    calls = []

    def ref_decode(query, storage, scaling, attention_mask):
        calls.append(storage)
        k, v = storage.dequantize()
        rep = query.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        mask = None if attention_mask is None else attention_mask[..., : k.shape[2]]
        return torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)

    m = _model("llama")
    q = _quantizer(m, "llama", recent_window=3)
    ids = _ids(1, 20)
    base = _teacher_forced(m, KVQuantCache(q, m), ids, prefill=6)
    monkeypatch.setenv("KVQUANT_FUSED_DECODE", "1")
    monkeypatch.setattr(kernels, "available", lambda device: True)
    monkeypatch.setattr(kernels, "decode_attention", ref_decode)
    monkeypatch.setattr(kc, "_KERNEL_OK", {})
    got = _teacher_forced(m, KVQuantCache(q, m), ids, prefill=6)
    monkeypatch.setattr(kc, "_KERNEL_OK", {})
    assert len(calls) == 14 * m.config.num_hidden_layers
    torch.testing.assert_close(got, base, atol=ATOL, rtol=0)


# ---- reliability --------------------------------------------------------------------------------------------------
def test_mismatched_quantizer_refused():
    llama = _model("llama")
    q = _quantizer(llama, "llama")
    with pytest.raises(QuantizerError, match="does not match"):
        KVQuantCache(q, _model("qwen3"))
    with pytest.raises(QuantizerError, match="num_hidden_layers"):
        KVQuantCache(q, _model("llama", num_hidden_layers=3))
    with pytest.raises(QuantizerError, match="num_key_value_heads"):
        KVQuantCache(q, _model("llama", num_key_value_heads=4))


def test_context_limit_is_a_clear_error():
    m = _model("llama", max_position_embeddings=24)
    q = _quantizer(m, "llama")
    with pytest.raises(ContextLengthError, match="context limit of 24"):
        _gen(m, KVQuantCache(q, m), _ids(1, 10), n=20)
    out = _gen(m, KVQuantCache(q, m), _ids(1, 10), n=14)  # exactly up to the limit is fine
    assert out.shape[1] == 24


def test_memory_report_and_reset():
    m = _model("llama")
    q = _quantizer(m, "llama", recent_window=4)
    c = KVQuantCache(q, m)
    _gen(m, c, _ids(2, 10), n=10)
    r = c.memory_report()
    assert r["tokens"] == 19 and r["bytes_used"] > 0 and r["compression_ratio"] > 1
    assert set(r["components"]) == {"codes", "scales", "outliers", "sinks", "window", "positions"}
    assert r["bytes_allocated"] >= r["bytes_used"]
    assert "bits/element" in str(r)
    c.reset()
    assert c.get_seq_length() == 0 and c.memory_report()["bytes_used"] == 0
    out = _gen(m, c, _ids(1, 5), n=5)  # reusable, even with another batch size after reset
    assert out.shape == (1, 10)


def test_soak_batch_and_sequential_generations():
    """A 100-prompt batch and 30 sequential generate calls: memory is what the accounting says, caches are freed,
    hooks and pending attention notes do not accumulate."""
    m = _model("qwen2")
    q = _quantizer(m, "qwen2", recent_window=2)
    c = KVQuantCache(q, m)
    ids = _ids(100, 8)
    am = torch.ones_like(ids)
    am[::3, :3] = 0
    out = _gen(m, c, ids, am, n=8, do_sample=True)
    assert out.shape == (100, 16)
    r = c.memory_report()
    allocated = sum(t.numel() * t.element_size() for layer in c.layers for t in layer.storage.tensors().values())
    assert r["bytes_allocated"] - r["tables_bytes"] == allocated
    for layer in c.layers:
        assert layer.storage.capacity <= max(layer.storage.initial_capacity, 2 * layer.storage.n_q)
    rot = kc.find_rotary_module(m)
    refs = []
    for i in range(30):
        cache = KVQuantCache(q, m)
        _gen(m, cache, _ids(2, 6, seed=i), n=6, do_sample=True)
        assert cache.memory_report()["tokens"] == 11
        refs.append(weakref.ref(cache))
        del cache
    gc.collect()
    assert all(r() is None for r in refs)
    assert len(rot._forward_pre_hooks) == 1
    assert not getattr(kv_attention._pending, "notes", {})


def test_generate_text_streams_and_reports(capsys):
    from kvquant.generate import generate_text

    class ByteTokenizer:  # minimal tokenizer for the 128-token tiny vocabulary
        chat_template = None
        pad_token_id = 0
        eos_token_id = 2

        def __call__(self, text, return_tensors=None, **kw):
            ids = torch.tensor([[3 + (ord(ch) % 120) for ch in text]])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def decode(self, ids, skip_special_tokens=True, **kw):
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
            return "".join(chr(97 + (i % 26)) for i in ids if not (skip_special_tokens and i < 3))

        def batch_decode(self, seqs, **kw):
            return [self.decode(s, **kw) for s in seqs]

    m = _model("llama")
    q = _quantizer(m, "llama")
    text, report = generate_text(m, ByteTokenizer(), "hello world", q, max_new_tokens=12, recent_window=4)
    assert isinstance(text, str) and report["tokens"] > 11 and report["recent_window"] == 4
    assert capsys.readouterr().out.strip()  # streamed
    with pytest.raises(ContextLengthError):
        generate_text(m, ByteTokenizer(), "x" * 500, q, max_new_tokens=100, stream=False)
