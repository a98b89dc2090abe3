"""prune.structured: real channel removal from Python, recipes and the CLI, with exact reloads."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.api import artifact_size
from slimtorch.calibrate.inputs import count_flops
from slimtorch.cli.main import main
from slimtorch.core.errors import ConfigError, TargetError
from slimtorch.core.info import model_info, update_info
from slimtorch.graph.surgery import apply_channels
from slimtorch.prune.structured import keep_count, top_channels
from slimtorch.recipe import load_recipe
from slimtorch.testing.models import example_input, tiny_lstm, tiny_resnet, with_example_input
from slimtorch.testing.tasks import TensorTask, tensor_task


def _task() -> TensorTask:
    """Random images with random labels: enough for gradients and activations."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 8, 8, generator=gen)
    return tensor_task(x, torch.randint(0, 4, (256,), generator=gen), name="toy")


def _stage(**options: Any) -> dict[str, Any]:
    return {"stages": [{"method": "prune.structured", **options}]}


def test_keep_count_and_top_channels() -> None:
    assert keep_count(16, 0.5) == 8
    assert keep_count(16, 0.5, blocks=4, round_to=8) == 8
    assert keep_count(10, 0.95) == 1  # never empty
    assert keep_count(8, 0.2502) == 6 and keep_count(8, 0.2502, down=True) == 5
    assert keep_count(8, 0.25, down=True) == 6  # 8 * 0.75 is 6, not 5.999...
    assert keep_count(6, 0.5, blocks=4) == 6  # 6 channels cannot split into 4 blocks: untouched
    scores = torch.tensor([0.1, 5.0, 0.3, 4.0, 9.0, 0.0, 0.2, 1.0])
    assert top_channels(scores, 3).tolist() == [1, 3, 4]
    assert top_channels(scores, 4, blocks=2).tolist() == [1, 3, 4, 7]


def test_ratio_halves_every_group_and_reloads_exactly(tmp_path: Path) -> None:
    model = with_example_input(tiny_resnet())
    result = st.compress(model, _stage(ratio=0.5))
    pruned = result.model
    assert pruned.block1.conv1.out_channels == 4 and pruned.block2.conv2.out_channels == 8
    assert pruned.gn.num_channels == 8 and pruned.gn.num_groups == 4
    assert pruned.fc.in_features == (8 + 4) * 4 and pruned.fc.out_features == 4
    meta = model_info(pruned).structured
    assert meta["params_after"] < 0.4 * meta["params_before"]
    x = example_input(model)
    st.save(pruned, tmp_path / "art")
    loaded = st.load(tmp_path / "art", trust_factory=True)
    assert loaded.block2.shortcut[0].weight.shape == (8, 4, 1, 1)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    st.save(model, tmp_path / "dense")
    assert artifact_size(tmp_path / "art") < 0.7 * artifact_size(tmp_path / "dense")


def test_flops_target_is_met() -> None:
    model = with_example_input(tiny_resnet())
    x = example_input(model)
    pruned = st.compress(model, _stage(flops=0.5)).model
    kept = count_flops(pruned, (x,)) / count_flops(model, (x,))
    assert 0.38 < kept <= 0.5


def test_flops_target_spends_what_rounding_left() -> None:
    """At half the FLOPs one ratio for every group, rounded down, keeps 5 of 8 ... 47 of 64
    channels and 48.0% of the FLOPs; the fill pass rounds groups up (one step each, the most
    importance per FLOP first) while the model stays within the target."""
    from slimtorch.graph.dependency import build_graph
    from slimtorch.prune.structured import (
        StructuredConfig,
        _ratio_for_flops,
        fill_to_flops,
        plan,
        selected_groups,
    )
    from slimtorch.zoo.resnet import ResNet18Small

    torch.manual_seed(0)
    model = ResNet18Small(8).eval()
    x = (torch.randn(1, 1, 28, 28),)
    config = StructuredConfig(flops=0.5, ignore=["fc"])
    graph = build_graph(model, x)
    groups = selected_groups(model, graph, config)
    scores = {g.id: torch.rand(g.size) for g in groups}
    ratio = _ratio_for_flops(model, graph, groups, scores, 0.5, config, x)
    plain = plan(groups, scores, ratio, config)
    filled = fill_to_flops(model, graph, groups, scores, plain, 0.5, config, x)
    base = count_flops(model, x)

    def kept(keep: dict[int, torch.Tensor]) -> float:
        trial = copy.deepcopy(model)
        apply_channels(trial, graph, keep)
        return count_flops(trial, x) / base

    assert kept(plain) < 0.485
    assert kept(plain) + 0.01 < kept(filled) <= 0.5
    for g in groups:  # at most one channel back per group, its most important removed one
        extra = set(filled[g.id].tolist()) - set(plain[g.id].tolist())
        assert set(plain[g.id].tolist()) <= set(filled[g.id].tolist()) and len(extra) <= 1
        dropped = set(range(g.size)) - set(filled[g.id].tolist())
        if extra and dropped:
            assert scores[g.id][sorted(extra)].min() >= scores[g.id][sorted(dropped)].max()


@pytest.mark.parametrize("importance", ["l1", "l2", "fpgm", "bn_scale", "random"])
def test_data_free_criteria(importance: str) -> None:
    model = with_example_input(tiny_resnet())
    pruned = st.compress(model, _stage(ratio=0.25, importance=importance)).model
    assert pruned.block1.conv1.out_channels == 6


