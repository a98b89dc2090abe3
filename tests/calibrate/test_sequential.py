"""The sequential pipeline: block inputs are exactly what the (compressed) model feeds them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from slimtorch.calibrate.sequential import (
    Accumulator,
    capture_first_inputs,
    find_blocks,
    run_sequential,
)
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.testing import models as testing_models
from slimtorch.testing.models import example_input, tiny_bert, tiny_cnn


def tiny_llama() -> nn.Module:
    return testing_models.tiny_llama(layers=3, vocab=64, hidden=32, intermediate=64, heads=4)


class _Keep:
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        self.seen.append(x.clone())


class _Recorder:
    """Observes every block's q_proj (or first Linear) and zeroes down_proj after observing."""

    def __init__(self, zero: bool) -> None:
        self.zero = zero
        self.inputs: dict[str, list[torch.Tensor]] = {}

    def observe(self, name: str, block: nn.Module) -> dict[str, Accumulator]:
        return {"self_attn.q_proj": _Keep()}

    def compress(self, name: str, block: nn.Module, stats: dict[str, Any]) -> None:
        self.inputs[name] = stats["self_attn.q_proj"].seen
        if self.zero:
            with torch.no_grad():
                block.mlp.down_proj.weight.zero_()


def _batches() -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 64, (2, 8), generator=gen),) for _ in range(3)]


def test_find_blocks() -> None:
    assert find_blocks(tiny_llama()).names == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert find_blocks(tiny_bert(layers=2)).container == "encoder.layer"
    assert find_blocks(tiny_cnn()).names == [""]


@pytest.mark.parametrize("zero", [False, True])
def test_blocks_see_what_the_compressed_model_feeds_them(zero: bool) -> None:
    model = tiny_llama()
    rec = _Recorder(zero)
    run_sequential(model, _batches(), rec, Context(progress=False))
    # reference: a plain forward of the model as compressed, with hooks on every q_proj input
    for i in range(3):
        seen: list[torch.Tensor] = []
        layer = model.model.layers[i]
        handle = layer.self_attn.q_proj.register_forward_pre_hook(
            lambda _m, a, seen=seen: seen.append(a[0].detach())
        )
        with torch.no_grad():
            for (ids,) in _batches():
                model(ids)
        handle.remove()
        for got, want in zip(rec.inputs[f"model.layers.{i}"], seen, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_whole_model_when_no_blocks() -> None:
    model = tiny_cnn()

    class _Fc:
        def observe(self, name: str, block: nn.Module) -> dict[str, Accumulator]:
            self.acc = _Keep()
            return {"fc2": self.acc}

        def compress(self, name: str, block: nn.Module, stats: dict[str, Any]) -> None:
            self.name = name

    fc = _Fc()
    x = example_input(model)
    run_sequential(model, [(x,)], fc, Context(progress=False))
    assert fc.name == "" and fc.acc.seen[0].shape == (4, 32)


def test_empty_calibration_is_an_error() -> None:
    model = tiny_llama()
    with pytest.raises(ConfigError, match="no batches"):
        capture_first_inputs(model, model.model.layers[0], [])


class _TwoReaders(nn.Module):
    """``a`` and ``b`` read the same tensor, except on calls where ``split`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor, split: bool = False) -> torch.Tensor:
        self.calls += 1
        return self.a(x) + self.b(x * 2 if split else x)


def test_layers_reading_one_tensor_share_one_accumulator() -> None:
    from slimtorch.calibrate.sequential import observe_block
    from slimtorch.calibrate.statistics import HessianAccumulator, InputNormAccumulator

    block = _TwoReaders()
    xs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    stats: dict = {"a": HessianAccumulator(4), "b": HessianAccumulator(4)}
    observe_block(block, [((x,), {}) for x in xs], stats)
    assert stats["a"] is stats["b"] and block.calls == 3
    expected = HessianAccumulator(4)
    for x in xs:
        expected.update(x)
    torch.testing.assert_close(stats["b"].hessian(), expected.hessian())
    # different accumulator types never share; a later batch that splits the readers makes
    # every layer observed alone (a second pass), with the right statistics for each
    mixed: dict = {"a": HessianAccumulator(4), "b": InputNormAccumulator(4)}
    observe_block(block, [((x,), {}) for x in xs], mixed)
    assert mixed["a"] is not mixed["b"]
    split = [((xs[0],), {}), ((xs[1],), {"split": True})]
    alone: dict = {"a": InputNormAccumulator(4), "b": InputNormAccumulator(4)}
    observe_block(block, split, alone)
    assert alone["a"] is not alone["b"]
    torch.testing.assert_close(alone["a"].sq_norm(), xs[0].pow(2).sum(0) + xs[1].pow(2).sum(0))
    torch.testing.assert_close(
        alone["b"].sq_norm(), xs[0].pow(2).sum(0) + (2 * xs[1]).pow(2).sum(0)
    )
