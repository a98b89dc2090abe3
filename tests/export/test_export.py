"""ONNX export: verified in onnxruntime, atomic, errors that name the operator and module."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.core.errors import ArtifactError, UserInputError
from slimtorch.core.info import update_info
from slimtorch.export.onnx import verify as onnx_verify
from slimtorch.export.onnx.export import OnnxExportError, compare_outputs, export_onnx
from slimtorch.testing.models import tiny_resnet

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx.numpy_helper")


def _pruned_resnet() -> nn.Module:
    model = tiny_resnet()
    update_info(model, input={"shape": [2, 1, 8, 8], "dtype": "float32"})
    return st.compress(model, {"stages": [{"method": "prune.structured", "ratio": 0.5}]}).model


def _ort_outputs(path: str, *inputs: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, (t.numpy() for t in inputs), strict=True)))


class _Bessel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.bessel_j0(x)


class _NoOnnx(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = _Bessel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x))


def test_compare_outputs_tolerance() -> None:
    e = [np.array([1.0, 100.0], dtype=np.float32)]
    ok = compare_outputs(e, [np.array([1.0 + 5e-5, 100.05], dtype=np.float32)], 1e-4, 1e-3)
    assert ok["ok"] and ok["max_abs_diff"] == pytest.approx(0.05, rel=1e-3)
    assert ok["tolerance_used"] == pytest.approx(0.05 / (1e-4 + 0.1), rel=1e-3)
    bad = compare_outputs(e, [np.array([1.0 + 2e-3, 100.0], dtype=np.float32)], 1e-4, 1e-3)
    assert not bad["ok"] and bad["worst_output"] == 0 and bad["tolerance_used"] > 1
    nan = compare_outputs(e, [np.array([np.nan, 100.0], dtype=np.float32)], 1e-4, 1e-3)
    assert not nan["ok"]
    assert compare_outputs(e, [e[0]], 0.0, 0.0)["ok"]  # exact match passes a zero tolerance
    assert "shape" in compare_outputs(e, [np.zeros(3)], 1e-4, 1e-3)["reason"]
    assert "2 outputs" in compare_outputs(e, [e[0], e[0]], 1e-4, 1e-3)["reason"]


def test_pruned_resnet_runs_the_same_in_onnxruntime(tmp_path) -> None:
    model = _pruned_resnet()
    assert model.stem.out_channels == 4
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = tmp_path / "m.onnx"
    report = export_onnx(model, (x,), out)
    assert report["exporter"] == "dynamo" and report["dynamo_error"] is None
    assert report["bytes"] == out.stat().st_size and report["files"] == [str(out)]
    assert report["inputs"] == [{"shape": [2, 1, 8, 8], "dtype": "float32"}]
    assert report["onnxruntime_ms"] > 0 and report["torch_ms"] > 0
    assert report["max_abs_diff"] < 1e-4 and report["tolerance_used"] <= 1
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_ort_outputs(str(out), x)[0], expected, atol=1e-4, rtol=1e-3)
    shapes = {tuple(i.dims) for i in onnx.load(str(out)).graph.initializer}
    assert (4, 1, 3, 3) in shapes  # the pruned stem: 8 -> 4 output channels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # nothing else left


def test_unexportable_operator_is_named_and_nothing_is_left(tmp_path) -> None:
    with pytest.raises(OnnxExportError, match=r"bessel_j0 in module act \(_Bessel\)"):
        export_onnx(_NoOnnx().eval(), (torch.randn(2, 4),), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_removes_the_file(tmp_path, monkeypatch) -> None:
    def never(*_args: object) -> dict[str, object]:
        return {"ok": False, "max_abs_diff": 3.0, "tolerance_used": 9.0, "worst_output": 0}

    monkeypatch.setattr(onnx_verify, "compare_outputs", never)
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    with pytest.raises(OnnxExportError, match="differs by up to 3"):
        export_onnx(model, (torch.randn(2, 4),), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path) -> None:
    model = nn.Linear(4, 3).eval()
    with pytest.raises(UserInputError, match="example input tensors"):
        export_onnx(model, (), tmp_path / "m.onnx")
    with pytest.raises(ArtifactError, match="is a directory"):
        export_onnx(model, (torch.randn(1, 4),), tmp_path)
    (tmp_path / "m.onnx").write_bytes(b"old")
    with pytest.raises(ArtifactError, match="exists"):
        export_onnx(model, (torch.randn(1, 4),), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == b"old"


def test_masked_weights_export_dense_with_a_warning(tmp_path, caplog) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    res = st.compress(model, {"stages": [{"method": "prune.magnitude", "sparsity": 0.5}]})
    x = torch.randn(3, 8)
    (tmp_path / "m.onnx").write_bytes(b"old")
    with caplog.at_level(logging.WARNING, logger="slimtorch.export.onnx.export"):
        report = export_onnx(res.model, (x,), tmp_path / "m.onnx", overwrite=True)
    assert report["dense_weights_from_states"] == 2 and report["lowbit_layers"] == []
    assert "keeps 0.weight dense float: unstructured sparsity" in caplog.text
    with torch.no_grad():
        expected = res.model(x).numpy()
    np.testing.assert_allclose(_ort_outputs(str(tmp_path / "m.onnx"), x)[0], expected, atol=1e-5)
    arrays = [
        onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer
    ]
    zeros = sorted(int((a == 0).sum()) for a in arrays if a.size == 64)
    assert zeros == [int((res.model[0].weight == 0).sum())] and zeros[0] > 0


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * (int(x.abs().sum().item() > 0) + 1)


def test_falls_back_to_the_torchscript_exporter(tmp_path) -> None:
    x = torch.randn(2, 4)
    model = _DataDependent().eval()
    report = export_onnx(model, (x,), tmp_path / "m.onnx")
    assert report["exporter"] == "torchscript"
    assert report["dynamo_error"].startswith("GuardOnDataDependentSymNode:")
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_ort_outputs(str(tmp_path / "m.onnx"), x)[0], expected, atol=1e-5)
