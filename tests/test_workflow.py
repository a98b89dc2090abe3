"""Workflows behind the CLI, on the real builtin LeNet-5 and Fashion-MNIST."""

from __future__ import annotations

import pytest

from slimtorch import workflow
from slimtorch.core.context import Context
from slimtorch.zoo import data_images

CTX = Context(progress=False)
KEYS = {
    "bytes_on_disk",
    "dense_bytes",
    "compression_ratio",
    "params",
    "nonzero_params",
    "latency_ms",
    "metric",
    "value",
    "baseline_value",
    "baseline_latency_ms",
}


def _clear_caches() -> None:
    for fn in vars(data_images).values():
        clear = getattr(fn, "cache_clear", None)
        if callable(clear):
            clear()


def test_int8_lenet5_keeps_accuracy_and_shrinks(tmp_path) -> None:
    report = workflow.compress_to_dir("builtin:lenet5-fashion", "int8", tmp_path / "a", ctx=CTX)
    assert set(report) >= KEYS
    assert report["metric"] == "accuracy"
    assert abs(report["value"] - report["baseline_value"]) <= 0.3
    assert report["compression_ratio"] > 3.5
    again = workflow.evaluate_dir(tmp_path / "a", ctx=CTX)
    assert again["value"] == report["value"]
    assert again["baseline_value"] == report["baseline_value"]
    rows = workflow.inspect_dir(tmp_path / "a")["layers"]
    assert {r["name"] for r in rows} >= {"conv1.weight", "fc1.weight"}
    assert all(r["encoding"] in {"quant", "dense"} for r in rows)


def test_demo_falls_back_without_debian_data(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(data_images.FASHION_DIR_ENV, str(tmp_path / "nothing-here"))
    _clear_caches()
    try:
        report = workflow.demo(ctx=CTX)
    finally:
        monkeypatch.delenv(data_images.FASHION_DIR_ENV)
        _clear_caches()
    assert report["recipe"] == "int8" and "not installed" in report["note"]
    assert report["value"] > 85 and report["compression_ratio"] > 3.5


@pytest.mark.slow
def test_demo_meets_the_foundation_targets() -> None:
    report = workflow.demo(ctx=CTX)
    assert report["recipe"] == "sparse90-int8"
    assert report["baseline_value"] - report["value"] <= 0.5
    assert report["compression_ratio"] >= 10
    assert report["nonzero_params"] < 0.11 * report["params"]


def test_local_hugging_face_directory(tmp_path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    import slimtorch as st

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    BertModel(config).save_pretrained(tmp_path / "hf")
    report = workflow.compress_to_dir(str(tmp_path / "hf"), "int4", tmp_path / "a", ctx=CTX)
    assert report["compression_ratio"] > 3 and report["latency_ms"] > 0
    assert report["metric"] is None  # no evaluator is known for an arbitrary directory
    from slimtorch.models import load_model

    loaded = load_model(str(tmp_path / "hf"))
    compressed = st.compress(loaded.model, "int4").model  # same deterministic recipe
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    reloaded = st.load(tmp_path / "a")
    assert type(reloaded).__name__ == "BertModel"
    with torch.no_grad():
        assert torch.equal(reloaded(ids).last_hidden_state, compressed(ids).last_hidden_state)
