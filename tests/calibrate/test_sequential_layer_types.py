"""Every block is fed what it really receives: sliding-window and global attention layers
(Gemma2, Gemma3) get their own masks and rotary embeddings, in memory and offloaded."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from slimtorch.calibrate.capture import capture_block_inputs
from slimtorch.calibrate.sequential import Accumulator, run_sequential
from slimtorch.core.context import Context

CTX = Context(progress=False)


def _gemma(kind: str) -> nn.Module:
    torch.manual_seed(0)
    common = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
        use_cache=False,
    )  # fmt: skip
    if kind == "gemma2":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        return Gemma2ForCausalLM(Gemma2Config(**common)).eval()
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(**common, sliding_window_pattern=2)
    return Gemma3ForCausalLM(config).eval()


class _Keep:
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        self.seen.append(x.clone())


class _Recorder:
    """Observes every block's down_proj input (the attention output shapes it) unchanged."""

    def __init__(self) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {}

    def observe(self, name: str, block: nn.Module) -> dict[str, Accumulator]:
        return {"mlp.down_proj": _Keep()}

    def compress(self, name: str, block: nn.Module, stats: dict[str, Any]) -> None:
        self.inputs[name] = stats["mlp.down_proj"].seen


def _batches() -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 64, (2, 12), generator=gen),) for _ in range(2)]


def _reference(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """down_proj inputs of every block in plain forward passes of the model."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = f"model.layers.{i}") -> None:
            seen.setdefault(name, []).append(args[0].detach().clone())

        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    with torch.no_grad():
        for (ids,) in _batches():
            model(ids)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_sliding_and_global_layers_see_their_own_attention_inputs(kind: str) -> None:
    model = _gemma(kind)
    assert len(set(model.config.layer_types)) == 2  # both kinds, sequence 12 > window 4
    expected = _reference(model)
    rec = _Recorder()
    run_sequential(model, _batches(), rec, CTX)
    assert rec.inputs.keys() == expected.keys()
    for name, xs in expected.items():
        for got, want in zip(rec.inputs[name], xs, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    calls = capture_block_inputs(model, list(model.model.layers), _batches())
    masks = [c[0][1]["attention_mask"] for c in calls]  # batch 0 of each block
    assert masks[0] is not None and torch.equal(masks[0], masks[2])  # sliding, sliding
    assert masks[1] is None or not torch.equal(masks[0], masks[1])  # global: none or its own
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)  # restored


class _Scaled(nn.Module):
    """Doubles the hidden states between its blocks: no block gets what the last handed on."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x) * 2
        return x


def test_blocks_not_fed_directly_get_block_zero_inputs(caplog: pytest.LogCaptureFixture) -> None:
    model = _Scaled()
    xs = [(torch.randn(2, 4, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    with caplog.at_level(logging.WARNING):
        calls = capture_block_inputs(model, list(model.layers), xs)
    assert "changes the hidden states between its blocks" in caplog.text
    assert len(calls) == 3 and all(len(c) == 2 for c in calls)
    assert all(torch.equal(c[1][0][0], xs[1][0]) for c in calls)
    assert all("forward" not in layer.__dict__ for layer in model.layers)


class _Crash:
    """GPTQ that stops the run (like a kill) when it reaches block ``at``."""

    def __init__(self, inner: Any, at: str | None) -> None:
        self.inner, self.at = inner, at

    def observe(self, name: str, block: nn.Module) -> dict[str, Accumulator]:
        if name == self.at:
            raise KeyboardInterrupt
        return self.inner.observe(name, block)  # type: ignore[no-any-return]

    def compress(self, name: str, block: nn.Module, stats: dict[str, Any]) -> None:
        self.inner.compress(name, block, stats)


def test_offloaded_gemma2_equals_in_memory_and_resumes(tmp_path: Path) -> None:
    import slimtorch as st
    from slimtorch.calibrate.offload import (
        Checkpoint,
        OffloadPlan,
        compress_offloaded,
        empty_parameters,
    )
    from slimtorch.formats.artifact import read_artifact
    from slimtorch.quantize.stages.gptq import GPTQCompressor, GPTQConfig

    model = _gemma("gemma2")
    model.save_pretrained(tmp_path / "ckpt")
    config = GPTQConfig(bits=4, group_size=8)
    run_sequential(model, _batches(), GPTQCompressor(config), CTX)
    st.save(model, tmp_path / "mem")
    want = read_artifact(tmp_path / "mem")

    def offloaded(out: str, crash_at: str | None = None) -> None:
        with empty_parameters():
            empty = type(model)(model.config).eval()
        plan = OffloadPlan(tmp_path / out, {"metadata": {}}, tmp_path / "work", "f")
        gptq = _Crash(GPTQCompressor(config), crash_at)
        compress_offloaded(empty, Checkpoint(tmp_path / "ckpt"), _batches(), [gptq], plan, CTX)

    with pytest.raises(KeyboardInterrupt):
        offloaded("off", crash_at="model.layers.2")  # after a sliding and a global layer
    offloaded("off")  # resumes at block 2
    got = read_artifact(tmp_path / "off")
    assert got.tensors.keys() == want.tensors.keys() and got.states.keys() == want.states.keys()
    for name, t in want.tensors.items():
        assert torch.equal(got.tensors[name], t), name
    assert len(want.states) == 4 * 7
