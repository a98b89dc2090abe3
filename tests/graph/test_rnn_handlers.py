"""LSTM/GRU/RNN handlers: hidden units pruned across gates, layers and directions, exactly."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from slimtorch.graph.handlers import handler_for

ATOL = 1e-6
H = 5
KEEP = torch.tensor([3, 0, 4])


def _rnn(kind: str, batch_first: bool, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    cls = getattr(nn, kind)
    return cls(4, H, num_layers=2, bidirectional=True, batch_first=batch_first, **kw).double()


def _silence_removed_units(rnn: nn.Module, keep: Tensor) -> None:
    """Zero every weight that carries a removed unit's state into a kept unit, so the kept units
    of the original run exactly as the pruned network does."""
    gone = torch.ones(H, dtype=torch.bool)
    gone[keep] = False
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("weight_hh"):
                p[:, gone] = 0
            elif name.startswith("weight_ih") and not name.startswith("weight_ih_l0"):
                p.view(p.shape[0], 2, H)[:, :, gone] = 0


def _features(keep: Tensor) -> Tensor:
    """Output features of units ``keep`` in a bidirectional output: c and H + c."""
    return torch.cat([keep, keep + H])


def _run(rnn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    y, state = rnn(x)
    if isinstance(state, tuple):
        return y.detach(), state[0].detach(), state[1].detach()
    return y.detach(), state.detach(), None


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_out_units_exact_across_layers_and_directions(kind: str, batch_first: bool) -> None:
    rnn = _rnn(kind, batch_first)
    h = handler_for(rnn)
    assert h is not None and h.dims(rnn) == {"in": 4, "out": H} and h.tiles(rnn, "out") == 2
    assert h.layout == "last" and not h.coupled(rnn)
    for t, axis in h.weights(rnn, "out"):
        assert t.shape[axis] == H
    _silence_removed_units(rnn, KEEP)
    x = torch.randn(2, 6, 4, dtype=torch.double)
    y, hn, cn = _run(rnn, x)
    assert h.prune(rnn, "out", KEEP) is None
    assert rnn.hidden_size == 3 and rnn.weight_hh_l1_reverse.shape == (h.gates * 3, 3)  # type: ignore[attr-defined]
    assert rnn.weight_ih_l1.shape == (h.gates * 3, 6)
    assert all(a is b for a, b in zip(rnn._flat_weights, rnn.parameters(), strict=True))
    y2, hn2, cn2 = _run(rnn, x)
    torch.testing.assert_close(y2, y[..., _features(KEEP)], atol=ATOL, rtol=0)
    torch.testing.assert_close(hn2, hn[..., KEEP], atol=ATOL, rtol=0)
    if cn is not None:
        torch.testing.assert_close(cn2, cn[..., KEEP], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_permutation_of_units_is_exact(kind: str) -> None:
    rnn = _rnn(kind, batch_first=True)
    x = torch.randn(2, 5, 4, dtype=torch.double)
    y, hn, _ = _run(rnn, x)
    perm = torch.tensor([2, 4, 0, 1, 3])
    handler_for(rnn).prune(rnn, "out", perm)  # type: ignore[union-attr]
    y2, hn2, _ = _run(rnn, x)
    torch.testing.assert_close(y2, y[..., _features(perm)], atol=ATOL, rtol=0)
    torch.testing.assert_close(hn2, hn[..., perm], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_in_features_exact_with_zero_inputs(kind: str) -> None:
    rnn = _rnn(kind, batch_first=False)
    keep = torch.tensor([3, 1])
    x = torch.randn(5, 2, 4, dtype=torch.double)
    x[..., [0, 2]] = 0
    y, _, _ = _run(rnn, x)
    handler_for(rnn).prune(rnn, "in", keep)  # type: ignore[union-attr]
    assert rnn.input_size == 2 and rnn.weight_ih_l0_reverse.shape[1] == 2  # type: ignore[union-attr]
    torch.testing.assert_close(_run(rnn, x[..., keep])[0], y, atol=ATOL, rtol=0)


def test_projected_lstm_prunes_only_inputs() -> None:
    rnn = nn.LSTM(4, H, num_layers=2, proj_size=2).double()
    h = handler_for(rnn)
    assert h is not None and h.dims(rnn) == {"in": 4}
    x = torch.randn(3, 2, 4, dtype=torch.double)
    x[..., 1] = 0
    y, _, _ = _run(rnn, x)
    keep = torch.tensor([0, 2, 3])
    h.prune(rnn, "in", keep)
    torch.testing.assert_close(_run(rnn, x[..., keep])[0], y, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="no prunable dim 'out'"):
        h.prune(rnn, "out", torch.tensor([0]))


def test_pruned_lstm_state_dict_loads_into_fresh_lstm() -> None:
    rnn = _rnn("LSTM", batch_first=True)
    handler_for(rnn).prune(rnn, "out", KEEP)  # type: ignore[union-attr]
    fresh = nn.LSTM(4, 3, num_layers=2, bidirectional=True, batch_first=True).double()
    fresh.load_state_dict(rnn.state_dict())
    x = torch.randn(2, 4, 4, dtype=torch.double)
    torch.testing.assert_close(fresh(x)[0], rnn(x)[0], atol=0, rtol=0)
    # gradients flow into the new parameters
    rnn(x)[0].sum().backward()
    assert rnn.weight_hh_l0.grad is not None and rnn.weight_hh_l0.grad.shape == (12, 3)
