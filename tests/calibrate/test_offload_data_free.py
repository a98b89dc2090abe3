"""The offloaded path notes the experts no calibration token reached (``data_free_layers``) even
when it was interrupted and resumed: each block's names are kept with the block's part of the
artifact, not only in the memory of the process that compressed it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from slimtorch.calibrate.offload_work import WorkDir
from slimtorch.core.context import Context
from slimtorch.formats.artifact import read_manifest
from slimtorch.recipe import load_recipe
from slimtorch.testing.models import tiny_moe
from slimtorch.workflows.offloaded import compress_large

GPTQ = {"stages": [{"method": "quantize.gptq", "bits": 4, "group_size": 16,
                    "calibration": {"samples": 2, "batch_size": 1}}]}  # fmt: skip
CTX = Context(progress=False)


def _run(root: Path, out: str, work: str) -> dict[str, Any]:
    return compress_large(root / "ckpt", load_recipe(GPTQ), root / out, str(root / "one.txt"),
                          10**10, root / work, CTX, tokenizer="builtin:austen-lm")  # fmt: skip


def test_a_resumed_offloaded_run_lists_every_starved_expert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiny Mixtral (8 experts, top-1) calibrated on one repeated word: 7 experts a layer get
    no token. Killed after block 0 and resumed, the run lists the same 42 layers as a run that
    was not interrupted (before, only the blocks after the resume)."""
    model: Any = tiny_moe("mixtral", vocab=2048, hidden=32, intermediate=32, experts=8, top_k=1)
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "one.txt").write_text("the " * 600)
    _run(tmp_path, "whole", "w1")
    starved = read_manifest(tmp_path / "whole")["metadata"]["data_free_layers"]
    assert len(starved) == 2 * 7 * 3 and any(n.startswith("model.layers.0.") for n in starved)

    done = WorkDir.block_done

    def stop_after_first(self: WorkDir, block: int) -> None:
        done(self, block)
        if block == 0:
            raise KeyboardInterrupt  # a kill after block 0 was marked done

    monkeypatch.setattr(WorkDir, "block_done", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "again", "w2")
    monkeypatch.setattr(WorkDir, "block_done", done)
    _run(tmp_path, "again", "w2")
    assert read_manifest(tmp_path / "again")["metadata"]["data_free_layers"] == starved
