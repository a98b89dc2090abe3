"""quantize.dynamic_int8: which layers are swapped, accuracy, masks and target errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import TargetError, UnsupportedModelError
from slimtorch.core.methods import Run
from slimtorch.formats.state import WeightState, apply_state
from slimtorch.quantize.stages.dynamic import DynamicInt8Config, dynamic_int8
from slimtorch.runtime import Int8DynamicLinear

RUN = Run(Context(progress=False))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 32, 1)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.lstm = nn.LSTM(32, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        a, _ = self.attn(x, x, x)
        x = x + self.fc2(torch.relu(self.fc1(a)))
        x, _ = self.lstm(x)
        return self.head(x)  # type: ignore[no-any-return]


@pytest.fixture
def block() -> Block:
    torch.manual_seed(0)
    return Block().eval()


def test_replaces_linears_but_not_attention_out_proj(block: Block) -> None:
    x = torch.randn(2, 10, 8)
    with torch.no_grad():
        ref = block(x)
    dynamic_int8(block, DynamicInt8Config(), RUN)
    assert isinstance(block.fc1, Int8DynamicLinear) and isinstance(block.head, Int8DynamicLinear)
    assert type(block.attn.out_proj) is not Int8DynamicLinear
    assert isinstance(block.conv, nn.Conv1d)
    with torch.no_grad():
        out = block(x)
    assert float((out - ref).norm() / ref.norm()) < 0.03


def test_targets_and_masks(block: Block) -> None:
    mask = torch.rand(block.fc2.weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    apply_state(block.fc2, "weight", WeightState(mask=mask))
    dynamic_int8(block, DynamicInt8Config(targets=["re:fc.*"]), RUN)
    assert isinstance(block.fc2, Int8DynamicLinear) and isinstance(block.head, nn.Linear)
    assert bool((block.fc2.weight_int8[~mask] == 0).all())


def test_non_linear_targets_are_refused(block: Block) -> None:
    with pytest.raises(TargetError, match="Linear layers"):
        dynamic_int8(block, DynamicInt8Config(targets=["Conv1d", "LSTM"]), RUN)
    with pytest.raises(TargetError, match="no module matched"):
        dynamic_int8(block, DynamicInt8Config(targets=["Conv3d"]), RUN)
    with pytest.raises(TargetError, match="out_proj"):
        dynamic_int8(block, DynamicInt8Config(targets=["attn.out_proj"]), RUN)
    with pytest.raises(UnsupportedModelError, match="wrap"):
        dynamic_int8(nn.Linear(4, 4), DynamicInt8Config(), RUN)


def test_dynamic_int8_also_stores_embeddings_as_int8() -> None:
    import slimtorch as st
    from slimtorch.formats.state import get_state
    from slimtorch.testing.models import tiny_transformer

    model = tiny_transformer()
    out = st.compress(model, "dynamic-int8").model
    state = get_state(out.emb, "weight")
    assert state is not None and state.quant is not None and state.quant.bits == 8
    off = st.compress(model, {"stages": [{"method": "quantize.dynamic_int8", "embeddings": False}]})
    assert get_state(off.model.emb, "weight") is None
