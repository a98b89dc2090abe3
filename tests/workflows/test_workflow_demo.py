"""The demo workflow on the bundled LeNet-5, with and without Fashion-MNIST's training data."""

from __future__ import annotations

import pytest

from slimtorch.core.context import Context
from slimtorch.workflows.demo import demo
from slimtorch.zoo import data_images

CTX = Context(progress=False)


def _clear_caches() -> None:
    for fn in vars(data_images).values():
        clear = getattr(fn, "cache_clear", None)
        if callable(clear):
            clear()


def test_demo_falls_back_without_debian_data(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(data_images.FASHION_DIR_ENV, str(tmp_path / "nothing-here"))
    _clear_caches()
    try:
        report = demo(ctx=CTX)
    finally:
        monkeypatch.delenv(data_images.FASHION_DIR_ENV)
        _clear_caches()
    assert report["recipe"] == "int8" and "not installed" in report["note"]
    assert report["value"] > 85 and report["compression_ratio"] > 3.5


@pytest.mark.slow
def test_demo_meets_the_foundation_targets() -> None:
    report = demo(ctx=CTX)
    assert report["recipe"] == "sparse90-int8"
    assert report["baseline_value"] - report["value"] <= 0.5
    assert report["compression_ratio"] >= 10
    assert report["nonzero_params"] < 0.11 * report["params"]
