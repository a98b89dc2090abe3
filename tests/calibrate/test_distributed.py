"""Data-parallel layer-wise calibration (torch.distributed, gloo on CPU): the pure parts, and
two real processes giving the single-process artifact bit for bit; a killed rank fails the job
with one message and no artifact.

The two-process runs start ``python -m torch.distributed.run --standalone`` (a free port of its
own) on this very file, whose ``__main__`` part is one rank's work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from slimtorch.calibrate.distributed import (
    assign_owners,
    layer_cost,
    shard_range,
    state_from_header,
    state_header,
)
from slimtorch.formats.state import QuantState, WeightState

HERE = Path(__file__).resolve()
CAL = {"samples": 4, "batch_size": 1}
HEADS = {"method": "quantize.rtn", "bits": 8, "granularity": "per_channel",
         "targets": ["Embedding", "lm_head"], "missing": "skip"}  # fmt: skip
RECIPES: dict[str, list[dict[str, Any]]] = {
    "gptq": [{"method": "quantize.gptq", "bits": 4, "group_size": 16, "calibration": CAL}, HEADS],
    "awq": [{"method": "quantize.awq", "bits": 4, "group_size": 16, "calibration": CAL}],
    "sparsegpt": [{"method": "prune.sparsegpt", "sparsity": 0.5, "calibration": CAL}],
    "wanda-owl": [{"method": "prune.wanda", "sparsity": 0.5, "owl": True, "calibration": CAL}],
    "smoothquant": [{"method": "quantize.smoothquant", "calibration": CAL}],
}


def test_shards_are_contiguous_in_rank_order() -> None:
    assert [shard_range(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [shard_range(2, r, 2) for r in range(2)] == [(0, 1), (1, 2)]
    with pytest.raises(ValueError):
        shard_range(4, 2, 2)


def test_owners_balance_the_work() -> None:
    costs = {"q": layer_cost((64, 64)), "k": layer_cost((16, 64)), "v": layer_cost((16, 64)),
             "up": layer_cost((128, 64)), "down": layer_cost((64, 128))}  # fmt: skip
    assert layer_cost((128, 64)) == 128 * 64 * 64
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(dict(reversed(list(costs.items()))), 2)  # order-free
    load = [sum(c for n, c in costs.items() if owners[n] == r) for r in range(2)]
    assert owners["down"] != owners["up"] and max(load) <= 0.6 * sum(load)
    assert set(assign_owners(costs, 1).values()) == {0}


def test_a_weight_state_round_trips_through_its_header() -> None:
    q = QuantState("affine", 4, False, "per_group", torch.randint(0, 16, (4, 32), dtype=torch.uint8),
                   torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.int32), 16, "float16")  # fmt: skip
    state = WeightState(mask=torch.rand(4, 32) > 0.5, quant=q, extra={"k": 1})
    header, tensors = state_header(state)
    back = state_from_header(json.loads(json.dumps(header)), tensors)
    assert torch.equal(back.mask, state.mask) and back.extra == {"k": 1}  # type: ignore[arg-type]
    assert back.quant is not None and back.quant.scale_dtype == "float16"
    assert torch.equal(back.quant.codes, q.codes) and back.quant.codebook is None
    assert state_header(None) == ({"none": True}, [])


def test_one_message_names_the_rank_that_failed_first(tmp_path: Path) -> None:
    from slimtorch.workflows.compress_distributed import failure, without_nproc

    assert without_nproc(["compress", "--nproc", "2", "--out", "o", "--nproc=3"]) == [
        "compress", "--out", "o"]  # fmt: skip
    log = "local_rank: 1 (pid: 9) ...\nRoot Cause (first observed failure):\n[0]:\n"
    log += "  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 8411)  (SIGKILL)\n"
    assert failure(tmp_path, log, 2) == (
        "rank 1 of 2 was killed by signal 9; the job stopped and wrote no artifact", 1)  # fmt: skip
    both = "Failures:\n[1]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 8411)\n"
    both += "Root Cause (first observed failure):\n[0]:\n  rank      : 0 (local_rank: 0)\n"
    both += "  exitcode  : -6 (pid: 8410)\n"  # rank 0 aborted on the lost peer, observed first
    assert failure(tmp_path, both, 2)[0].startswith("rank 1 of 2 was killed by signal 9")
    assert failure(tmp_path, both.replace("-9", "-15"), 2)[0].startswith("rank 0 of 2 was ")
    peer = {"rank": 0, "message": "rank 0: all_reduce failed", "kind": "peer", "at": 1.0}
    (tmp_path / "rank0.json").write_text(json.dumps(peer))
    assert "signal 9" in failure(tmp_path, log, 2)[0]  # a peer's failure is a consequence
    own = {"rank": 1, "message": "no calibration data", "kind": "input", "at": 2.0}
    (tmp_path / "rank1.json").write_text(json.dumps(own))
    assert failure(tmp_path, log, 2) == ("rank 1 of 2 failed: no calibration data", 2)
    assert "last output: boom" in failure(tmp_path / "none", "boom", 2)[0]


def _model() -> Any:
    from slimtorch.testing.models import tiny_llama

    return tiny_llama(vocab=2048, hidden=32, intermediate=64, heads=4, kv_heads=2, std=0.1)


def _task() -> Any:
    from slimtorch.calibrate.lm import CausalLMTask

    ids = torch.randint(0, 2048, (4096,), generator=torch.Generator().manual_seed(0))
    return CausalLMTask(ids, window=32)


def _compress(method: str) -> torch.nn.Module:
    import slimtorch as st

    return st.compress(_model(), {"stages": RECIPES[method]}, _task()).model


def _torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip


def test_two_gloo_processes_give_the_single_process_artifact(tmp_path: Path) -> None:
    """GPTQ (+ RTN heads), AWQ, SparseGPT, Wanda with OWL, SmoothQuant: every tensor and every
    compression state of the two-process artifact equals the one-process one, bit for bit."""
    import slimtorch as st
    from slimtorch.formats.artifact import read_artifact

    done = _torchrun(str(HERE), str(tmp_path / "two"))
    assert done.returncode == 0, done.stdout + done.stderr
    traffic = json.loads((tmp_path / "two" / "traffic.json").read_text())
    for method in RECIPES:
        st.save(_compress(method), tmp_path / "one" / method)
        one = read_artifact(tmp_path / "one" / method)
        two = read_artifact(tmp_path / "two" / method)
        assert one.tensors.keys() == two.tensors.keys(), method
        for name, t in one.tensors.items():
            assert torch.equal(t, two.tensors[name]), (method, name)
        assert one.states.keys() == two.states.keys(), method
        assert one.states or method == "smoothquant", method  # scales folded, nothing stored
        for name, s in one.states.items():
            o = two.states[name]
            assert (s.mask is None) == (o.mask is None), (method, name)
            assert s.mask is None or torch.equal(s.mask, o.mask), (method, name)  # type: ignore[arg-type]
            if s.quant is not None:
                assert o.quant is not None and torch.equal(s.quant.codes, o.quant.codes)
                assert torch.equal(s.quant.scale, o.quant.scale), (method, name)
    gptq = traffic["gptq"]
    assert gptq["world"] == 2 and gptq["blocks"] == ["model.layers.0", "model.layers.1"]
    assert all(b > 0 for rank in gptq["bytes_sent_per_block"] for b in rank)


def test_a_killed_rank_fails_the_job_with_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rank 1 is SIGKILLed at block 1, while rank 0 waits for its statistics: the job exits 1
    with one line naming rank 1 and the signal, and no artifact (nor its build directory)."""
    from slimtorch.cli.main import main

    ckpt = tmp_path / "ckpt"
    _model().save_pretrained(ckpt)
    recipe = tmp_path / "r.yaml"  # JSON is YAML
    recipe.write_text(json.dumps({"stages": RECIPES["gptq"][:1]}))
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man. " * 200)
    monkeypatch.setenv("SLIMTORCH_DIST_FAULT", "1:1:kill")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["compress", "--model", str(ckpt), "--recipe", str(recipe), "--out", str(out),
                 "--tokenizer", "builtin:austen-lm", "--data", str(text), "--llm-windows", "0",
                 "--nproc", "2"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "rank 1 of 2" in err[0] and "signal 9" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "r.yaml", "text.txt"]


