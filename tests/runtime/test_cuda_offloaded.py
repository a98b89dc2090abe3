"""Offloaded compression (``--max-memory``) with ``--device cuda``: the blocks calibrate and
compress on the GPU, the artifact and the inputs files are written from the CPU, and a run
started on one device resumes on the other. Skipped without a GPU (CI has none); the CPU side
of the same logic is tests/workflows/test_workflow_offloaded_device.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from slimtorch.calibrate import offload, offload_work
from slimtorch.calibrate.offload_work import WorkDir
from slimtorch.core.context import Context
from slimtorch.formats.artifact import read_artifact, read_manifest
from slimtorch.recipe import load_recipe
from slimtorch.workflows.offloaded import compress_large

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)"),
]

GPTQ = {"stages": [{"method": "quantize.gptq", "bits": 4, "group_size": 16, "act_order": True,
                    "calibration": {"samples": 8, "batch_size": 4}}]}  # fmt: skip
# GPU and CPU sum the Hessians and run the GPTQ updates in different orders: codes may differ
# by rounding. The stated bound: at most 2% of the 4-bit codes, none by more than 2 steps.
MAX_FRACTION, MAX_STEPS = 0.02, 2


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, use_cache=False, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _run(ckpt: Path, out: Path, work: Path, device: str, recipe: Any = GPTQ) -> None:
    compress_large(ckpt, load_recipe(recipe), out, None, 10**10, work,
                   Context(device=device, progress=False), tokenizer="builtin:austen-lm")  # fmt: skip


def _code_differences(a: Path, b: Path) -> tuple[float, int]:
    """(fraction of codes that differ, largest difference) between two artifacts."""
    sa, sb = read_artifact(a).states, read_artifact(b).states
    assert sa.keys() == sb.keys() and sa
    differ = total = steps = 0
    for name, state in sa.items():
        ca = state.quant.codes.to(torch.int32)  # type: ignore[union-attr]
        cb = sb[name].quant.codes.to(torch.int32)  # type: ignore[union-attr]
        differ, total = differ + int((ca != cb).sum()), total + ca.numel()
        steps = max(steps, int((ca - cb).abs().max()))
    return differ / total, steps


def test_offloaded_gptq_on_cuda_against_cpu(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calibration and GPTQ run on the GPU (the block's weights are there while it compresses),
    everything written is a CPU tensor, the tied embedding is stored once as on the CPU, and
    the codes are within the stated bound of the CPU run's."""
    placed: set[str] = set()
    written: set[str] = set()
    materialize, writer, saver = offload.materialize, offload.write_artifact, offload_work.save_file

    def spy_materialize(module: torch.nn.Module, *args: Any) -> None:
        materialize(module, *args)
        placed.update(p.device.type for p in module.parameters())

    def spy_write(path: Path, tensors: dict, states: dict, *args: Any, **kw: Any) -> None:
        written.update(t.device.type for t in tensors.values())
        written.update(s.quant.codes.device.type for s in states.values() if s.quant)
        writer(path, tensors, states, *args, **kw)

    def spy_save(tensors: dict, path: str) -> None:
        written.update(t.device.type for t in tensors.values())
        saver(tensors, path)

    monkeypatch.setattr(offload, "materialize", spy_materialize)
    monkeypatch.setattr(offload, "write_artifact", spy_write)
    monkeypatch.setattr(offload_work, "save_file", spy_save)
    _run(checkpoint, tmp_path / "gpu", tmp_path / "w1", "cuda")
    assert placed == {"cuda"} and written == {"cpu"}
    monkeypatch.undo()
    _run(checkpoint, tmp_path / "cpu", tmp_path / "w2", "cpu")
    fraction, steps = _code_differences(tmp_path / "gpu", tmp_path / "cpu")
    assert fraction <= MAX_FRACTION and steps <= MAX_STEPS, (fraction, steps)
    gpu, cpu = read_manifest(tmp_path / "gpu"), read_manifest(tmp_path / "cpu")
    assert gpu["aliases"] == cpu["aliases"]
    assert (
        read_artifact(tmp_path / "gpu").tensors.keys()
        == read_artifact(tmp_path / "cpu").tensors.keys()
    )


def test_offloaded_with_rtn_heads_on_cuda_keeps_the_tie(checkpoint: Path, tmp_path: Path) -> None:
    """The w4a16 presets' 8-bit embedding / LM head computed on the GPU and written from CPU
    copies: one stored tensor for the tied pair, as on the CPU (the storage-keyed copies)."""
    heads = {"method": "quantize.rtn", "bits": 8, "granularity": "per_channel",
             "targets": ["Embedding", "lm_head"], "missing": "skip"}  # fmt: skip
    recipe = {"stages": [*GPTQ["stages"], heads]}
    _run(checkpoint, tmp_path / "gpu", tmp_path / "w1", "cuda", recipe)
    _run(checkpoint, tmp_path / "cpu", tmp_path / "w2", "cpu", recipe)
    gpu, cpu = read_manifest(tmp_path / "gpu"), read_manifest(tmp_path / "cpu")
    assert gpu["aliases"] == cpu["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    a, b = read_artifact(tmp_path / "gpu"), read_artifact(tmp_path / "cpu")
    assert torch.equal(a.states["lm_head.weight"].quant.codes,  # type: ignore[union-attr]
                       b.states["lm_head.weight"].quant.codes)  # type: ignore[union-attr]  # fmt: skip


@pytest.mark.parametrize(("first", "then"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_resume_on_the_other_device(
    first: str, then: str, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after block 0 on one device, resumed on the other: the saved inputs (CPU
    tensors) go to the new device and the run finishes; block 0 is the first device's."""
    done = WorkDir.block_done

    def stop_after_first(self: WorkDir, block: int) -> None:
        done(self, block)
        if block == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(WorkDir, "block_done", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        _run(checkpoint, tmp_path / "out", tmp_path / "w", first)
    monkeypatch.undo()
    _run(checkpoint, tmp_path / "out", tmp_path / "w", then)
    _run(checkpoint, tmp_path / "whole", tmp_path / "w2", first)
    resumed, whole = read_artifact(tmp_path / "out"), read_artifact(tmp_path / "whole")
    for name, state in whole.states.items():
        if name.startswith("model.layers.0."):
            assert torch.equal(resumed.states[name].quant.codes, state.quant.codes), name  # type: ignore[union-attr]
    fraction, steps = _code_differences(tmp_path / "out", tmp_path / "whole")
    assert fraction <= MAX_FRACTION and steps <= MAX_STEPS, (fraction, steps)
