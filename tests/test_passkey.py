"""Passkey / needle-in-a-haystack evaluation (kvquant.evaluation.passkey): exact prompt lengths and needle depths, the
simulated baseline cache, and a tiny end-to-end run of every compared cache on a random tiny model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from kvquant.calibration import CalibrationSettings, build_quantizer, cache_kwarg, collect_statistics
from kvquant.evaluation import passkey as pk
from kvquant.evaluation.methods import KIVI, UniformPerToken
from kvquant.models import tiny_random_model
from kvquant.quantizer import QuantizerConfig

pytestmark = pytest.mark.usefixtures("one_thread")
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")

PROSE = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
         "of a wife. However little known the feelings or views of such a man may be on his first entering a "
         "neighbourhood, this truth is so well fixed in the minds of the surrounding families! Is he married or "
         "single? ")


class ByteTokenizer:
    """One token per ASCII character (ids 3..127 fit the tiny models' 128-token vocabulary)."""

    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(max(ord(c), 3), 127) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i >= 3)

    def batch_decode(self, seqs, skip_special_tokens=True):
        return [self.decode(s) for s in seqs]


@pytest.fixture(scope="module")
def hay():
    return pk.make_haystack(ByteTokenizer(), text=PROSE * 40, min_tokens=4000)


@pytest.mark.parametrize("task", pk.TASKS)
@pytest.mark.parametrize("context", [420, 457, 1000])
def test_prompt_exact_length_and_depth(hay, task, context):
    tok = ByteTokenizer()
    for depth in pk.DEPTHS:
        for p in pk.make_trials(hay, tok, task, context, depth, 3, seed=1):
            ids = p.input_ids.tolist()
            assert len(ids) == context
            text = tok.decode(ids)
            assert text.startswith(pk.PREAMBLE)
            assert text.endswith("is")  # "... The pass key is" / "... magic number for <city> is"
            needle = tok.decode(ids[p.needle_start : p.needle_start + p.needle_tokens])
            assert p.answer in needle and len(p.answer) == pk.KEY_DIGITS[task]
            assert text.count(p.answer) == (2 if task == "passkey" else 1)
            # The needle sits at the asked depth of the haystack, up to the snap to a sentence start.
            assert abs(p.actual_depth - depth) * p.haystack_tokens <= pk.SNAP + 1
            if depth == 0.0:
                assert p.needle_start == p.haystack_start
            if depth == 1.0:
                assert p.needle_start == p.haystack_start + p.haystack_tokens  # right before the question
            if task == "needle":
                city = needle.split(" for ")[1].split(" is ")[0]
                assert text.endswith(f"magic number for {city} is")


def test_trials_differ_by_key_and_offset(hay):
    ps = pk.make_trials(hay, ByteTokenizer(), "passkey", 400, 0.5, 8, seed=0)
    assert len({p.answer for p in ps}) == 8
    assert len({p.offset for p in ps}) > 1
    assert len({p.input_ids.numel() for p in ps}) == 1
    again = pk.make_trials(hay, ByteTokenizer(), "passkey", 400, 0.5, 8, seed=0)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(ps, again))  # deterministic


def test_success_criterion():
    assert pk._digits_found(" 73915. Remember", "73915")
    assert pk._digits_found(" 7 3 9 1 5", "73915")
    assert not pk._digits_found(" 73951.", "73915")


@pytest.fixture(scope="module")
def tiny():
    m = tiny_random_model("llama")
    m.set_attn_implementation("sdpa")
    win = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(m, win, CalibrationSettings(outlier_fractions=(0.01,), bins=256), progress=False)
    qs = {b: build_quantizer(stats, QuantizerConfig(bits=b, outlier_fraction=0.01)) for b in (4, 3, 2)}
    return m, qs


@torch.no_grad()
def test_simulated_cache_quantizes_tokens_once_out_of_window(tiny):
    m, _ = tiny
    kw = cache_kwarg(m)
    ids = torch.randint(3, 128, (2, 100), generator=torch.Generator().manual_seed(2))
    ref = pk.DynamicCache(config=m.config)
    m(ids, use_cache=True, **{kw: ref})
    kivi = pk.SimulatedQuantizedCache(m, KIVI(2, group=32, residual=0), recent_window=16, group=32)
    for s in range(0, 100, 30):  # multi-token steps go through the band attention
        m(ids[:, s : s + 30], use_cache=True, **{kw: kivi})
    # 100 tokens, window 16: 2 complete groups of 32 are out of the window and quantized, 36 stay exact.
    assert kivi.n_quantized[0] == 64
    k_ref, k = ref.layers[0].keys, kivi.layers[0].keys
    assert torch.equal(k[:, :, 64:], k_ref[:, :, 64:])
    assert not torch.allclose(k[:, :, :64], k_ref[:, :, :64])
    int4 = pk.SimulatedQuantizedCache(m, UniformPerToken(4))
    m(ids[:, :10], use_cache=True, **{kw: int4})
    assert int4.n_quantized[0] == 10  # every token at once


def test_tiny_run_rows(tiny, hay, tmp_path):
    m, qs = tiny
    methods = pk.make_methods(pk.METHODS, qs)
    rows = pk.run_passkey(m, ByteTokenizer(), methods, contexts=(420,), depths=(0.5,), trials_per_depth=2,
                          tasks=pk.TASKS, haystack=hay, prefill_chunk=128, progress=None)
    assert len(rows) == len(pk.METHODS) * 2  # methods x tasks
    for r in rows:
        for k in ("task", "method", "bits", "outlier_fraction", "recent_window", "context", "depth", "trials",
                  "accuracy"):
            assert k in r
        assert 0.0 <= r["accuracy"] <= 1.0 and r["trials"] == 2 and r["context"] == 420
        assert r["prompt_tokens"] + r["new_tokens"] == 420
    assert {r["method"] for r in rows} >= {"fp16", "nuq3-1%", "nuq3-1% R128", "KIVI-2", "KIVI-4", "int4"}
    paths = pk.write_report(rows, tmp_path / "pk", {"command": "test"})
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    doc = json.loads(paths[0].read_text())
    assert doc["command"] == "test" and len(doc["rows"]) == len(rows) and "passkey" in doc["summary"]
    assert "Longest context" in paths[1].read_text()


def test_summary_longest_context():
    def row(method, ctx, correct):
        return {"task": "passkey", "method": method, "context": ctx, "depth": 0.5, "trials": 50, "correct": correct,
                "accuracy": correct / 50}

    rows = [row("fp16", 1024, 50), row("nuq3-1%", 1024, 49), row("fp16", 2048, 46), row("nuq3-1%", 2048, 44),
            row("fp16", 4096, 40), row("nuq3-1%", 4096, 10)]
    s = pk.summarize(rows, "passkey")
    assert s["longest"] == 2048 and s["all_eligible_pass"]  # 4096: fp16 below 90%, not counted
    rows[3] = row("nuq3-1%", 2048, 40)
    s = pk.summarize(rows, "passkey")
    assert s["longest"] == 1024 and not s["all_eligible_pass"]