def test_offloading_composes_and_training_is_refused_before_any_process_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-memory runs under torchrun (tests/calibrate/test_distributed_offload.py); a stage
    that trains would train one copy per rank: refused (exit 2) before torchrun starts."""
    from slimtorch.cli.main import main
    from slimtorch.recipe import load_recipe
    from slimtorch.workflows.compress import CompressOptions, check_distributable

    check_distributable(load_recipe("w4a16-gptq"), CompressOptions(max_memory="1GB", work_dir="w"))
    code = main(["compress", "--model", "builtin:austen-lm", "--recipe", "nm24", "--out",
                 str(tmp_path / "o"), "--max-memory", "1GB", "--nproc", "2"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "train.finetune" in err and "one process" in err, err
    assert not (tmp_path / "o").exists()


def _rank_main(out: Path) -> None:
    """One rank: every recipe of RECIPES on the same tiny Llama; rank 0 saves the artifacts."""
    import slimtorch as st
    from slimtorch.calibrate import distributed

    comm = distributed.init_from_env("cpu")
    traffic = {}
    for method, stages in RECIPES.items():
        comm.blocks.clear()
        model = st.compress(_model(), {"stages": stages}, _task()).model
        traffic[method] = distributed.traffic(comm)
        if comm.rank == 0:
            st.save(model, out / method)
    if comm.rank == 0:
        (out / "traffic.json").write_text(json.dumps(traffic))
    distributed.shutdown()


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
