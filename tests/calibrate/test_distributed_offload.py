"""Offloaded compression (``--max-memory``, block by block from a checkpoint, resumable) on two
gloo processes: the artifact is the one-process offloaded artifact bit for bit (a tiny Mixtral's
too, with the experts no calibration token reached listed in its ``data_free_layers`` as in
memory), and a job whose rank 1 is SIGKILLed resumes, with the same two processes, to that same
artifact; resuming on another number of processes is refused with the fix.

A tiny checkpoint is far below any real ``--max-memory`` (the estimate counts the process's own
resident memory, hundreds of MiB with torch imported), so both sides leave that term out
(``_resident_now`` -> 0) and pass ``--max-memory 1MB``: the checkpoint (0.64 MB in float32) is
then more than half of the budget and runs offloaded, as a big one does. The two-process runs
start ``python -m torch.distributed.run`` on this very file (its ``__main__`` part is a rank)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError

HERE = Path(__file__).resolve()
BUDGET = "1MB"
CAL = {"samples": 4, "batch_size": 1}
MOE_CAL = {"samples": 2, "batch_size": 1}
HEADS = {"method": "quantize.rtn", "bits": 8, "granularity": "per_channel",
         "targets": ["Embedding", "lm_head"], "missing": "skip"}  # fmt: skip
RECIPES: dict[str, list[dict[str, Any]]] = {
    "gptq": [{"method": "quantize.gptq", "bits": 4, "group_size": 16, "calibration": CAL}, HEADS],
    "awq": [{"method": "quantize.awq", "bits": 4, "group_size": 16, "calibration": CAL}],
    # the tiny Mixtral (checkpoint ckpt-moe) on a text of one repeated word: every token takes
    # the same expert (top-1), the 7 others of each layer get none and are rounded to nearest
    "moe": [{"method": "quantize.gptq", "bits": 4, "group_size": 16, "calibration": MOE_CAL}],
}


def _compress(
    root: Path, method: str, out: Path, work: Path | None, budget: str | None = BUDGET
) -> dict[str, Any]:
    """``slimtorch compress --max-memory 1MB`` (the estimate without the process's own memory)
    of ``method`` on its checkpoint (in memory: ``budget`` None)."""
    from slimtorch.workflows import offloaded
    from slimtorch.workflows.compress import CompressOptions, compress_to_dir

    offloaded._resident_now = lambda: 0  # type: ignore[assignment]
    moe = method == "moe"
    options = CompressOptions(max_memory=budget, work_dir=str(work) if work else None,
                              tokenizer="builtin:austen-lm", llm_windows=0,
                              data=str(root / "moe.txt") if moe else None)  # fmt: skip
    ckpt, recipe = root / ("ckpt-moe" if moe else "ckpt"), root / f"{method}.yaml"
    return compress_to_dir(str(ckpt), str(recipe), out, options, Context(progress=False))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint, the recipes and the one-process offloaded artifacts."""
    from slimtorch.formats.artifact import read_manifest
    from slimtorch.testing.models import tiny_llama, tiny_moe
    from slimtorch.workflows import offloaded

    root = tmp_path_factory.mktemp("dist-offload")
    model: Any = tiny_llama(vocab=2048, hidden=32, intermediate=64, heads=4, kv_heads=2, std=0.1,
                       layers=3)  # fmt: skip
    model.save_pretrained(root / "ckpt")
    assert offloaded.checkpoint_fp32_bytes(root / "ckpt") > offloaded.parse_bytes(BUDGET) // 2
    moe: Any = tiny_moe("mixtral", vocab=2048, hidden=32, intermediate=32, experts=8, top_k=1)
    moe.save_pretrained(root / "ckpt-moe")
    assert offloaded.checkpoint_fp32_bytes(root / "ckpt-moe") > offloaded.parse_bytes(BUDGET) // 2
    (root / "moe.txt").write_text("the " * 600)
    saved = offloaded._resident_now
    try:
        for method, stages in RECIPES.items():
            (root / f"{method}.yaml").write_text(json.dumps({"stages": stages}))  # JSON is YAML
            report = _compress(root, method, root / "one" / method, root / "work-one")
            assert report["offloaded"] is True and "distributed" not in report
        _compress(root, "moe", root / "memory-moe", None, budget=None)
    finally:
        offloaded._resident_now = saved  # type: ignore[assignment]
    starved = read_manifest(root / "memory-moe")["metadata"]["data_free_layers"]
    assert len(starved) == 2 * 7 * 3  # 2 layers x 7 idle experts x 3 Linears
    assert read_manifest(root / "one" / "moe")["metadata"]["data_free_layers"] == starved
    return root


def _torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*cmd, str(HERE), *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip


def _assert_same(one: Path, two: Path) -> None:
    from slimtorch.formats.artifact import read_artifact, read_manifest

    a, b = read_artifact(one), read_artifact(two)
    assert a.tensors.keys() == b.tensors.keys() and a.states.keys() == b.states.keys()
    for name, t in a.tensors.items():
        assert torch.equal(t, b.tensors[name]), name
    assert a.states, one
    for name, s in a.states.items():
        o = b.states[name]
        assert s.quant is not None and o.quant is not None, name
        assert torch.equal(s.quant.codes, o.quant.codes), name
        assert torch.equal(s.quant.scale, o.quant.scale), name
    assert read_manifest(one)["metadata"]["offloaded"] is True
    assert read_manifest(one)["metadata"] == read_manifest(two)["metadata"]


def test_two_ranks_offloaded_give_the_one_process_artifact(setup: Path, tmp_path: Path) -> None:
    """GPTQ (+ RTN of the embedding and LM head: every rank), AWQ (a whole block per owner) and
    GPTQ of the tiny Mixtral (its metadata, ``data_free_layers`` included, is the same)."""
    reports = tmp_path / "reports"
    done = _torchrun(str(setup), str(tmp_path / "two"), str(reports), *RECIPES)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    for method in RECIPES:
        _assert_same(setup / "one" / method, tmp_path / "two" / method)
        report = json.loads((reports / f"{method}.json").read_text())
        assert report["offloaded"] is True and report["distributed"]["world"] == 2
        sent = report["distributed"]["bytes_sent_per_block"]
        assert len(sent) == 2 and all(b > 0 for rank in sent for b in rank), method
        assert not (tmp_path / "two" / f"work-{method}").exists()  # cleaned by every rank


def test_a_killed_rank_resumes_on_the_same_ranks(setup: Path, tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed as block 2 (of 3) starts: the job fails naming it, nothing is
    written at --out, the progress holds a block both ranks finished and each rank's inputs of
    the next one; one process refuses that work dir naming --nproc 2; the same two-process
    command resumes after the finished block and gives the uninterrupted artifact."""
    from slimtorch.calibrate.distributed import FAULT_ENV
    from slimtorch.workflows.compress_distributed import failure

    out, reports = tmp_path / "two", tmp_path / "reports"
    work = out / "work-gptq"
    killed = _torchrun(str(setup), str(out), str(reports), "gptq", env={FAULT_ENV: "1:2:kill"})
    assert killed.returncode != 0
    message, code = failure(tmp_path / "no-errors", killed.stderr, 2)
    assert code == 1 and message.startswith("rank 1 of 2 was killed by signal 9"), message
    assert not (out / "gptq").exists() and not list(out.glob(".gptq.tmp-*"))
    progress = json.loads((work / "progress.json").read_text())
    assert progress["world"] == 2 and progress["done"] in (0, 1), progress
    nxt = progress["done"] + 1
    assert (work / f"block{progress['done']:05d}").is_dir()
    assert {p.name for p in work.glob(f"inputs{nxt:05d}.rank*.safetensors")} == {
        f"inputs{nxt:05d}.rank0.safetensors", f"inputs{nxt:05d}.rank1.safetensors"}  # fmt: skip

    from slimtorch.workflows import offloaded

    saved = offloaded._resident_now
    try:
        with pytest.raises(ConfigError, match=r"started on 2 process\(es\).*--nproc 2"):
            _compress(setup, "gptq", tmp_path / "one", work)
    finally:
        offloaded._resident_now = saved  # type: ignore[assignment]
    assert (work / "progress.json").is_file() and not (tmp_path / "one").exists()

    resumed = _torchrun(str(setup), str(out), str(reports), "gptq")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr
    assert f"resuming after block {progress['done']}" in resumed.stderr
    _assert_same(setup / "one" / "gptq", out / "gptq")
    assert not work.exists()


def _rank_main(root: Path, out: Path, reports: Path, methods: list[str]) -> None:
    """One rank: each recipe offloaded from the checkpoint, into ``out/METHOD`` (rank 0)."""
    from slimtorch.calibrate import distributed

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    comm = distributed.init_from_env("cpu")
    try:
        for method in methods:
            comm.blocks.clear()
            report = _compress(root, method, out / method, out / f"work-{method}")
            if comm.rank == 0:
                reports.mkdir(parents=True, exist_ok=True)
                (reports / f"{method}.json").write_text(json.dumps(report))
            else:
                assert report["out"] is None
    finally:
        distributed.shutdown()


if __name__ == "__main__":  # a rank: ends as `python -m slimtorch` ranks do (exit_rank)
    from slimtorch.calibrate.distributed import exit_rank

    try:
        _rank_main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
    except BaseException:
        traceback.print_exc()
        exit_rank(1)
    exit_rank(0)
