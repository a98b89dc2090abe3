"""bench/device_check.py: its CPU dry run (the GPU run's code paths on a tiny Llama) and its
refusal without a GPU; the GPU run itself is a manual step on a lent machine."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPT = BENCH / "device_check.py"


def _load() -> ModuleType:
    if str(BENCH) not in sys.path:  # as `python bench/device_check.py` has it: device_speed
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = module
    spec.loader.exec_module(module)
    return module


def test_refuses_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    dc = _load()
    assert dc.main(["--out", str(tmp_path / "r.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(SystemExit):
        dc.parse_args(["--out", "x.json", "--samples", "0"])


def test_cpu_dry_run_gptq_and_layers(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    dc = _load()
    out = tmp_path / "dc.json"
    rc = dc.main(
        [
            "--cpu-dry-run",
            "--out",
            str(out),
            "--skip",
            "decode,distributed,gptq_austen_lm,offloaded",
        ]
    )
    data = json.loads(out.read_text())
    assert rc == 0, data
    assert data["meta"]["dry_run"] is True and data["env"]["device"] == "cpu"
    gptq = data["gptq"]
    # the same device twice: GPTQ is deterministic, so the comparison must find no difference
    assert gptq["identical"] is True and gptq["fraction_codes_differing"] == 0.0
    assert gptq["codes"] > 0 and len(gptq["layers"]) == 14
    rows = data["layers"]
    assert rows and all("dense_ms" in r and "int4_ms" in r and "2:4_ms" in r for r in rows)
    assert not list(tmp_path.glob("*.part"))


def test_cpu_dry_run_offloaded_and_eval(tmp_path: Path) -> None:
    """The ``offloaded`` section: offloaded GPTQ twice (the same device in the dry run, so the
    codes must be identical) and the artifact evaluated twice (the same perplexity), with the
    full report (original, decoding on the kernels) on the first device."""
    pytest.importorskip("transformers")
    dc = _load()
    out = tmp_path / "dc.json"
    skip = "gptq,gptq_austen_lm,distributed,decode,layers"
    assert dc.main(["--cpu-dry-run", "--out", str(out), "--skip", skip]) == 0
    data = json.loads(out.read_text())
    off = data["offloaded"]
    assert off["identical"] is True and off["codes"] > 0 and off["max_weight_diff"] == 0.0
    assert off["seconds_device"] > 0 and off["seconds_cpu"] > 0
    gpu, cpu = off["eval"]["device"], off["eval"]["cpu"]
    assert (
        gpu["metric"] == cpu["metric"] == "perplexity" and off["eval"]["perplexity_rel_diff"] == 0
    )
    assert gpu["baseline_value"] > 0 and gpu["tokens_per_s"] > 0 and gpu["decode_kernel_layers"] > 0
    assert cpu["tokens_per_s"] is None and cpu["latency_ms"] > 0
    assert not list(tmp_path.glob("*.part"))


def test_compare_codes_finds_differences() -> None:
    pytest.importorskip("transformers")
    import argparse

    dc = _load()
    model, what = dc.build_model(argparse.Namespace(cpu_dry_run=True, model="auto"))
    assert what.startswith("tiny")
    a, _ = dc.run_gptq(model, dc.calibration_ids(512, 4, 16), "cpu", 4)
    b, _ = dc.run_gptq(model, dc.calibration_ids(512, 4, 16) // 2, "cpu", 4)
    same = dc.compare_codes(a, a)
    diff = dc.compare_codes(a, b)
    assert same["identical"] and same["max_weight_diff"] == 0.0
    assert not diff["identical"] and 0.0 < diff["fraction_codes_differing"] < 1.0
    assert diff["max_code_diff"] >= 1 and diff["max_weight_diff"] > 0.0