def test_l1_keeps_the_largest_filters() -> None:
    model = with_example_input(tiny_resnet())
    with torch.no_grad():
        model.block1.conv1.weight[[1, 6]] *= 100.0
    pruned = st.compress(model, _stage(ratio=0.75, targets=["block1.conv1"])).model
    assert pruned.block1.conv1.out_channels == 2
    torch.testing.assert_close(pruned.block1.conv1.weight, model.block1.conv1.weight[[1, 6]])
    assert pruned.block2.conv1.out_channels == 16  # untargeted groups stay whole


@pytest.mark.parametrize("importance", ["taylor", "activation"])
def test_data_criteria_use_the_task(importance: str) -> None:
    model = with_example_input(tiny_resnet())
    pruned = st.compress(model, _stage(ratio=0.5, importance=importance), data=_task()).model
    assert pruned.block1.conv1.out_channels == 4
    assert all(p.grad is None for p in pruned.parameters())
    with pytest.raises(ConfigError, match="--data"):
        st.compress(model, _stage(ratio=0.5, importance=importance))


def test_global_scope_varies_per_group_within_max_ratio() -> None:
    model = with_example_input(tiny_resnet())
    pruned = st.compress(model, _stage(ratio=0.5, scope="global", max_ratio=0.75)).model
    before = [8, 8, 16, 16, 8]  # block1.conv1, stem, block2.conv1, block2.conv2, side
    after = [
        pruned.block1.conv1.out_channels,
        pruned.stem.out_channels,
        pruned.block2.conv1.out_channels,
        pruned.block2.conv2.out_channels,
        pruned.side.out_channels,
    ]
    assert all(a >= b // 4 for a, b in zip(after, before, strict=True))
    assert len({a / b for a, b in zip(after, before, strict=True)}) > 1
    assert 0.35 < sum(after) / sum(before) < 0.65


def test_iterative_steps_with_finetuning() -> None:
    model = with_example_input(tiny_resnet())
    recipe = _stage(ratio=0.5, steps=2, finetune_steps=3, train={"steps": 1, "batch_size": 8})
    pruned = st.compress(model, recipe, data=_task()).model
    assert pruned.block1.conv1.out_channels == 4


def test_lstm_hidden_units_are_removed(tmp_path: Path) -> None:
    model = with_example_input(tiny_lstm())
    pruned = st.compress(model, _stage(ratio=0.5)).model
    assert pruned.lstm.hidden_size == 8 and pruned.gru.hidden_size == 8
    assert pruned.emb.embedding_dim == 8 and pruned.head.in_features == 8
    st.save(pruned, tmp_path / "a")
    x = example_input(model)
    with torch.no_grad():
        assert torch.equal(st.load(tmp_path / "a", trust_factory=True)(x), pruned(x))


def test_bad_configs_and_models() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        load_recipe(_stage(ratio=0.5, flops=0.5))
    with pytest.raises(ConfigError):
        load_recipe(_stage(ratio=1.0))
    model = with_example_input(tiny_resnet())
    with pytest.raises(TargetError, match="no prunable"):
        st.compress(model, _stage(ratio=0.5, targets=["fc"]))
    masked = st.compress(model, {"stages": [{"method": "prune.magnitude", "sparsity": 0.5}]})
    with pytest.raises(ConfigError, match="before"):
        st.compress(masked.model, _stage(ratio=0.5))
    with pytest.raises(ConfigError, match="example inputs"):
        st.compress(tiny_resnet(), _stage(ratio=0.5))


def test_presets_parse() -> None:
    for name in ("structured-50", "structured-50-distill"):
        recipe = load_recipe(name)
        assert recipe.stages[0].spec.name == "prune.structured"


def test_cli_compress_lenet(tmp_path: Path) -> None:
    out = tmp_path / "lenet"
    code = main(
        ["compress", "--model", "builtin:lenet5-fashion", "--recipe", "structured-50", "--out",
         str(out)]
    )  # fmt: skip
    assert code == 0
    model = st.load(out)
    assert model.conv1.out_channels < 20 and model.fc1.in_features < 800
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_sensitivity_weights_favour_robust_groups() -> None:
    from slimtorch.prune.structured import sensitivity_weights

    w = sensitivity_weights({0: 8, 1: 8}, {0: 1.5, 1: 1.01}, base=1.0)
    assert w[1] > 1.0 > w[0]
    assert 8 * w[0] + 8 * w[1] == pytest.approx(16, rel=0.3)


def test_sensitivity_scope_scans_groups_on_data() -> None:
    model = with_example_input(tiny_resnet())
    recipe = _stage(ratio=0.5, scope="sensitivity", calibration_batches=2)
    pruned = st.compress(model, recipe, data=_task()).model
    sizes = [pruned.block1.conv1.out_channels, pruned.stem.out_channels, pruned.side.out_channels]
    assert all(1 <= s <= 8 for s in sizes)
    with pytest.raises(ConfigError, match="--data"):
        st.compress(model, recipe)


class _FixedReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 3, padding=1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).reshape(-1, 32))


def test_forward_with_written_sizes_is_a_clear_error() -> None:
    from slimtorch.core.errors import UnsupportedModelError

    model = _FixedReshape()
    update_info(model, input={"shape": [2, 1, 4], "dtype": "float32"})
    with pytest.raises(UnsupportedModelError, match="reshape"):
        st.compress(model, _stage(ratio=0.5))
