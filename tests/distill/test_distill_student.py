"""distill.student: shrink_layers on Hugging Face models, saved and reloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimtorch import api
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.distill.student import (
    check_keep,
    find_layer_list,
    layer_pairs,
    shrink_layers,
)
from slimtorch.formats.state import WeightState, apply_state, get_state
from slimtorch.testing import models as testing_models
from slimtorch.testing.models import tiny_cnn

transformers = pytest.importorskip("transformers")


def tiny_bert(layers: int = 4, vocab: int = 99) -> torch.nn.Module:
    return testing_models.tiny_bert(layers, vocab=vocab)


def test_shrink_bert_keeps_exactly_the_chosen_layers() -> None:
    model = tiny_bert(4)
    old = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in model.encoder.layer]
    shrink_layers(model, [0, 3])
    assert len(model.encoder.layer) == 2
    assert model.config.num_hidden_layers == 2
    for new_i, old_i in enumerate([0, 3]):
        sd = model.encoder.layer[new_i].state_dict()
        assert sd.keys() == old[old_i].keys()
        assert all(torch.equal(sd[k], old[old_i][k]) for k in sd)
    ids = torch.randint(0, 99, (2, 7))
    assert model(ids).last_hidden_state.shape == (2, 7, 32)


def test_shrunk_bert_saves_and_reloads_through_a_recipe(tmp_path: Path) -> None:
    model = tiny_bert(4)
    w = model.encoder.layer[2].intermediate.dense.weight
    mask = w.detach().abs() > w.detach().abs().median()
    apply_state(model.encoder.layer[2].intermediate.dense, "weight", WeightState(mask=mask))
    recipe = {"stages": [{"method": "distill.shrink", "keep": [1, 2]}]}
    result = api.compress(model, recipe, ctx=Context(progress=False))
    assert len(model.encoder.layer) == 4  # the input model is untouched
    student = result.model
    # the pruned layer moved to position 1 with its mask
    state = get_state(student.encoder.layer[1].intermediate.dense, "weight")
    assert state is not None and state.mask is not None and torch.equal(state.mask, mask)
    api.save(student, tmp_path / "out")
    loaded = api.load(tmp_path / "out")
    assert len(loaded.encoder.layer) == 2 and loaded.config.num_hidden_layers == 2
    ids = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = student(ids).last_hidden_state, loaded(ids).last_hidden_state
    assert torch.equal(a, b)
    reloaded_state = get_state(loaded.encoder.layer[1].intermediate.dense, "weight")
    assert reloaded_state is not None and torch.equal(reloaded_state.mask, mask)


def test_shrink_llama_updates_layer_types_and_cache_indices() -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert find_layer_list(model)[0] == "model.layers"
    shrink_layers(model, [0, 2])
    assert model.config.num_hidden_layers == 2
    assert model.model.layers[1].self_attn.layer_idx == 1
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 2
    ids = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_keep_and_layer_list_errors() -> None:
    with pytest.raises(ConfigError, match="empty"):
        check_keep([], 4)
    with pytest.raises(ConfigError, match="out of range"):
        check_keep([0, 4], 4)
    with pytest.raises(ConfigError, match="strictly increasing"):
        check_keep([2, 1], 4)
    with pytest.raises(UnsupportedModelError, match="ModuleList"):
        find_layer_list(tiny_cnn())
    with pytest.raises(ConfigError, match=r"not an nn\.ModuleList"):
        shrink_layers(tiny_bert(2), [0], layers="encoder")


def test_layer_pairs_map_student_to_kept_teacher_layers() -> None:
    pairs = layer_pairs("encoder.layer", [1, 3, 5], "cosine")
    assert [(p.student, p.teacher, p.loss) for p in pairs] == [
        ("encoder.layer.0", "encoder.layer.1", "cosine"),
        ("encoder.layer.1", "encoder.layer.3", "cosine"),
        ("encoder.layer.2", "encoder.layer.5", "cosine"),
    ]
