"""Stages that swap runtime modules in, on the offloaded path (``--max-memory``):
``quantize.activations`` (the w4a8 / w4a4 QuaRot presets' per-token activations, after the
rotation's online Hadamards and GPTQ) wraps each block's Linear layers as the block streams by;
the artifact is the in-memory one (tensors, states, manifest module records in the same order),
loads with the same logits and survives a kill and a resume. ``quantize.fp8 activations:
dynamic``: test_workflow_offloaded_floats.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_workflow_offloaded_rotate import (
    GPTQ,
    HEADS,
    ROTATE,
    _assert_same,
    _checkpoint,
    _cli,
    _in_memory,
    _logits,
    _offloaded,
)
from test_workflow_offloaded_rotate import HERE as RANK_SCRIPT

from slimtorch.core.errors import ConfigError, TargetError
from slimtorch.formats.artifact import read_manifest

ACT8 = {"method": "quantize.activations", "bits": 8, "targets": ["Linear"],
        "ignore": ["lm_head", "embed_out"]}  # fmt: skip
ACT4 = {**ACT8, "bits": 4, "clip": 0.9}
W4A8 = [ROTATE, GPTQ, HEADS, ACT8]  # the w4a8-quarot-gptq preset's stages, small calibration


def _records(path: Path) -> list[dict[str, Any]]:
    return read_manifest(path)["modules"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("stages", "tied"),
    [(W4A8, True), ([ROTATE, GPTQ, HEADS, ACT4], False),
     ([{**ROTATE, "online_o_proj": True}, {**ACT4, "ignore": ["lm_head", "re:.*\\.0\\.mlp\\..*"]}, GPTQ],
      False)],
    ids=["w4a8-tied", "w4a4", "act-before-gptq-o-proj-regex-ignore"],
)  # fmt: skip
def test_offloaded_activations_equal_in_memory(
    stages: list[dict[str, Any]], tied: bool, tmp_path: Path
) -> None:
    """Offloaded = in memory: the same tensors and states, the same module records (an
    ActQuantLinear inside each online Hadamard, in the order the in-memory save lists them),
    the same logits. Third case: the activations quantized before GPTQ calibrates (its
    Hessians see the rounded inputs, the next block's inputs too), with a regex ``ignore``
    matched on full names (block 0's MLP left alone)."""
    ckpt = _checkpoint(tmp_path / "ckpt", tied)
    _offloaded(ckpt, stages, tmp_path / "off", tmp_path / "w")
    _in_memory(ckpt, stages, tmp_path / "mem")
    _assert_same(tmp_path / "off", tmp_path / "mem")
    records = _records(tmp_path / "off")
    assert records == _records(tmp_path / "mem")
    act = next(s for s in stages if s["method"] == "quantize.activations")
    wrapped = {r["name"] for r in records if r["type"] == "ActQuantLinear"}
    assert {r["config"]["bits"] for r in records if r["type"] == "ActQuantLinear"} == {act["bits"]}
    assert "model.layers.1.mlp.down_proj.linear" in wrapped  # inside the online Hadamard
    skipped = any(n.startswith("re:") for n in act["ignore"])
    assert ("model.layers.0.mlp.up_proj" in wrapped) is not skipped
    assert len(wrapped) == 3 * 7 - (3 if skipped else 0)
    assert torch.equal(_logits(tmp_path / "off"), _logits(tmp_path / "mem"))


def test_activations_offloaded_run_resumes_after_a_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted as block 2 (of 3) is wrapped, the same command resumes after block 1 (whose
    ActQuantLinear modules are in its written part) and writes the uninterrupted artifact."""
    from slimtorch.calibrate.swaps import SwapParts

    ckpt = _checkpoint(tmp_path / "ckpt", tied=False)
    _offloaded(ckpt, W4A8, tmp_path / "whole", tmp_path / "w1")
    original = SwapParts.compress

    def crash(self: SwapParts, name: str, block: Any, stats: Any) -> None:
        if name == "model.layers.2":
            raise KeyboardInterrupt
        original(self, name, block, stats)

    monkeypatch.setattr(SwapParts, "compress", crash)
    with pytest.raises(KeyboardInterrupt):
        _offloaded(ckpt, W4A8, tmp_path / "again", tmp_path / "w2")
    progress = json.loads((tmp_path / "w2" / "progress.json").read_text())
    assert progress["done"] == 1 and not (tmp_path / "again").exists()
    monkeypatch.setattr(SwapParts, "compress", original)
    _offloaded(ckpt, W4A8, tmp_path / "again", tmp_path / "w2")
    _assert_same(tmp_path / "again", tmp_path / "whole")
    assert _records(tmp_path / "again") == _records(tmp_path / "whole")
    assert not (tmp_path / "w2").exists()


def test_swap_refusals(tmp_path: Path) -> None:
    """Up front, before any block is written, naming the fix: a swap of the LM head before a
    calibrated stage (the layers outside the blocks are compressed again from the checkpoint
    at the end), targets that match nothing (as in memory), a stage that still needs the whole
    model (dynamic int8)."""
    ckpt = _checkpoint(tmp_path / "ckpt", tied=False, layers=2)
    every = {"method": "quantize.activations", "bits": 8}
    with pytest.raises(
        ConfigError, match=r"quantize.activations before a calibrated stage.*lm_head"
    ):
        _offloaded(ckpt, [every, GPTQ], tmp_path / "o", tmp_path / "w")
    fp8 = {"method": "quantize.fp8", "activations": "dynamic"}
    with pytest.raises(ConfigError, match=r"quantize.fp8 before a calibrated stage.*lm_head"):
        _offloaded(ckpt, [fp8, GPTQ], tmp_path / "o", tmp_path / "w")
    with pytest.raises(TargetError):
        _offloaded(ckpt, [{**every, "targets": ["nope"]}], tmp_path / "o", tmp_path / "w")
    with pytest.raises(ConfigError, match=r"\['quantize.dynamic_int8'\] need the whole model"):
        _offloaded(ckpt, [{"method": "quantize.dynamic_int8"}], tmp_path / "o", tmp_path / "w")
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


@pytest.mark.slow
def test_two_ranks_give_the_one_process_artifact(tmp_path: Path) -> None:
    """Under torchrun (2 gloo ranks, each wrapping its copy of every block): the one-process
    artifact, module records included."""
    ckpt = _checkpoint(tmp_path / "ckpt", tied=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"stages": W4A8}))
    assert _cli(ckpt, recipe, tmp_path / "one", tmp_path / "w1")["offloaded"] is True
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = [str(RANK_SCRIPT), str(ckpt), str(recipe), str(tmp_path / "two"), str(tmp_path / "w2")]
    done = subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _assert_same(tmp_path / "two", tmp_path / "one")
    assert _records(tmp_path / "two") == _records(tmp_path / "one")
    assert not (tmp_path / "w2").exists()
