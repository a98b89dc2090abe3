"""Core ML export: k-means codebooks as LUT weights, int8/int4 as blockwise-quantized weights.

Core ML cannot run on Linux: the package is read back from disk and its weights decoded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import slimtorch as st
from slimtorch.core.errors import ArtifactError, ConfigError
from slimtorch.export import export
from slimtorch.testing.models import example_input, tiny_cnn, tiny_resnet

pytestmark = pytest.mark.slow
pytest.importorskip("coremltools")

INT8 = {"stages": [{"method": "quantize.rtn", "bits": 8}]}
INT4 = {"stages": [{"method": "quantize.rtn", "bits": 4, "symmetric": False,
                    "granularity": "per_group", "group_size": 16}]}  # fmt: skip
KMEANS3 = {"stages": [{"method": "share.kmeans", "bits": 3}]}


def _export(recipe: dict, tmp_path: Path):  # type: ignore[no-untyped-def]
    model = st.compress(tiny_resnet(), recipe).model
    report = export(model, "coreml", tmp_path / "m.mlpackage", inputs=(example_input(model, 1),))
    return model, report


def _weights(model) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return {n: p.detach().numpy() for n, p in model.named_parameters() if p.dim() > 1}


def test_kmeans_codebooks_become_luts_that_decode_exactly(tmp_path: Path) -> None:
    from slimtorch.export.coreml_read import load_program

    model, report = _export(KMEANS3, tmp_path)
    assert report["dense_layers"] == [] and report["decoded_equal"] == 9
    assert {(w["indices"], w["lut_entries"]) for w in report["compressed_weights"]} == {
        ("uint3", 8)
    }
    assert report["runs_here"] is False and report["bytes"] < report["dense_float_bytes"]
    # independently of the exporter's own check: decode the LUT ops of the package on disk
    prog = load_program(tmp_path / "m.mlpackage")
    ops = [op for op in prog.functions["main"].operations if op.op_type == "constexpr_lut_to_dense"]
    decoded = sorted(tuple(np.asarray(op.materialized_val_inference()).shape) for op in ops)
    assert decoded == sorted(tuple(w.shape) for w in _weights(model).values())
    values = {n: w for n, w in _weights(model).items()}
    for op in ops:
        got = np.asarray(op.materialized_val_inference())
        assert any(w.shape == got.shape and np.array_equal(w, got) for w in values.values())


@pytest.mark.parametrize(("recipe", "dtype"), [(INT8, "int8"), (INT4, "int4")])
def test_affine_codes_become_blockwise_shift_scale(
    recipe: dict, dtype: str, tmp_path: Path
) -> None:
    _, report = _export(recipe, tmp_path)
    assert report["dense_layers"] == [] and report["decoded_equal"] == 9
    assert {w["data"] for w in report["compressed_weights"]} == {dtype}
    assert report["ops"]["constexpr_blockwise_shift_scale"] == 9
    assert report["ops"]["conv"] == 8  # BatchNorm not folded into the coded weights
    if dtype == "int4":  # groups of 16 of 72 columns: padded to 80, sliced back
        assert report["ops"].get("slice_by_index", 0) == 3


def test_bad_out_and_existing_package(tmp_path: Path) -> None:
    model = st.compress(tiny_cnn(), INT8).model
    x = example_input(model, 1)
    with pytest.raises(ConfigError, match=r"\.mlpackage"):
        export(model, "coreml", tmp_path / "m.mlmodel", inputs=(x,))
    (tmp_path / "m.mlpackage").mkdir()
    with pytest.raises(ArtifactError, match="exists"):
        export(model, "coreml", tmp_path / "m.mlpackage", inputs=(x,))
    assert list((tmp_path / "m.mlpackage").iterdir()) == []
