"""quantize.qat: straight-through fake quantization on LSTM/GRU/Conv/Embedding/MHA, masks kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from slimtorch.calibrate.train import TrainOptions
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.core.methods import Run
from slimtorch.formats.state import WeightState, apply_state, get_state, iter_states
from slimtorch.graph.weights import select_weights
from slimtorch.quantize.affine import fake_quantize
from slimtorch.quantize.primitives import QuantSpec
from slimtorch.quantize.qat import FakeQuantize, attach_fake_quant
from slimtorch.quantize.stages.qat import QATConfig, qat
from slimtorch.testing.tasks import tensor_task


class TinyRNN(nn.Module):
    def __init__(self, cell: type[nn.Module] = nn.LSTM) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 12)
        self.rnn = cell(12, 16, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(tokens))
        return self.head(out[:, -1])  # type: ignore[no-any-return]


def _count(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Is token 3 more frequent than token 5 in a sequence of 10?"""
    x = torch.randint(0, 8, (n, 10), generator=torch.Generator().manual_seed(seed))
    return x, ((x == 3).sum(1) > (x == 5).sum(1)).long()


def _eval_loss(model: nn.Module) -> float:
    x, y = _count(512, 99)
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_rnn_uses_fake_quantized_weights_and_grads_reach_latent(cell: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = TinyRNN(cell)
    x = torch.randint(0, 8, (4, 10))
    spec = QuantSpec(bits=2)
    reference = TinyRNN(cell)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0"):
            getattr(reference.rnn, name).copy_(fake_quantize(getattr(model.rnn, name), spec))
    attach_fake_quant(select_weights(model, ["rnn"]), spec)
    out = model(x)
    assert torch.equal(out, reference(x))  # the RNN really computes with the 2-bit values
    out.sum().backward()
    latent = model.rnn.parametrizations.weight_ih_l0.original
    assert latent.grad is not None and float(latent.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "layer",
    [nn.Conv2d(3, 4, 3), nn.Embedding(10, 6), nn.MultiheadAttention(8, 2), nn.Linear(5, 7)],
)
def test_straight_through_on_other_layers(layer: nn.Module) -> None:
    spec = QuantSpec(bits=3)
    refs = select_weights(layer)
    attach_fake_quant(refs, spec)
    for ref in refs:
        w = getattr(ref.module, ref.param)
        latent = ref.module.parametrizations[ref.param].original
        assert torch.equal(w, fake_quantize(latent, spec))
        (w * torch.randn_like(w)).sum().backward()
        assert latent.grad is not None
        assert torch.equal(latent.grad != 0, torch.ones_like(latent, dtype=torch.bool))


def test_mask_blocks_gradient() -> None:
    lin = nn.Linear(6, 4)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    parametrize.register_parametrization(lin, "weight", FakeQuantize(QuantSpec(bits=4), mask))
    lin(torch.randn(3, 6)).sum().backward()
    grad = lin.parametrizations.weight.original.grad
    assert grad is not None and bool((grad[~mask] == 0).all()) and bool((grad[mask] != 0).all())
    assert bool((lin.weight[~mask] == 0).all())


def test_qat_lstm_reduces_loss_and_keeps_masks() -> None:
    torch.manual_seed(0)
    model = TinyRNN(nn.LSTM)
    task = tensor_task(*_count(2048, 1))
    mask = (
        torch.rand(model.rnn.weight_hh_l0.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    )
    apply_state(model.rnn, "weight_hh_l0", WeightState(mask=mask))
    before = _eval_loss(model)
    cfg = QATConfig(
        bits=4,
        granularity="per_group",
        group_size=8,
        train=TrainOptions(steps=150, lr=1e-2, batch_size=32),
    )
    qat(model, cfg, Run(Context(progress=False), task))
    after = _eval_loss(model)
    assert after < 0.8 * before
    assert not parametrize.is_parametrized(model.rnn)
    assert {f"{n}.{p}" for n, _, p, s in iter_states(model) if s.quant is not None} == {
        "emb.weight",
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "head.weight",
    }
    state = get_state(model.rnn, "weight_hh_l0")
    assert state is not None and state.mask is mask and state.quant is not None
    assert bool((model.rnn.weight_hh_l0[~mask] == 0).all())
    assert state.quant.codes.abs().max() <= 8
    assert "parametrizations" not in "".join(model.state_dict())


def test_qat_needs_data_and_restores_on_error() -> None:
    model = TinyRNN()
    with pytest.raises(ConfigError, match="pass --data"):
        qat(model, QATConfig(), Run(Context(progress=False)))

    def diverge(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, targets) * float("nan")

    mask = torch.ones_like(model.head.weight, dtype=torch.bool)
    apply_state(model.head, "weight", WeightState(mask=mask))
    with pytest.raises(ConfigError, match="diverged"):
        qat(
            model,
            QATConfig(train=TrainOptions(steps=2)),
            Run(Context(progress=False), tensor_task(*_count(64, 1), loss=diverge)),
        )
    assert not parametrize.is_parametrized(model.head)
    state = get_state(model.head, "weight")
    assert state is not None and state.mask is mask
