"""prune.permute (N:M channel permutation) and prune.reorder (one artifact, several widths)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.artifact.widths import narrow
from slimtorch.core.errors import UserInputError
from slimtorch.core.info import model_info, update_info
from slimtorch.prune.permutation import channel_matrix, nm_kept_magnitude
from slimtorch.prune.reorder import importance_order
from slimtorch.testing.models import example_input, tiny_lstm, tiny_resnet, with_example_input


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 24)
        self.c = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_importance_order_within_blocks() -> None:
    scores = torch.tensor([1.0, 3.0, 2.0, 0.0, 5.0, 4.0])
    assert importance_order(scores).tolist() == [4, 5, 1, 2, 0, 3]
    assert importance_order(scores, blocks=2).tolist() == [1, 2, 0, 4, 5, 3]


def test_permute_keeps_outputs_and_raises_kept_magnitude() -> None:
    model = _MLP()
    update_info(model, input={"shape": [4, 16], "dtype": "float32"})
    x = torch.randn(4, 16)
    before = nm_kept_magnitude(channel_matrix(model.b.weight.detach()), 2, 4)
    before += nm_kept_magnitude(channel_matrix(model.c.weight.detach()), 2, 4)
    permuted = st.compress(model, {"stages": [{"method": "prune.permute"}]}).model
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=1e-5)
    after = nm_kept_magnitude(channel_matrix(permuted.b.weight.detach()), 2, 4)
    after += nm_kept_magnitude(channel_matrix(permuted.c.weight.detach()), 2, 4)
    assert after > before * 1.005
    sparse = st.compress(model, {"stages": [{"method": "prune.permute"}, {"method": "prune.nm"}]})
    assert sparse.model(x).shape == (4, 4)


def test_reorder_then_serve_at_several_widths(tmp_path: Path) -> None:
    model = with_example_input(tiny_resnet())
    x = example_input(model)
    ordered = st.compress(model, {"stages": [{"method": "prune.reorder"}]}).model
    with torch.no_grad():
        torch.testing.assert_close(ordered(x), model(x), atol=1e-5, rtol=1e-5)
    groups = model_info(ordered).widths
    assert len(groups) == 5
    norms = ordered.block1.conv1.weight.detach().abs().sum((1, 2, 3))
    norms = norms + ordered.block1.conv2.weight.detach().abs().sum((0, 2, 3))
    norms = norms + ordered.block1.bn1.weight.detach().abs() + ordered.block1.bn1.bias.abs()
    assert int(norms.argmax()) == 0  # most important channel first
    st.save(ordered, tmp_path / "a")
    full = st.load(tmp_path / "a", trust_factory=True)
    half = st.load(tmp_path / "a", width=0.5, trust_factory=True)
    assert half.block1.conv1.out_channels == 4 and half.gn.num_channels == 8
    assert half.fc.in_features == (8 + 4) * 4
    assert sum(p.numel() for p in half.parameters()) < 0.4 * sum(
        p.numel() for p in full.parameters()
    )
    with torch.no_grad():
        torch.testing.assert_close(half(x), narrow(full, 0.5)(x))
        assert torch.equal(st.load(tmp_path / "a", width=1.0, trust_factory=True)(x), full(x))


def test_lstm_widths() -> None:
    model = with_example_input(tiny_lstm())
    ordered = st.compress(model, {"stages": [{"method": "prune.reorder", "importance": "l2"}]})
    narrowed = narrow(ordered.model, 0.25)
    assert narrowed.lstm.hidden_size == 4
    assert narrowed(example_input(model)).shape == (4, 32)


def test_width_errors(tmp_path: Path) -> None:
    model = with_example_input(tiny_resnet())
    st.save(model, tmp_path / "plain")
    with pytest.raises(UserInputError, match=r"prune\.reorder"):
        st.load(tmp_path / "plain", width=0.5, trust_factory=True)
    ordered = st.compress(model, {"stages": [{"method": "prune.reorder"}]}).model
    with pytest.raises(UserInputError, match="width"):
        narrow(ordered, 1.5)


def test_cli_multiwidth_recipe_and_eval_width(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from slimtorch.cli.main import main

    out = tmp_path / "lenet"
    recipe = Path(__file__).parents[2] / "examples" / "recipes" / "multiwidth.yaml"
    args = ["compress", "--model", "builtin:lenet5-fashion", "--recipe", str(recipe)]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--width", "0.5", "--no-baseline", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["width"] == 0.5 and report["params"] < 120_000
    half = st.load(out, width=0.5)
    assert half.conv1.out_channels == 10 and half.fc1.out_features == 250
