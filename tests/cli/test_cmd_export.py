"""`slimtorch export`: pruned artifacts to ONNX (checked in onnxruntime) and to transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.cli.main import main
from slimtorch.core.info import update_info
from slimtorch.testing.models import TinyLSTM, tiny_cnn, tiny_llama, tiny_resnet

ort = pytest.importorskip("onnxruntime")
STRUCTURED = {"stages": [{"method": "prune.structured", "ratio": 0.5}]}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _saved(model: nn.Module, shape: list[int], dtype: str, path: Path) -> nn.Module:
    update_info(model, input={"shape": shape, "dtype": dtype})
    pruned = st.compress(model, STRUCTURED).model
    st.save(pruned, path)
    return pruned


def _check_onnx(capsys, artifact: Path, onnx_file: Path, x: torch.Tensor) -> dict:
    code, out, err = _run(
        capsys, "export", str(artifact), "--to", "onnx", "--out", str(onnx_file), "--json",
        "--trust-factory",  # a testing model: saved as its Python class
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["out"] == str(onnx_file) and report["bytes"] == onnx_file.stat().st_size
    assert report["max_abs_diff"] <= report["atol"] and report["tolerance_used"] <= 1
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    with torch.no_grad():
        expected = st.load(artifact, trust_factory=True)(x).numpy()
    np.testing.assert_allclose(
        session.run(None, {name: x.numpy()})[0], expected, atol=1e-4, rtol=1e-3
    )
    return report


def test_pruned_resnet_to_onnx(capsys, tmp_path) -> None:
    pruned = _saved(tiny_resnet(), [2, 1, 8, 8], "float32", tmp_path / "a")
    assert pruned.block2.conv1.out_channels == 8  # 16 -> 8
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    report = _check_onnx(capsys, tmp_path / "a", tmp_path / "m.onnx", x)
    assert report["inputs"] == [{"shape": [2, 1, 8, 8], "dtype": "float32"}]
    assert report["op_types"]["Conv"] >= 6
    code, _, err = _run(
        capsys, "export", str(tmp_path / "a"), "--to", "onnx", "--out", str(tmp_path / "m.onnx"),
        "--trust-factory",
    )  # fmt: skip
    assert code == 2 and "exists" in err  # no --force: the file is kept


def test_pruned_lstm_to_onnx(capsys, tmp_path) -> None:
    torch.manual_seed(0)
    pruned = _saved(TinyLSTM().eval(), [2, 6], "int64", tmp_path / "a")
    assert pruned.lstm.hidden_size == 8 and pruned.gru.hidden_size == 8
    x = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(3))
    report = _check_onnx(capsys, tmp_path / "a", tmp_path / "m.onnx", x)
    assert report["op_types"].get("LSTM") == 2 and report["op_types"].get("GRU") == 1


def test_pruned_llama_to_transformers(capsys, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    model = tiny_llama(max_positions=32)
    pruned = st.compress(model, STRUCTURED).model
    st.save(pruned, tmp_path / "a")
    code, out, err = _run(
        capsys, "export", str(tmp_path / "a"), "--to", "hf", "--out", str(tmp_path / "hf")
    )
    assert code == 0, err
    assert "from_pretrained reloads it" in out and "intermediate_size 64" in out
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert reloaded.config.num_attention_heads == 4 and reloaded.config.num_key_value_heads == 1
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits, atol=1e-5, rtol=0)


def test_errors(capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path), "--to", "tflite", "--out", str(tmp_path / "m")])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    code, _, err = _run(
        capsys, "export", str(tmp_path / "nope"), "--to", "onnx", "--out", str(tmp_path / "m.onnx")
    )
    assert code == 2 and "is not a directory" in err
    st.save(tiny_cnn(), tmp_path / "cnn")  # no recorded input shape
    cnn = ["export", str(tmp_path / "cnn"), "--out", str(tmp_path / "m.onnx")]
    code, _, err = _run(capsys, *cnn, "--to", "onnx")  # saved as its Python class
    assert code == 2 and "--trust-factory" in err and "--model" in err
    code, _, err = _run(capsys, *cnn, "--to", "onnx", "--trust-factory")
    assert code == 2 and "records no example inputs" in err and "--input-shape" in err
    code, _, err = _run(
        capsys, *cnn, "--to", "onnx", "--model", "slimtorch.testing.models:tiny_cnn"
    )
    assert code == 2 and "records no example inputs" in err
    code, _, err = _run(
        capsys, "export", str(tmp_path / "cnn"), "--to", "hf", "--out", str(tmp_path / "hf"),
        "--trust-factory",
    )  # fmt: skip
    assert code == 2 and "transformers models only" in err
    code, _, err = _run(
        capsys,
        "export",
        str(tmp_path / "cnn"),
        "--to",
        "onnx",
        "--batch",
        "0",
        "--out",
        str(tmp_path / "m.onnx"),
    )
    assert code == 2 and "--batch" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn"]


def test_imatrix_needs_gguf_and_a_file(capsys, tmp_path) -> None:
    st.save(tiny_cnn(), tmp_path / "cnn")
    imatrix = tmp_path / "imatrix.safetensors"
    imatrix.write_bytes(b"")
    cnn = ["export", str(tmp_path / "cnn"), "--trust-factory"]
    code, _, err = _run(
        capsys, *cnn, "--to", "onnx", "--out", str(tmp_path / "m.onnx"), "--imatrix", str(imatrix)
    )
    assert code == 2 and "--imatrix" in err and "--to gguf" in err
    missing = tmp_path / "nope.gguf"
    code, _, err = _run(
        capsys, *cnn, "--to", "gguf", "--out", str(tmp_path / "m.gguf"),
        "--requantize", "Q4_K_M", "--imatrix", str(missing),
    )  # fmt: skip
    assert code == 2 and str(missing) in err and "does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn", "imatrix.safetensors"]


def test_onnx_axes_are_dynamic_unless_static(capsys, tmp_path) -> None:
    model = tiny_cnn()
    update_info(model, input={"shape": [1, 1, 8, 8], "dtype": "float32"})
    st.save(
        st.compress(model, {"stages": [{"method": "quantize.rtn", "bits": 8}]}).model,
        tmp_path / "a",
    )
    argv = ["export", str(tmp_path / "a"), "--to", "onnx", "--out", str(tmp_path / "m.onnx")]
    code, out, err = _run(capsys, *argv, "--trust-factory")
    assert code == 0, err
    assert "at input shapes 1x1x8x8 and 3x1x8x8" in out
    assert "inputs (dynamic): input_0 [batch_size, 1, 8, 8]" in out
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input_0": np.zeros((5, 1, 8, 8), np.float32)})[0].shape == (5, 4)
    code, out, err = _run(capsys, *argv, "--trust-factory", "--static", "--force", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["static"] and report["file_inputs"][0]["shape"] == [1, 1, 8, 8]
    assert report["dynamic_axes"] == {}
