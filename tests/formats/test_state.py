import pytest
import torch
from torch import nn

from slimtorch.formats.state import (
    QuantState,
    WeightState,
    apply_state,
    clear_state,
    code_range,
    dequantize,
    effective_weight,
    from_matrix,
    get_state,
    iter_states,
    to_matrix,
)


@pytest.mark.parametrize("shape", [(5,), (4, 3), (4, 3, 5), (4, 3, 2, 2), (2, 3, 2, 2, 2)])
def test_matrix_round_trip(shape: tuple[int, ...]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    m = to_matrix(w)
    assert m.dim() == 2
    assert m.shape[0] == (shape[0] if len(shape) > 1 else 1)
    assert torch.equal(from_matrix(m, shape), w)


def test_conv_matrix_puts_input_channel_last() -> None:
    w = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    m = to_matrix(w)
    assert m.shape == (2, 12)
    # row o, column (h * kw + w) * in + i
    assert m[1, (1 * 2 + 0) * 3 + 2] == w[1, 2, 1, 0]


def test_code_range() -> None:
    assert code_range(8, True) == (-128, 127)
    assert code_range(4, False) == (0, 15)
    assert code_range(1, False) == (0, 1)


def _q(
    scheme: str,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor | None = None,
    granularity: str = "per_channel",
    group_size: int | None = None,
    bits: int = 8,
) -> QuantState:
    return QuantState(
        scheme=scheme,  # type: ignore[arg-type]
        bits=bits,
        signed=scheme == "affine",
        granularity=granularity,  # type: ignore[arg-type]
        codes=codes,
        scale=scale,
        zero_point=torch.zeros_like(scale, dtype=torch.int32) if zp is None else zp,
        group_size=group_size,
    )


def test_dequantize_affine_per_channel_with_zero_point() -> None:
    codes = torch.tensor([[1, 2], [3, 4]], dtype=torch.int8)
    q = _q(
        "affine", codes, torch.tensor([[0.5], [2.0]]), torch.tensor([[1], [-1]], dtype=torch.int32)
    )
    assert torch.equal(dequantize(q, (2, 2)), torch.tensor([[0.0, 0.5], [8.0, 10.0]]))


def test_dequantize_per_group_ragged() -> None:
    codes = torch.ones(1, 5, dtype=torch.int32)
    q = _q("affine", codes, torch.tensor([[1.0, 2.0, 3.0]]), granularity="per_group", group_size=2)
    assert dequantize(q, (1, 5)).tolist() == [[1.0, 1.0, 2.0, 2.0, 3.0]]


def test_dequantize_binary_and_ternary() -> None:
    s = torch.tensor([[0.5]])
    b = _q("binary", torch.tensor([[0, 1, 1]]), s, granularity="per_tensor", bits=1)
    t = _q("ternary", torch.tensor([[0, 1, 2]]), s, granularity="per_tensor", bits=2)
    assert dequantize(b, (1, 3)).tolist() == [[-0.5, 0.5, 0.5]]
    assert dequantize(t, (1, 3)).tolist() == [[-0.5, 0.0, 0.5]]


def test_effective_weight_mask_and_dtype() -> None:
    like = torch.tensor([1.5, -2.0, 3.0], dtype=torch.float16)
    state = WeightState(mask=torch.tensor([True, False, True]))
    out = effective_weight(state, like)
    assert out.dtype == torch.float16
    assert out.tolist() == [1.5, 0.0, 3.0]


def test_apply_state_and_registry_of_states() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    state = WeightState(mask=torch.tensor([[True, False, True], [False, True, True]]))
    apply_state(model[0], "weight", state)
    assert get_state(model[0], "weight") is state
    assert (model[0].weight[~state.mask] == 0).all()
    assert [(n, p) for n, _, p, _ in iter_states(model)] == [("0", "weight")]
    clear_state(model[0], "weight")
    assert iter_states(model) == []
    assert get_state(model[1], "weight") is None
