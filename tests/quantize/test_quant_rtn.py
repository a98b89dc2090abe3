"""quantize.rtn / binary / ternary as recipe methods on every supported layer type."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import TargetError, UnsupportedModelError
from slimtorch.core.methods import METHODS, Run
from slimtorch.formats.state import (
    WeightState,
    apply_state,
    effective_weight,
    get_state,
    iter_states,
)
from slimtorch.quantize.stages.rtn import (
    BinaryConfig,
    RTNConfig,
    TernaryConfig,
    binary,
    rtn,
    ternary,
)


class Zoo(nn.Module):
    """Every supported layer type: Embedding, Conv1d, Conv2d, MHA, LSTM, GRU, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.conv1 = nn.Conv1d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.lstm = nn.LSTM(16, 12, batch_first=True)
        self.gru = nn.GRU(12, 12, batch_first=True)
        self.head = nn.Linear(12, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)  # [B, T, 16]
        x = self.conv1(x.transpose(1, 2)).transpose(1, 2)
        x = x + self.conv2(x.unsqueeze(1)).mean(1)
        x, _ = self.attn(x, x, x)
        x, _ = self.lstm(x)
        x, _ = self.gru(x)
        return self.head(x[:, -1])  # type: ignore[no-any-return]


EXPECTED = {
    "emb.weight",
    "conv1.weight",
    "conv2.weight",
    "attn.in_proj_weight",
    "attn.out_proj.weight",
    "lstm.weight_ih_l0",
    "lstm.weight_hh_l0",
    "gru.weight_ih_l0",
    "gru.weight_hh_l0",
    "head.weight",
}


@pytest.fixture
def zoo() -> Zoo:
    torch.manual_seed(0)
    return Zoo().eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 20, (4, 7), generator=torch.Generator().manual_seed(1))


def quantized_names(model: nn.Module) -> set[str]:
    return {f"{name}.{p}" for name, _, p, s in iter_states(model) if s.quant is not None}


def test_rtn_int8_covers_every_layer_and_is_close(zoo: Zoo) -> None:
    with torch.no_grad():
        ref = zoo(tokens())
    rtn(zoo, RTNConfig(bits=8), Run(Context(progress=False)))
    assert quantized_names(zoo) == EXPECTED
    for _, module, param, state in iter_states(zoo):
        p = getattr(module, param)
        assert torch.equal(effective_weight(state, p), p)  # parameter == state, bit for bit
    with torch.no_grad():
        out = zoo(tokens())
    assert float((out - ref).norm() / ref.norm()) < 0.02


def test_rtn_int4_groups_and_targets(zoo: Zoo) -> None:
    cfg = RTNConfig(
        bits=4, granularity="per_group", group_size=8, targets=["LSTM", "GRU"], ignore=["gru"]
    )
    rtn(zoo, cfg, Run(Context(progress=False)))
    assert quantized_names(zoo) == {"lstm.weight_ih_l0", "lstm.weight_hh_l0"}
    state = get_state(zoo.lstm, "weight_ih_l0")
    assert state is not None and state.quant is not None
    assert state.quant.scale.shape == (48, 2) and state.quant.bits == 4
    # the LSTM computes with the quantized values (its flat weights are the same tensors)
    assert torch.equal(zoo.lstm._flat_weights[0], zoo.lstm.weight_ih_l0)


def test_rtn_keeps_masks(zoo: Zoo) -> None:
    w = zoo.head.weight
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    apply_state(zoo.head, "weight", WeightState(mask=mask))
    rtn(zoo, RTNConfig(bits=3, symmetric=False, observer="mse"), Run(Context(progress=False)))
    state = get_state(zoo.head, "weight")
    assert state is not None and state.mask is mask and state.quant is not None
    assert bool((zoo.head.weight[~mask] == 0).all())
    assert int((zoo.head.weight[mask] == 0).sum()) < int(mask.sum()) // 4


def test_binary_and_ternary_methods(zoo: Zoo) -> None:
    binary(zoo, BinaryConfig(targets=["Linear"]), Run(Context(progress=False)))
    assert quantized_names(zoo) == {"head.weight", "attn.out_proj.weight"}
    assert zoo.head.weight.abs().unique().numel() <= 5
    ternary(
        zoo, TernaryConfig(targets=["Conv2d"], threshold_ratio=0.5), Run(Context(progress=False))
    )
    vals = zoo.conv2.weight.reshape(2, -1)
    for row in vals:
        assert row.unique().numel() <= 3


def test_methods_registered() -> None:
    for name in (
        "quantize.rtn",
        "quantize.binary",
        "quantize.ternary",
        "quantize.qat",
        "quantize.dynamic_int8",
    ):
        assert name in METHODS
    assert METHODS.get("quantize.qat").needs_data


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 1},
        {"bits": 9},
        {"group_size": 0},
        {"granularity": "row"},
        {"observer": "kl"},
        {"bitz": 4},
    ],
)
def test_bad_configs(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        RTNConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        TernaryConfig(threshold_ratio=0)


def test_bad_targets_and_nan(zoo: Zoo) -> None:
    run = Run(Context(progress=False))
    with pytest.raises(TargetError, match="no module matched"):
        rtn(zoo, RTNConfig(targets=["Conv3d"]), run)
    with torch.no_grad():
        zoo.head.weight[0, 0] = float("nan")
    with pytest.raises(UnsupportedModelError, match=r"head\.weight"):
        rtn(zoo, RTNConfig(), run)
    with pytest.raises(UnsupportedModelError):
        rtn(nn.Sequential(nn.ReLU()), RTNConfig(), run)
