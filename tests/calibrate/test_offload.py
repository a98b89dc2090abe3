"""Offloaded sequential compression: same artifact as in memory, and resumable after a crash."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import slimtorch as st
from slimtorch.calibrate.offload import (
    Checkpoint,
    OffloadPlan,
    compress_offloaded,
    empty_parameters,
    return_freed_memory,
)
from slimtorch.calibrate.sequential import Accumulator, run_sequential
from slimtorch.core.context import Context
from slimtorch.formats.artifact import read_artifact
from slimtorch.formats.state import WeightState, apply_state


def _config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip


class _SumSq:
    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        sq = x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)
        self.value = sq if self.value is None else self.value + sq


class _Wanda:
    """Half of each row by |W| * ||x||, on every Linear of the block."""

    def __init__(self, crash_at: str | None = None) -> None:
        self.crash_at = crash_at

    def observe(self, name: str, block: nn.Module) -> dict[str, Accumulator]:
        return {n: _SumSq() for n, m in block.named_modules() if isinstance(m, nn.Linear)}

    def compress(self, name: str, block: nn.Module, stats: dict[str, Any]) -> None:
        if name == self.crash_at:
            raise KeyboardInterrupt
        for lname, acc in stats.items():
            layer = block.get_submodule(lname)
            score = layer.weight.detach().abs() * acc.value.sqrt().float()
            keep = score >= score.median(dim=1, keepdim=True).values
            apply_state(layer, "weight", WeightState(mask=keep))


def _batches() -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 64, (2, 8), generator=gen),) for _ in range(2)]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(_config()).save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    return tmp_path / "ckpt"


def _offloaded(ckpt_dir: Path, out: Path, work: Path, compressor: _Wanda) -> dict[str, Any]:
    with empty_parameters():
        model = LlamaForCausalLM(_config()).eval()
    plan = OffloadPlan(out, {"metadata": {}}, work, fingerprint="t")
    return compress_offloaded(
        model, Checkpoint(ckpt_dir), _batches(), [compressor], plan, Context(progress=False)
    )


def test_offloaded_equals_in_memory_and_resumes(checkpoint: Path, tmp_path: Path) -> None:
    assert len(list(checkpoint.glob("*.safetensors"))) > 1  # really sharded
    reference = LlamaForCausalLM.from_pretrained(checkpoint).eval()
    reference.config.use_cache = False
    run_sequential(reference, _batches(), _Wanda(), Context(progress=False))
    st.save(reference, tmp_path / "ref")
    want = read_artifact(tmp_path / "ref")

    _offloaded(checkpoint, tmp_path / "out", tmp_path / "work", _Wanda())
    got = read_artifact(tmp_path / "out")
    assert got.tensors.keys() == want.tensors.keys()
    for name, t in want.tensors.items():
        assert torch.equal(got.tensors[name], t), name
    assert got.states.keys() == want.states.keys()
    assert not (tmp_path / "work").exists()

    with pytest.raises(KeyboardInterrupt):
        _offloaded(checkpoint, tmp_path / "again", tmp_path / "w2", _Wanda("model.layers.2"))
    assert (tmp_path / "w2" / "block00001").exists() and not (tmp_path / "again").exists()
    _offloaded(checkpoint, tmp_path / "again", tmp_path / "w2", _Wanda())
    again = read_artifact(tmp_path / "again")
    for name, t in want.tensors.items():
        assert torch.equal(again.tensors[name], t), name


class _Recording(_Wanda):
    """Wanda that keeps each layer's input statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, torch.Tensor] = {}

    def compress(self, name: str, block: nn.Module, stats: dict[str, Any]) -> None:
        self.seen.update({f"{name}.{k}": acc.value for k, acc in stats.items()})
        super().compress(name, block, stats)


def test_in_memory_calibration_ignores_the_models_kv_cache() -> None:
    """With ``use_cache`` on (a Hugging Face LLM's default), a KV cache kept between the two
    passes over a block fed the next block the keys/values of the block before compression."""
    seen = []
    for use_cache in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(_config()).eval()
        model.config.use_cache = use_cache
        recording = _Recording()
        run_sequential(model, _batches(), recording, Context(progress=False))
        assert model.config.use_cache is use_cache  # restored
        seen.append(recording.seen)
    assert seen[0].keys() == seen[1].keys() and len(seen[0]) == 3 * 7
    for key, value in seen[0].items():
        assert torch.equal(seen[1][key], value), key


_FREED_MEMORY_SCRIPT = """
import os, torch
from slimtorch.calibrate.offload import return_freed_memory

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

if not return_freed_memory(mmap_threshold=1 << 20):
    print("skip")
else:
    for _ in range(2):  # without the fix glibc raises its mmap threshold after the 1st free
        before = resident()
        big = torch.ones(16 << 20, dtype=torch.uint8)  # 16 MiB, touched: resident
        grown = resident() - before
        del big
    print(grown >> 20, (resident() - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc: Linux only")
def test_return_freed_memory_hands_big_frees_back() -> None:
    import subprocess

    # a fresh interpreter: RSS deltas inside the test process move with every other test
    out = subprocess.run(
        [sys.executable, "-c", _FREED_MEMORY_SCRIPT], capture_output=True, text=True, check=True
    ).stdout.split()
    if out == ["skip"]:
        pytest.skip("the C library is not glibc")
    grown, left = (int(v) for v in out)
    assert grown >= 12  # MiB
    assert left < 4  # its own mapping: gone as soon as it is freed (kept: 15 MiB)


def test_return_freed_memory_elsewhere_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert return_freed_memory(mmap_threshold=1 << 20) is False
