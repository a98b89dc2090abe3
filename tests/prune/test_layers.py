"""prune.layers: block influence maths, block choice, and the stage on a tiny random Llama."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, UnsupportedModelError, UserInputError
from slimtorch.core.info import model_info
from slimtorch.core.methods import Run
from slimtorch.graph.surgery import keep_blocks
from slimtorch.prune.layers import (
    InfluenceSum,
    check_blocks,
    drop_count,
    influence_terms,
    lowest,
    next_token_kld,
)
from slimtorch.prune.stages.layers import LayersConfig, block_scores
from slimtorch.recipe.recipe import parse_stage
from slimtorch.testing.models import example_input, tiny_cnn, tiny_llama, with_example_input
from slimtorch.testing.tasks import tensor_task

pytest.importorskip("transformers")


# ------------------------------------------------------------------ the maths


def test_influence_is_one_minus_cosine_per_token() -> None:
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [1.0, 1.0]]])
    y = torch.tensor([[[2.0, 0.0], [0.0, -1.0], [-4.0, 3.0], [1.0, 0.0]]])
    terms = influence_terms(x, y)
    expected = [0.0, 2.0, 1.0, 1 - 1 / math.sqrt(2)]
    assert terms.dtype == torch.float64 and terms.shape == (4,)
    assert terms.tolist() == pytest.approx(expected, abs=1e-12)
    zeros = torch.zeros(1, 2, 3)
    assert influence_terms(zeros, zeros).tolist() == [0.0, 0.0]  # unchanged zero vectors


def test_influence_sum_is_the_mean_over_every_token_of_every_batch() -> None:
    acc = InfluenceSum()
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    acc.update(x, -x)  # two tokens of 2
    acc.update(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 5.0]]))  # one token of 0
    assert acc.mean() == pytest.approx(4 / 3)
    with pytest.raises(ConfigError, match="no calibration tokens"):
        InfluenceSum().mean()
    with pytest.raises(ConfigError, match="not shaped like its input"):
        influence_terms(torch.zeros(2, 3), torch.zeros(2, 4))


def test_next_token_kld() -> None:
    base = torch.tensor([[[0.0, 0.0]], [[1.0, -1.0]]])
    assert float(next_token_kld(base, base)) == pytest.approx(0.0, abs=1e-12)
    other = torch.zeros_like(base)
    p = torch.softmax(torch.tensor([1.0, -1.0], dtype=torch.float64), -1)
    kl = float((p * (p / 0.5).log()).sum())
    assert float(next_token_kld(base, other)) == pytest.approx(kl / 2)


def test_block_choice_and_counts() -> None:
    assert lowest([0.5, 0.1, 0.9, 0.1, 0.3], 2) == [1, 3]
    assert lowest([0.2, 0.2, 0.2], 1) == [2]  # ties: the later block goes first
    assert drop_count(30, fraction=0.1) == 3
    assert drop_count(30, fraction=0.3) == 9
    assert drop_count(4, fraction=0.05) == 1  # at least one
    assert drop_count(30, count=6) == 6
    with pytest.raises(ConfigError, match="keep at least one"):
        drop_count(4, count=4)
    with pytest.raises(ConfigError, match="exactly one"):
        drop_count(4)
    assert check_blocks([3, 1], 5) == [1, 3]
    with pytest.raises(ConfigError, match="out of range"):
        check_blocks([5], 5)
    with pytest.raises(ConfigError, match="twice"):
        check_blocks([1, 1], 5)
    with pytest.raises(ConfigError, match="keep at least one"):
        check_blocks([0, 1], 2)


# ------------------------------------------------------------------ the stage


def _llama(layers: int = 4) -> nn.Module:
    return with_example_input(tiny_llama(layers=layers, std=0.05))


def _identity_block(model: nn.Module, i: int) -> None:
    """Zero the residual branches of block ``i``: its output is exactly its input."""
    layer: Any = model.model.layers[i]  # type: ignore[union-attr,index]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def _compress(model: nn.Module, stage: dict[str, Any], data: bool = True) -> nn.Module:
    x = example_input(model, batch=8)
    task = tensor_task(x, loss="next_token") if data else None
    stage = {"method": "prune.layers", "calibration": {"samples": 8, "batch_size": 4}, **stage}
    return st.compress(model, [stage], data=task, ctx=Context(progress=False)).model


@pytest.mark.parametrize("criterion", ["influence", "kld"])
def test_a_block_that_does_nothing_is_dropped_and_outputs_stay_the_same(criterion: str) -> None:
    model = _llama(4)
    _identity_block(model, 1)
    x = example_input(model, batch=2)
    with torch.no_grad():
        before = model(x).logits
    out = _compress(model, {"count": 1, "criterion": criterion})
    layers: Any = out.model.layers  # type: ignore[union-attr]
    assert len(layers) == 3 and out.config.num_hidden_layers == 3  # type: ignore[union-attr]
    assert [b.self_attn.layer_idx for b in layers] == [0, 1, 2]
    assert model_info(out).kept_layers == [0, 2, 3]
    assert model_info(out).architecture["config"]["num_hidden_layers"] == 3  # type: ignore[index]
    with torch.no_grad():
        after = out(x).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)  # the rest untouched


def test_loss_criterion_measures_the_loss_change_of_dropping_each_block() -> None:
    model = _llama(4)
    _identity_block(model, 1)
    x = example_input(model, batch=8)
    task = tensor_task(x, loss="next_token")
    options = {"count": 1, "criterion": "loss", "calibration": {"samples": 8, "batch_size": 8}}
    config = LayersConfig.model_validate(options)
    costs = block_scores(model, model.model.layers, config, Run(Context(), task))  # type: ignore[union-attr,arg-type]
    assert costs[1] == pytest.approx(0.0, abs=1e-6)  # dropping a no-op block changes nothing
    with torch.no_grad():
        full = float(task.loss(model, (x, x)))
        trial = copy.deepcopy(model)
        keep_blocks(trial, "model.layers", [1, 2, 3])
        without_first = float(task.loss(trial, (x, x)))
    assert costs[0] == pytest.approx(without_first - full, abs=1e-5)
    out = _compress(model, {"count": 1, "criterion": "loss"})
    assert model_info(out).kept_layers == [i for i in range(4) if i != lowest(costs, 1)[0]]


def test_explicit_blocks_need_no_data_and_keep_the_kept_blocks() -> None:
    model = _llama(4)
    out = _compress(model, {"blocks": [0, 2]}, data=True)
    kept: Any = out.model.layers  # type: ignore[union-attr]
    orig: Any = model.model.layers  # type: ignore[union-attr]
    for new, old in zip(kept, [orig[1], orig[3]], strict=True):
        for (n1, p1), (n2, p2) in zip(new.named_parameters(), old.named_parameters(), strict=True):
            assert n1 == n2 and torch.equal(p1, p2)
    assert model_info(out).kept_layers == [1, 3]


def test_two_removals_compose_the_kept_indices() -> None:
    model = _llama(5)
    x = example_input(model, batch=8)
    stages = [{"method": "prune.layers", "blocks": [1]}, {"method": "prune.layers", "blocks": [0]}]
    out = st.compress(model, stages, data=tensor_task(x, loss="next_token")).model
    assert model_info(out).kept_layers == [2, 3, 4]
    assert out.config.num_hidden_layers == 3  # type: ignore[union-attr]


def test_kv_cache_generation_matches_full_recompute_after_removal() -> None:
    model = _llama(4)
    out = _compress(model, {"blocks": [1, 2]})
    out.config.use_cache = True  # type: ignore[union-attr]
    ids = example_input(out, batch=1)[:, :6]
    with torch.no_grad():
        cached = out.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)  # type: ignore[operator]
        plain = out.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)  # type: ignore[operator]
    assert torch.equal(cached, plain)


def test_saved_and_loaded_without_the_factory(tmp_path: Any) -> None:
    model = _llama(4)
    out = _compress(model, {"fraction": 0.5})
    st.save(out, tmp_path / "a")
    loaded = st.load(tmp_path / "a")
    x = example_input(model, batch=2)
    assert loaded.config.num_hidden_layers == 2  # type: ignore[union-attr]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, out(x).logits, rtol=0, atol=0)


def test_bad_options() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "exactly one of fraction"),
        ({"count": 2, "fraction": 0.5}, "exactly one of fraction"),
        ({"count": 1, "targets": ["Linear"]}, "not targets"),
        ({"count": 1, "criterion": "magic"}, "criterion"),
        ({"fraction": 1.0}, "fraction"),
    ]
    for options, match in cases:
        with pytest.raises(UserInputError, match=match):
            parse_stage({"method": "prune.layers", **options}, 0)
    with pytest.raises(ConfigError, match="keep at least one"):
        _compress(_llama(2), {"count": 2})
    with pytest.raises(ConfigError, match="out of range"):
        _compress(_llama(2), {"blocks": [2]})
    with pytest.raises(ConfigError, match="not a module"):
        _compress(_llama(2), {"count": 1, "layers": "model.nope"})
    with pytest.raises(ConfigError, match=r"nn\.ModuleList"):
        _compress(_llama(2), {"count": 1, "layers": "model.norm"})


def test_a_model_without_blocks_is_refused_clearly() -> None:
    model = with_example_input(tiny_cnn())
    x = example_input(model, batch=4)
    with pytest.raises(UnsupportedModelError, match="no stack of repeated blocks"):
        st.compress(model, [{"method": "prune.layers", "count": 1}], data=tensor_task(x, x))
