"""Export of head- and MLP-pruned Hugging Face models; transformers reloads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.core.errors import ArtifactError, UnsupportedModelError
from slimtorch.export.hf import export_hf, hf_config_for
from slimtorch.graph.hf_attention import ATTENTION, find_attention
from slimtorch.testing import models as testing_models
from slimtorch.testing.models import tiny_bert, tiny_stack

transformers = pytest.importorskip("transformers")


def tiny_llama() -> nn.Module:
    return testing_models.tiny_llama(std=0.1)


def _slice(lin: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    w = lin.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    lin.weight = nn.Parameter(w.clone())
    if lin.bias is not None and rows is not None:
        lin.bias = nn.Parameter(lin.bias.detach()[rows].clone())
    lin.out_features, lin.in_features = w.shape


def _prune_mlp_llama(model: nn.Module, widths: list[int]) -> None:
    for layer, width in zip(model.model.layers, widths, strict=True):
        keep = torch.randperm(layer.mlp.up_proj.out_features)[:width]
        _slice(layer.mlp.gate_proj, keep, None)
        _slice(layer.mlp.up_proj, keep, None)
        _slice(layer.mlp.down_proj, None, keep)


def _prune_mlp_bert(model: nn.Module, width: int) -> None:
    for layer in model.encoder.layer:
        keep = torch.randperm(layer.intermediate.dense.out_features)[:width]
        _slice(layer.intermediate.dense, keep, None)
        _slice(layer.output.dense, None, keep)


def _prune_heads(model: nn.Module, keeps: list[list[int]]) -> None:
    attns = [m for m in model.modules() if find_attention(m) is not None]
    for module, keep in zip(attns, keeps, strict=True):
        ATTENTION.prune(module, "heads", torch.tensor(keep))


def _same_outputs(a: nn.Module, b: nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        out_a, out_b = a(ids), b(ids)
    key = "logits" if hasattr(out_a, "logits") else "last_hidden_state"
    torch.testing.assert_close(getattr(out_b, key), getattr(out_a, key), atol=1e-5, rtol=0)


def test_unpruned_config_is_unchanged() -> None:
    model = tiny_llama()
    cfg = hf_config_for(model)
    ref = model.config.to_dict()
    assert {k: cfg[k] for k in ref if k not in ("architectures", "dtype")} == {
        k: v for k, v in ref.items() if k not in ("architectures", "dtype")
    }
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "float32"


def test_llama_gqa_heads_and_mlp_export_and_reload(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = tiny_llama()
    _prune_heads(model, [[1], [0]])  # 1 of 2 key/value heads: 4 query heads of 8 per layer
    _prune_mlp_llama(model, [96, 96])
    cfg = hf_config_for(model)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 1, 8)
    assert cfg["intermediate_size"] == 96 and cfg["hidden_size"] == 64
    assert model.config.num_attention_heads == 8  # the model's own config is untouched
    out = export_hf(model, tmp_path / "llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]  # no temporary left
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 1
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, attn_implementation=model.config._attn_implementation
    ).eval()
    assert loaded.model.layers[1].self_attn.q_proj.weight.shape == (32, 64)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    _same_outputs(model, loaded, ids)


def test_bert_mlp_export_and_reload(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = tiny_bert()
    _prune_mlp_bert(model, 20)
    assert hf_config_for(model)["intermediate_size"] == 20
    out = export_hf(model, tmp_path / "bert")
    loaded = transformers.AutoModel.from_pretrained(
        out, local_files_only=True, attn_implementation=model.config._attn_implementation
    ).eval()
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(3))
    _same_outputs(model, loaded, ids)
    with pytest.raises(ArtifactError, match="exists"):
        export_hf(model, out)
    export_hf(model, out, overwrite=True)


def test_bert_pruned_heads_cannot_be_expressed(tmp_path: Path) -> None:
    model = tiny_bert()
    _prune_heads(model, [[0, 1], [2, 3]])
    with pytest.raises(UnsupportedModelError, match=r"no head_dim.*slimtorch\.load"):
        export_hf(model, tmp_path / "bert")
    assert list(tmp_path.iterdir()) == []


def test_non_uniform_heads_name_the_layers(tmp_path: Path) -> None:
    model = tiny_llama()
    _prune_heads(model, [[1], [0, 1]])
    with pytest.raises(UnsupportedModelError, match=r"differ across layers") as info:
        export_hf(model, tmp_path / "x")
    msg = str(info.value)
    assert "(4, 1, 8) in model.layers.0.self_attn" in msg
    assert "(8, 2, 8) in model.layers.1.self_attn" in msg and "slimtorch.load" in msg
    assert list(tmp_path.iterdir()) == []


def test_non_uniform_mlp_names_the_layers() -> None:
    model = tiny_llama()
    _prune_mlp_llama(model, [96, 64])
    with pytest.raises(UnsupportedModelError, match=r"MLP widths \(intermediate_size\)") as info:
        hf_config_for(model)
    assert "model.layers.0.mlp.gate_proj.weight[0]" in str(info.value)
    assert "model.layers.1.mlp" in str(info.value)


def test_not_a_transformers_model() -> None:
    with pytest.raises(UnsupportedModelError, match="not a Hugging Face transformers model"):
        hf_config_for(tiny_stack())


def test_export_copies_the_recorded_tokenizer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from slimtorch.core.info import update_info

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    model = testing_models.tiny_llama()
    update_info(model, tokenizer=str(tmp_path / "tokenizer.json"))
    out = export_hf(model, tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes()
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("hello world").ids == [1, 2]
    update_info(model, tokenizer=str(tmp_path / "gone" / "tokenizer.json"))
    out2 = export_hf(model, tmp_path / "hf2")  # a lost tokenizer is a warning, not a failure
    assert not (out2 / "tokenizer.json").exists() and "not copied" in caplog.text
