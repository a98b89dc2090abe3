import pytest
import torch
from torch import nn

from slimtorch.core.errors import TargetError, UnsupportedModelError
from slimtorch.graph.weights import from_matrix, replace_module, select_weights, to_matrix


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Embedding(10, 8),
        nn.Conv1d(8, 8, 3),
        nn.Conv2d(2, 4, 3),
        nn.GRU(8, 4),
        nn.LSTM(8, 4, num_layers=2, bidirectional=True),
        nn.MultiheadAttention(8, 2),
        nn.Linear(8, 2),
    )


def test_selects_every_supported_weight() -> None:
    names = [r.name for r in select_weights(_model())]
    assert names[:3] == ["0.weight", "1.weight", "2.weight"]
    assert "3.weight_ih_l0" in names and "3.weight_hh_l0" in names
    assert "4.weight_hh_l1_reverse" in names and "4.bias_ih_l0" not in names
    assert "5.in_proj_weight" in names and "5.out_proj.weight" in names
    assert names[-1] == "6.weight"
    assert len(names) == 3 + 2 + 8 + 2 + 1


def test_targets_and_ignore() -> None:
    refs = select_weights(_model(), ["LSTM", "GRU"], ignore=["3"])
    assert len(refs) == 8 and {r.kind for r in refs} == {"LSTM"}
    assert {r.param for r in refs} >= {"weight_ih_l0", "weight_hh_l1_reverse"}


def test_no_match_names_what_model_has() -> None:
    with pytest.raises(TargetError, match=r"model has: .*Linear"):
        select_weights(_model(), ["Conv3d"])


def test_no_supported_layer() -> None:
    with pytest.raises(UnsupportedModelError, match="no layer"):
        select_weights(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))


def test_nan_weights_refused() -> None:
    m = nn.Linear(3, 3)
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
    with pytest.raises(UnsupportedModelError, match="NaN"):
        select_weights(m)


def test_matrix_view_round_trip_puts_input_channel_last() -> None:
    w = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    m = to_matrix(w)
    assert m.shape == (2, 12)
    assert m[0, :3].tolist() == w[0, :, 0, 0].tolist()
    assert torch.equal(from_matrix(m, w.shape), w)


def test_replace_module() -> None:
    m = _model()
    replace_module(m, "6", nn.Identity())
    assert isinstance(m[6], nn.Identity)
