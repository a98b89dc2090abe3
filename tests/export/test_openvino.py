"""OpenVINO IR export: int8/int4/k-means weights stay low-bit in the .bin, run in the CPU plugin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import slimtorch as st
from slimtorch.core.errors import ArtifactError, ConfigError
from slimtorch.export import export
from slimtorch.testing.models import example_input, tiny_cnn, tiny_resnet

pytestmark = pytest.mark.slow
ov = pytest.importorskip("openvino")

INT8 = {"stages": [{"method": "quantize.rtn", "bits": 8}]}
INT4 = {"stages": [{"method": "quantize.rtn", "bits": 4, "symmetric": False,
                    "granularity": "per_group", "group_size": 16}]}  # fmt: skip
KMEANS4 = {"stages": [{"method": "share.kmeans", "bits": 4}]}


def _export(recipe: dict, tmp_path: Path, model=None):  # type: ignore[no-untyped-def]
    model = st.compress(model or tiny_resnet(), recipe).model
    x = example_input(model, 3)
    report = export(model, "openvino", tmp_path / "m.xml", inputs=(x,))
    return model, x, report


def _constant_types(path: Path) -> dict[str, int]:
    types: dict[str, int] = {}
    for node in ov.Core().read_model(str(path)).get_ordered_ops():
        if node.get_type_name() == "Constant":
            t = node.get_element_type().get_type_name()
            types[t] = types.get(t, 0) + int(node.get_byte_size())
    return types


@pytest.mark.parametrize(
    ("recipe", "code_type", "ratio"), [(INT8, "i8", 3.0), (INT4, "i4", 4.0), (KMEANS4, "u4", 5.0)]
)
def test_weights_stay_low_bit_and_outputs_match(
    recipe: dict, code_type: str, ratio: float, tmp_path: Path
) -> None:
    model, x, report = _export(recipe, tmp_path)
    types = _constant_types(tmp_path / "m.xml")
    weights = sum(
        p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1
    )
    bits = 8 if code_type == "i8" else 4
    assert types[code_type] >= weights * bits // 8  # every compressed weight's codes
    assert report["dense_layers"] == [] and len(report["lowbit_layers"]) == 9
    assert report["max_abs_diff"] <= 1e-4 and report["checked_shapes"][1][0][0] == 4
    weight_floats = sum(v for k, v in types.items() if k == "f32")
    assert weight_floats < weights * 4 / ratio  # scales, biases, BatchNorm: not the weights
    bin_file = tmp_path / "m.bin"
    assert bin_file.stat().st_size + (tmp_path / "m.xml").stat().st_size == report["bytes"]
    # the file computes the compressed model, not the float one it came from
    compiled = ov.Core().compile_model(str(tmp_path / "m.xml"), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0})  # fmt: skip
    got = np.asarray(compiled([x.numpy()])[0])
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_int8_linear_runs_compressed_in_the_cpu_plugin(tmp_path: Path) -> None:
    model, _, report = _export(INT8, tmp_path, tiny_cnn())
    assert any(k.startswith("FullyConnected i8") for k in report["runtime_layers"])
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert report["constants"]["i8"]["bytes"] == weights  # one byte per weight, all of them
    assert report["dense_float_bytes"] > report["bytes"] + weights  # 3 B per weight - XML


def test_bad_out_and_existing_file(tmp_path: Path) -> None:
    model = st.compress(tiny_cnn(), INT8).model
    x = example_input(model, 1)
    with pytest.raises(ConfigError, match=r"\.xml"):
        export(model, "openvino", tmp_path / "m.onnx", inputs=(x,))
    (tmp_path / "m.xml").write_text("keep")
    with pytest.raises(ArtifactError, match="exists"):
        export(model, "openvino", tmp_path / "m.xml", inputs=(x,))
    assert (tmp_path / "m.xml").read_text() == "keep" and not (tmp_path / "m.bin").exists()


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from slimtorch.cli.main import main
    from slimtorch.core.info import update_info

    model = st.compress(tiny_cnn(), KMEANS4).model
    update_info(model, input={"shape": [1, 1, 8, 8], "dtype": "float32"})
    st.save(model, tmp_path / "art")
    out, bad = tmp_path / "m.xml", tmp_path / "m.pte"
    cmd = ["export", str(tmp_path / "art"), "--to", "openvino", "--trust-factory", "--out"]
    assert main([*cmd, str(out)]) == 0
    assert "u4" in capsys.readouterr().out and out.is_file()
    assert main([*cmd, str(out)]) == 2  # exists, no --force
    assert main([*cmd, str(bad)]) == 2
    assert ".xml" in capsys.readouterr().err and not bad.exists()


def test_dynamic_int8_keeps_int8_weights_checked_against_the_weight_only_twin(
    tmp_path: Path,
) -> None:
    model = st.compress(tiny_cnn(), {"stages": [{"method": "quantize.dynamic_int8"}]}).model
    x = example_input(model, 2)
    report = export(model, "openvino", tmp_path / "m.xml", inputs=(x,))
    assert report["checked_against"].startswith("weight-only twin")
    assert report["max_abs_diff"] <= 1e-4 and report["constants"]["i8"]["n"] >= 1
    assert report["dynamic_int8_max_abs_diff"] > 0  # slimtorch's int8 activations differ
