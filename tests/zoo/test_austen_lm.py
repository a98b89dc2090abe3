"""Builtin austen-lm: committed Llama (GQA) weights, tokenizer, loading without network."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.core.errors import ArtifactError, UserInputError
from slimtorch.eval.perplexity import perplexity_of_ids
from slimtorch.models.registry import MODELS, load_model, rebuild
from slimtorch.zoo import austen_lm, data_text
from slimtorch.zoo.train_austen_lm import LMTrainSpec, lr_at, train_tokenizer

# Measured when training (see weights/austen_lm/training.json): well above it, far below uniform.
PPL_BOUND = 200.0


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return austen_lm.build(True)


def test_registered() -> None:
    info = MODELS.get("austen-lm")
    assert (info.evaluator, info.data, info.task) == ("perplexity", "builtin:austen", "causal-lm")


def test_architecture_is_llama_with_gqa(model: nn.Module) -> None:
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert model.model.layers[0].self_attn.k_proj.out_features == (
        cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    )
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32


def test_weights_small_fp16_and_tied() -> None:
    from safetensors import safe_open

    path = austen_lm.WEIGHTS_DIR / austen_lm.WEIGHTS_FILE
    assert path.stat().st_size < 30e6
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert "lm_head.weight" not in keys
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}


def test_tokenizer_round_trip_and_vocab(model: nn.Module) -> None:
    tok = austen_lm.load_tokenizer(austen_lm.builtin_tokenizer_path())
    assert tok.get_vocab_size() == model.config.vocab_size
    assert tok.token_to_id(austen_lm.EOS_TOKEN) == model.config.eos_token_id == 0
    text = 'It is a truth universally acknowledged,\n  "Élan" — 3.14 naïve 日本 \t!'
    ids = austen_lm.encode(text, tok)
    assert tok.decode(ids.tolist()) == text
    # BPE merges: ordinary English takes well under one token per character
    prose = "She was not a woman of many words, and her manners were very pleasing."
    assert austen_lm.encode(prose, tok).numel() < len(prose) / 2.5


def test_tokenizer_training_is_deterministic() -> None:
    texts = ["the cat sat on the mat; the dog sat on the log. " * 20, "a b c abc abcd " * 30]
    first = train_tokenizer(texts, 300).to_str()
    assert train_tokenizer(texts, 300).to_str() == first


def test_lr_schedule() -> None:
    spec = LMTrainSpec(steps=100, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, spec) == pytest.approx(0.1) and lr_at(9, spec) == pytest.approx(1.0)
    assert lr_at(10, spec) == pytest.approx(1.0) and lr_at(100, spec) == pytest.approx(0.1)


def test_heldout_perplexity_far_below_uniform(model: nn.Module) -> None:
    ids = austen_lm.encoded_split("builtin:austen", "heldout")
    context = model.config.max_position_embeddings
    nll, tokens = perplexity_of_ids(model, ids[: 16 * context], context)
    assert tokens == 16 * (context - 1)
    assert math.exp(nll) < PPL_BOUND < model.config.vocab_size / 5


def test_example_inputs(model: nn.Module) -> None:
    (ids,) = austen_lm.example_inputs(3)
    assert ids.shape == (3, 128) and ids.dtype == torch.int64
    assert not torch.equal(ids[0], ids[1])
    assert model(ids).logits.shape == (3, 128, model.config.vocab_size)


def test_load_model_and_rebuild(model: nn.Module) -> None:
    loaded = load_model("builtin:austen-lm")
    assert (loaded.evaluator, loaded.task) == ("perplexity", "causal-lm")
    fresh = rebuild(loaded.architecture)
    assert type(fresh) is type(model)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_transformers_loads_the_directory_offline(model: nn.Module) -> None:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    hf = AutoModelForCausalLM.from_pretrained(austen_lm.WEIGHTS_DIR, local_files_only=True)
    ids = torch.tensor([[5, 99, 400, 7, 1000, 3]])
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, model(ids).logits)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(austen_lm.builtin_tokenizer_path()))
    assert tok.decode(tok("Mr. Darcy")["input_ids"]) == "Mr. Darcy"


def test_missing_weights_name_the_training_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(austen_lm, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ArtifactError, match="train_austen_lm"):
        austen_lm.build(False)


def test_missing_austen_names_the_debian_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bypass the per-process caches without clearing them (other tests keep their text).
    monkeypatch.setattr(data_text, "austen_dirs", lambda: [tmp_path])
    monkeypatch.setattr(data_text, "load_austen", data_text.load_austen.__wrapped__)
    monkeypatch.setattr(data_text, "austen_split", data_text.austen_split.__wrapped__)
    with pytest.raises(UserInputError, match="r-cran-janeaustenr"):
        austen_lm.encoded_split.__wrapped__("builtin:austen", "heldout")


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"tokenizer\.json"):
        austen_lm.load_tokenizer(tmp_path)


def test_chunked_encoding_gives_the_ids_of_the_whole_text(monkeypatch: pytest.MonkeyPatch) -> None:
    tok = austen_lm.load_tokenizer(austen_lm.builtin_tokenizer_path())
    text = data_text.austen_split("heldout")[:20_000]
    text += "\nend \n x\n\n  y\nz.\nQ" * 50  # newlines next to spaces must not be cut at
    monkeypatch.setattr(austen_lm, "CHUNK_CHARS", 97)
    cuts = austen_lm.safe_cuts(text, 97)
    assert len(cuts) > 100 and cuts == sorted(set(cuts)) and cuts[-1] == len(text)
    for c in cuts[1:-1]:
        assert text[c - 1] == "\n" and not text[c].isspace() and not text[c - 2].isspace()
    whole = torch.tensor(tok.encode(text, add_special_tokens=False).ids, dtype=torch.int64)
    chunked = torch.cat([austen_lm.encode(text[a:b], tok) for a, b in itertools.pairwise(cuts)])
    assert torch.equal(chunked, whole)
    assert torch.equal(austen_lm.encode(text, tok), whole)
