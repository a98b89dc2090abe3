"""A causal LM's text goes through its own tokenizer; the LLM quality suite in compress and eval.

A tiny Llama saved as a Hugging Face directory with a tiny byte-level BPE tokenizer.json of its
own (trained here on Wikipedia text, 400 tokens), as a user's model directory would be.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtorch.calibrate.tasks import make_task
from slimtorch.calibrate.text import load_text
from slimtorch.cli.main import main
from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.models.registry import load_model
from slimtorch.workflows.compress import CompressOptions, compress_to_dir
from slimtorch.workflows.evaluate import evaluate_dir
from slimtorch.workflows.offloaded import compress_large

CTX = Context(progress=False)
VOCAB = 400
GPTQ = """stages:
  - method: quantize.gptq
    bits: 4
    group_size: 16
    calibration: {samples: 4, batch_size: 2}
"""


def _tokenizer(text: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([text[:100_000]], trainer)
    return tok


@pytest.fixture(scope="module")
def ascii_wiki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = load_text("builtin:wikipedia").encode("ascii", "ignore").decode()
    path = tmp_path_factory.mktemp("text") / "wiki.txt"
    path.write_text(text, encoding="utf-8")
    return path


def _save_llm(where: Path, with_tokenizer: bool, text: str) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(where)
    if with_tokenizer:
        _tokenizer(text).save(str(where / "tokenizer.json"))
    return where


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory, ascii_wiki: Path) -> Path:
    return _save_llm(tmp_path_factory.mktemp("llm") / "model", True, ascii_wiki.read_text())


def test_calibration_ids_are_the_models_own_tokens(
    llm_dir: Path, ascii_wiki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenizers import Tokenizer

    from slimtorch.zoo import austen_lm

    def austen_tokenizer_used() -> Path:
        raise AssertionError("builtin:austen-lm's tokenizer was used for a model with its own")

    monkeypatch.setattr(austen_lm, "builtin_tokenizer_path", austen_tokenizer_used)
    loaded = load_model(str(llm_dir))
    assert loaded.tokenizer == str((llm_dir / "tokenizer.json").resolve())
    task = make_task("causal-lm", str(ascii_wiki), loaded.tokenizer)
    windows = task.calibration_windows(4, 48, seed=0)  # type: ignore[attr-defined]
    assert int(windows.max()) < VOCAB
    own = Tokenizer.from_file(loaded.tokenizer)
    text = ascii_wiki.read_text()
    for row in windows.tolist():
        decoded = own.decode(row)
        assert len(decoded) > 48 and decoded in text  # the source text, not gibberish
    wiki = make_task("causal-lm", "builtin:wikipedia", loaded.tokenizer)
    assert int(wiki.ids.max()) < VOCAB  # type: ignore[attr-defined]


def test_causal_lm_without_tokenizer_is_refused(
    tmp_path: Path, ascii_wiki: Path, llm_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = _save_llm(tmp_path / "bare", False, "")
    assert load_model(str(bare)).tokenizer is None
    options = CompressOptions(data="builtin:wikipedia")
    with pytest.raises(UserInputError, match=r"without a tokenizer.*--tokenizer"):
        compress_to_dir(str(bare), str(_recipe(tmp_path)), tmp_path / "o", options, CTX)
    argv = ["compress", "--model", str(bare), "--recipe", str(_recipe(tmp_path))]
    code = main([*argv, "--data", "builtin:wikipedia", "--out", str(tmp_path / "o")])
    assert code == 2 and "--tokenizer" in capsys.readouterr().err
    with pytest.raises(UserInputError, match=r"without a tokenizer.*--tokenizer"):
        compress_large(bare, _load(tmp_path), tmp_path / "o", None, 10**10, tmp_path / "w", CTX)
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()
    # builtin:austen-lm's 2,048-token ids do not fit a 400-token model: named, not run
    options = CompressOptions(data=str(ascii_wiki), tokenizer="builtin:austen-lm")
    with pytest.raises(UserInputError, match="not the model's"):
        compress_to_dir(str(llm_dir), str(_recipe(tmp_path)), tmp_path / "o", options, CTX)


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "gptq.yaml"
    path.write_text(GPTQ)
    return path


def _load(tmp_path: Path) -> Any:
    from slimtorch.recipe import load_recipe

    return load_recipe(str(_recipe(tmp_path)))


def test_compress_and_eval_report_the_llm_suite(
    llm_dir: Path, ascii_wiki: Path, tmp_path: Path
) -> None:
    options = CompressOptions(data=str(ascii_wiki), llm_windows=2, llm_window_tokens=64)
    report = compress_to_dir(str(llm_dir), str(_recipe(tmp_path)), tmp_path / "a", options, CTX)
    assert 0 < report["kld_mean"] <= report["kld_p99"]
    assert 0 < report["top1_agreement"] <= 1
    assert report["perplexity"] > 1 and report["baseline_perplexity"] > 1
    suite = report["llm_suite"]
    assert set(suite["texts"]) == {"builtin:wikipedia", "builtin:austen"}
    assert suite["window_tokens"] == 64 and suite["texts"]["builtin:austen"]["windows"] == 2
    assert report["positions"] == 2 * 2 * 63
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["metadata"]["tokenizer"] == str((llm_dir / "tokenizer.json").resolve())
    again = evaluate_dir(tmp_path / "a", ctx=CTX, llm_suite=(2, 64))
    for key in ("perplexity", "baseline_perplexity", "kld_mean", "kld_p99", "top1_agreement"):
        assert again[key] == pytest.approx(report[key], rel=1e-6), key
    skipped = evaluate_dir(tmp_path / "a", ctx=CTX, llm_suite=(0, 64))
    assert "kld_mean" not in skipped


def test_offloaded_run_uses_the_tokenizer_beside_the_config(
    llm_dir: Path, ascii_wiki: Path, tmp_path: Path
) -> None:
    manifest = compress_large(llm_dir, _load(tmp_path), tmp_path / "off", str(ascii_wiki), 10**10,
                              tmp_path / "w", CTX)  # fmt: skip
    assert manifest["metadata"]["tokenizer"] == str((llm_dir / "tokenizer.json").resolve())
