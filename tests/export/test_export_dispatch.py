"""`slimtorch.export.export`: one function in front of every exporter."""

from __future__ import annotations

import pytest
import torch

from slimtorch.core.errors import ConfigError, UserInputError
from slimtorch.core.info import update_info
from slimtorch.export import EXPORTERS, TARGETS, export, options_of
from slimtorch.testing.models import tiny_cnn


def test_targets_are_the_registered_exporters() -> None:
    assert sorted(TARGETS) == EXPORTERS.names() == [
        "compressed-tensors", "coreml", "executorch", "gguf", "hf", "onnx", "openvino"]  # fmt: skip
    assert options_of("onnx") == ["opset", "quantized", "strict", "decode", "static"]
    assert options_of("gguf") == ["requantize", "imatrix"]
    assert options_of("hf") == options_of("compressed-tensors") == []
    assert options_of("openvino") == options_of("coreml") == []
    assert options_of("executorch") == ["quantized"]


def test_unknown_target_lists_the_known_ones(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown export target 'onx'; did you mean 'onnx'") as e:
        export(tiny_cnn(), to="onx", out=tmp_path / "m.onnx")
    assert "compressed-tensors, coreml, executorch, gguf, hf, onnx, openvino" in str(e.value)
    with pytest.raises(ConfigError, match="Known export targets"):
        export(tiny_cnn(), to="tflite", out=tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []


def test_unknown_option_and_missing_inputs(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no option 'opset'; its options: none"):
        export(tiny_cnn(), to="hf", out=tmp_path / "hf", opset=17)
    with pytest.raises(UserInputError, match="no example inputs for TinyCNN: pass inputs="):
        export(tiny_cnn(), to="onnx", out=tmp_path / "m.onnx")
    with pytest.raises(UserInputError, match="batch must be at least 1"):
        export(tiny_cnn(), to="onnx", out=tmp_path / "m.onnx", batch=0)
    assert list(tmp_path.iterdir()) == []


def test_onnx_from_recorded_inputs(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    model = tiny_cnn()
    update_info(model, input={"shape": [2, 1, 8, 8], "dtype": "float32"})
    report = export(model, to="onnx", out=tmp_path / "m.onnx", quantized=False)
    assert report["format"] == "onnx" and report["out"] == str(tmp_path / "m.onnx")
    assert report["inputs"] == [{"shape": [2, 1, 8, 8], "dtype": "float32"}]
    assert report["max_abs_diff"] <= report["atol"]
    x = (torch.randn(3, 1, 8, 8),)
    again = export(model, to="onnx", out=tmp_path / "m.onnx", inputs=x, overwrite=True)
    assert again["inputs"][0]["shape"] == [3, 1, 8, 8]
