"""train.slimmable: the widths of one reordered model trained together, sharing weights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.artifact.widths import narrow
from slimtorch.core.errors import ConfigError
from slimtorch.core.info import model_info
from slimtorch.prune.slimmable import SharedWidth, position_maps
from slimtorch.testing.models import example_input, tiny_lstm, tiny_resnet, with_example_input
from slimtorch.testing.tasks import TensorTask, tensor_task


def _match_teacher(teacher: nn.Module) -> TensorTask:
    """Regress the outputs of a fixed teacher on random images."""
    x = torch.randn(2048, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return tensor_task(x, teacher.eval()(x), loss="mse", name="match-teacher")


def _reordered(model: nn.Module) -> nn.Module:
    return st.compress(with_example_input(model), {"stages": [{"method": "prune.reorder"}]}).model


@pytest.mark.parametrize("make", [tiny_resnet, tiny_lstm])
def test_position_maps_and_shared_forward(make: Any) -> None:
    model = _reordered(make())
    small = narrow(model, 0.5)
    full = dict(model.named_parameters())
    for name, idx in position_maps(model, 0.5).items():
        kept = full[name].detach().reshape(-1)[idx]
        assert torch.equal(kept, dict(small.named_parameters())[name].detach()), name
    view = SharedWidth(model, 0.5).eval()
    x = example_input(model)
    with torch.no_grad():
        torch.testing.assert_close(view(x), small.eval()(x))
    out = view(x)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)  # the full model's tensors learn


def test_slimmable_training_makes_narrow_widths_work(tmp_path: Path) -> None:
    model = _reordered(tiny_resnet())
    teacher = copy.deepcopy(model).eval()
    task = _match_teacher(teacher)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(9))

    def error(m: nn.Module) -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(m.eval()(x), teacher(x)))

    before = error(narrow(model, 0.5))
    recipe = {"stages": [{"method": "train.slimmable", "widths": [0.5],
                          "train": {"steps": 60, "lr": 0.01, "batch_size": 32}}]}  # fmt: skip
    trained = st.compress(model, recipe, data=task).model
    stats = model_info(trained).width_stats
    assert set(stats) == {"0.5"} and "block1.bn1.running_mean" in stats["0.5"]
    after = error(narrow(trained, 0.5))
    assert after < 0.5 * before
    assert error(trained) < 0.05  # the full width still matches the teacher
    st.save(trained, tmp_path / "a")
    half = st.load(tmp_path / "a", width=0.5, trust_factory=True)
    recorded = torch.tensor(stats["0.5"]["block1.bn1.running_var"])
    assert torch.equal(half.block1.bn1.running_var, recorded)
    assert not torch.equal(
        half.block1.bn1.running_var, trained.block1.bn1.running_var[: recorded.numel()]
    )
    assert error(half) == pytest.approx(after, rel=1e-5)
    assert model_info(st.load(tmp_path / "a", width=0.75, trust_factory=True)).width_stats is None


def test_needs_a_reordered_model() -> None:
    model = with_example_input(tiny_resnet())
    recipe = {"stages": [{"method": "train.slimmable", "train": {"steps": 1}}]}
    with pytest.raises(ConfigError, match=r"prune\.reorder"):
        st.compress(model, recipe, data=_match_teacher(copy.deepcopy(model)))
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        st.compress(model, {"stages": [{"method": "train.slimmable", "widths": [1.5]}]})


def test_cli_slimmable_recipe_on_lenet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import yaml

    from slimtorch.cli.main import main

    example = Path(__file__).parents[2] / "examples" / "recipes" / "multiwidth-slimmable.yaml"
    recipe = yaml.safe_load(example.read_text())
    recipe["stages"][1]["train"]["steps"] = 3  # the shipped recipe trains 200 steps
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "lenet"
    args = ["compress", "--model", "builtin:lenet5-fashion", "--recipe", str(tmp_path / "r.yaml")]
    assert main([*args, "--data", "builtin:fashion-mnist", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--width", "0.5", "--no-baseline", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["width"] == 0.5
    assert (model_info(st.load(out)).recipe or {}).get("stages", [{}])[1]["method"] == (
        "train.slimmable"
    )
