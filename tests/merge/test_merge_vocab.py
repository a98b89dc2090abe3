"""Merging models whose vocabularies differ: mergekit's tokenizer_source union / base / MODEL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slimtorch.core.errors import ConfigError
from slimtorch.merge.mergekit import parse_config
from slimtorch.merge.stream import merge_to_dir
from slimtorch.merge.vocab import TokenSource, align_vocabulary, padded_size

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def test_rows_follow_mergekits_default_rules() -> None:
    """Tokens of every model keep their own rows; a token one model lacks comes from the only
    model that has it, else the base, else the mean; forced and zero sources; padding = mean."""
    vocab = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
    m0 = torch.tensor([[1.0], [2.0], [3.0], [0.0]])  # a b c + d at row 3
    m1 = torch.tensor([[10.0], [20.0], [40.0]])  # a b e
    m2 = torch.tensor([[100.0], [300.0], [500.0]])  # a c e
    perms = [
        {0: 0, 1: 1, 2: 2, 3: 3, 4: -1},
        {0: 0, 1: 1, 2: -1, 3: -1, 4: 2},
        {0: 0, 1: -1, 2: 1, 3: -1, 4: 2},
    ]
    out = align_vocabulary([m0, m1, m2], perms, vocab, 6, 0, {}, [{}, {}, {}])
    assert out[0].flatten().tolist() == pytest.approx(
        [1, 2, 3, 0, 270, 55.2]
    )  # e: mean of m1, m2 (no base)
    assert out[1].flatten().tolist()[:5] == [10, 20, 3, 0, 40]  # c, d: from the base
    assert out[2].flatten().tolist()[:5] == [100, 2, 300, 0, 500]
    chosen = {"a": TokenSource("zero", force=True), "e": TokenSource("model", model=1)}
    chosen["d"] = TokenSource("model_token", model=1, token="b")
    out = align_vocabulary([m0, m1, m2], perms, vocab, 5, 0, chosen, [{}, {"b": 1}, {}])
    assert [o[0].item() for o in out] == [0, 0, 0]  # forced even where present
    assert out[0][4].item() == 40 and out[2][4].item() == 500  # e: m1 where absent only
    assert out[1][3].item() == 20 and out[2][3].item() == 20 and out[0][3].item() == 0
    assert padded_size(5, 4) == 8 and padded_size(8, 4) == 8 and padded_size(5, None) == 5


def _tokenizer(words: list[str]) -> object:
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, "t0")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def two_vocab_models(tmp: Path) -> tuple[list[str], list[str]]:
    """Tiny Llamas `a` (t0..t63) and `b` (t0..t59, u0..u3): 60 shared tokens, 4 of each own."""
    words_a = [f"t{i}" for i in range(64)]
    words_b = [f"t{i}" for i in range(60)] + [f"u{i}" for i in range(4)]
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=False,
    )  # fmt: skip
    for seed, (name, words) in enumerate((("a", words_a), ("b", words_b))):
        torch.manual_seed(seed)
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp / name)
        _tokenizer(words).save_pretrained(tmp / name)  # type: ignore[attr-defined]
    return words_a, words_b


def union_config(tmp: Path, **extra: object) -> dict[str, object]:
    return {
        "merge_method": "linear",
        "base_model": str(tmp / "a"),
        "models": [
            {"model": str(tmp / "a"), "parameters": {"weight": 0.5}},
            {"model": str(tmp / "b"), "parameters": {"weight": 0.5}},
        ],
        "tokenizer_source": "union",
        **extra,
    }


def test_union_merge_aligns_tokens_and_reloads(tmp_path: Path) -> None:
    two_vocab_models(tmp_path)
    report = merge_to_dir(parse_config(union_config(tmp_path)), tmp_path / "out")
    assert report["vocab_size"] == 68
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in "ab")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    vocab = tok.get_vocab()
    assert len(vocab) == 68 and [vocab[f"u{i}"] for i in range(4)] == [64, 65, 66, 67]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (68, 16)
        shared = (a[name][5] + b[name][5]) / 2  # linear: 0.5 / 0.5 of each model's own row
        assert torch.allclose(out[name][vocab["t5"]], shared)
        assert torch.equal(out[name][vocab["t62"]], a[name][62])  # only a has it
        assert torch.equal(out[name][vocab["u1"]], b[name][61])  # only b has it
    assert torch.equal(
        out["model.norm.weight"], (a["model.norm.weight"] + b["model.norm.weight"]) / 2
    )
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["vocab_size"] == 68
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    ids = tok("t1 u2 t63", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[1, 66, 63]] and model(ids).logits.shape == (1, 3, 68)


def test_base_source_padding_and_errors(tmp_path: Path) -> None:
    two_vocab_models(tmp_path)
    cfg = union_config(tmp_path, tokenizer={"source": "base", "pad_to_multiple_of": 48})
    del cfg["tokenizer_source"]
    report = merge_to_dir(parse_config(cfg), tmp_path / "base")
    out = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert report["vocab_size"] == 96 and out["lm_head.weight"].shape == (96, 16)
    rows = out["lm_head.weight"]
    assert torch.allclose(rows[64:], rows[:64].mean(0).expand(32, 16))  # padding: the mean
    bad = union_config(tmp_path, tokenizer={"tokens": {"x": {"source": str(tmp_path / "c")}}})
    del bad["tokenizer_source"]
    with pytest.raises(ConfigError, match="not one of the merged models"):
        merge_to_dir(parse_config(bad), tmp_path / "bad")
    with pytest.raises(ConfigError, match=r"tokenizer\.tokens must map"):
        parse_config(union_config(tmp_path, tokenizer={"tokens": {"x": "zero"}}))
    plain = union_config(tmp_path)
    del plain["tokenizer_source"]
    with pytest.raises(ConfigError, match="tokenizer_source: union"):
        merge_to_dir(parse_config(plain), tmp_path / "plain")  # b's 4 tokens are not a's
    assert not (tmp_path / "bad").exists() and not (tmp_path / "plain").exists()


def test_cli_merges_a_union(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from slimtorch.cli.main import main

    two_vocab_models(tmp_path)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(union_config(tmp_path)), encoding="utf-8")
    assert main(["merge", str(path), "--out", str(tmp_path / "o"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 68
