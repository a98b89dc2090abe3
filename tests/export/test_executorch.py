"""`export --to executorch`: XNNPACK .pte files run in ExecuTorch's runtime against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.cli.main import main
from slimtorch.core.errors import UnsupportedModelError, UserInputError
from slimtorch.core.info import update_info
from slimtorch.export import TARGETS, export
from slimtorch.testing.models import tiny_resnet

pytest.importorskip("executorch")
pytestmark = pytest.mark.slow

INT8 = {"stages": [{"method": "quantize.rtn", "bits": 8}]}
W4 = {
    "stages": [
        {"method": "quantize.rtn", "bits": 4, "symmetric": True, "granularity": "per_group",
         "group_size": 32},
    ]
}  # fmt: skip


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _run_file(path: Path, x: torch.Tensor) -> torch.Tensor:
    from slimtorch.export.executorch import run_pte

    return run_pte(path, [x])[0][0]


def test_fp32_file_matches_pytorch(tmp_path) -> None:
    model, x = tiny_resnet(), _x(2, 1, 8, 8)
    report = export(model, "executorch", tmp_path / "m.pte", inputs=(x,), quantized=False)
    assert report["scheme"] == "fp32" and report["carried"] == []
    with torch.no_grad():
        expected = model(x)
    got = _run_file(tmp_path / "m.pte", x)  # run again here, independently of the exporter
    assert float((got - expected).abs().max()) <= 1e-4
    assert report["max_abs_diff"] <= 1e-4 and report["bytes"] == (tmp_path / "m.pte").stat().st_size


def test_int8_codes_survive_into_the_file_and_it_runs(tmp_path) -> None:
    model, x = st.compress(tiny_resnet(), INT8).model, _x(3, 1, 8, 8)
    export(model, "executorch", tmp_path / "fp32.pte", inputs=(x,), quantized=False)
    report = export(model, "executorch", tmp_path / "int8.pte", inputs=(x,))
    assert report["scheme"] == "qd8-qc8w (int8)"
    assert report["codes_in_file"] == {"found": 7, "of": 7, "missing": []}
    assert {d["param"] for d in report["dense"]} == {"stem.weight", "depthwise.weight"}
    assert "block2.shortcut.1" in report["batchnorm_folded"]
    with torch.no_grad():
        expected = model(x)
    got = _run_file(tmp_path / "int8.pte", x)
    # dynamic int8 activations: within 2% of the largest output, same class for every row
    assert float((got - expected).abs().max()) <= 0.02 * float(expected.abs().max())
    assert torch.equal(got.argmax(1), expected.argmax(1))
    carried = sum(model.get_submodule(c["module"]).weight.numel() for c in report["carried"])
    saved = (tmp_path / "fp32.pte").stat().st_size - report["bytes"]
    assert saved >= 2 * carried  # 4 bytes -> 1 per weight, less scales and alignment (tiny)


def test_8da4w_groups_of_32(tmp_path) -> None:
    model, x = st.compress(_Mlp(), W4).model, _x(4, 64)
    export(model, "executorch", tmp_path / "fp32.pte", inputs=(x,), quantized=False)
    report = export(model, "executorch", tmp_path / "w4.pte", inputs=(x,))
    assert [c["layout"] for c in report["carried"]] == ["qb4w", "qb4w"]
    assert report["codes_in_file"]["found"] == 2
    with torch.no_grad():
        expected = model(x)
    got = _run_file(tmp_path / "w4.pte", x)
    assert float((got - expected).abs().max()) <= 0.02 * float(expected.abs().max())
    assert report["bytes"] < 0.3 * (tmp_path / "fp32.pte").stat().st_size  # 4-bit + scales


def test_bad_inputs_leave_nothing(tmp_path) -> None:
    model, x = _Mlp().eval(), _x(1, 64)
    with pytest.raises(UserInputError, match=r"\.pte"):
        export(model, "executorch", tmp_path / "m.onnx", inputs=(x,))
    (tmp_path / "m.pte").write_bytes(b"keep")
    with pytest.raises(UserInputError, match="exists"):
        export(model, "executorch", tmp_path / "m.pte", inputs=(x,))
    assert (tmp_path / "m.pte").read_bytes() == b"keep"

    class _Dict(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if float(x.sum()) > 0 else x  # data-dependent control flow

    with pytest.raises(UnsupportedModelError, match=r"torch\.export"):
        export(_Dict(), "executorch", tmp_path / "c.pte", inputs=(x,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pte"]


def test_cli_export_to_executorch(capsys, tmp_path) -> None:
    assert "executorch" in TARGETS
    model = tiny_resnet()
    update_info(model, input={"shape": [1, 1, 8, 8], "dtype": "float32"})
    st.save(st.compress(model, INT8).model, tmp_path / "a")
    argv = ["export", str(tmp_path / "a"), "--to", "executorch", "--out", str(tmp_path / "m.pte")]
    code = main([*argv, "--trust-factory", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["codes_in_file"]["found"] == 7 and report["vs_model"]["relative_diff"] < 0.02
    code = main([*argv, "--trust-factory"])  # exists, no --force
    assert code == 2 and "exists" in capsys.readouterr().err
    code = main([*argv, "--trust-factory", "--force"])
    assert code == 0 and "found byte for byte in the file: 7 of 7" in capsys.readouterr().out
