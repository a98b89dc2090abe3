"""Low-bit convolutions followed by BatchNorm keep their codes in ONNX (BatchNorm exported as
Mul/Add, which onnxruntime folds at load time); LSTM weights stay int8; what stays dense says why."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.export.onnx.batchnorm import ChannelAffine, batchnorm_as_affine
from slimtorch.export.onnx.export import export_onnx
from slimtorch.export.onnx.sources import Source, unmatched_reason
from slimtorch.testing.models import tiny_resnet

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

INT8 = {"stages": [{"method": "quantize.rtn", "bits": 8}]}


def _with_statistics(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


class _Crnn(nn.Module):
    """Conv + BatchNorm features read by a bidirectional LSTM (an OCR model's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.rnn = nn.LSTM(16 * 4, 32, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(64, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.bn(self.conv(x)))  # [B, 16, 4, W]
        seq = f.permute(0, 3, 1, 2).flatten(2)  # [B, W, 64]
        return self.fc(self.rnn(seq)[0])  # type: ignore[no-any-return]


def test_int8_resnet_keeps_every_conv_low_bit(tmp_path) -> None:
    model = st.compress(_with_statistics(tiny_resnet()), INT8).model
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    report = export_onnx(model, (x,), tmp_path / "m.onnx")
    assert report["dense_layers"] == [] and len(report["lowbit_layers"]) == 9
    assert report["batchnorm_as_mul_add"] == [
        "bn", "block1.bn1", "block1.bn2", "block2.bn1", "block2.bn2", "block2.shortcut.1",
    ]  # fmt: skip
    assert report["tolerance_used"] <= 1 and "BatchNormalization" not in report["op_types"]
    # a float export keeps the exporter's own BatchNorm folding; onnxruntime folds the Mul/Add
    # (and the decoded weights) into the convolutions at load: the same graph runs
    dense = export_onnx(model, (x,), tmp_path / "f.onnx", quantized=False)
    assert dense["batchnorm_as_mul_add"] == [] and dense["op_types"]["Mul"] == 1  # GroupNorm's
    assert _loaded_ops(tmp_path / "m.onnx") == _loaded_ops(tmp_path / "f.onnx")


def _loaded_ops(path) -> list[str]:  # type: ignore[no-untyped-def]
    """The operators onnxruntime runs (basic graph optimizations: folding and fusions)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path.with_suffix(".opt"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = sorted(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    path.with_suffix(".opt").unlink()
    return ops


@pytest.mark.parametrize("decode", ["load", "run"])
def test_conv_bn_bilstm_int8_keeps_conv_and_lstm_codes(tmp_path, decode) -> None:
    torch.manual_seed(0)
    model = st.compress(_with_statistics(_Crnn()), INT8).model
    x = torch.randn(2, 1, 4, 10, generator=torch.Generator().manual_seed(2))
    report = export_onnx(model, (x,), tmp_path / "m.onnx", decode=decode)
    assert report["dense_layers"] == [] and report["batchnorm_as_mul_add"] == ["bn"]
    params = {p for e in report["lowbit_layers"] for p in e.get("params", [e["param"]])}
    assert {"conv.weight", "rnn.weight_ih_l1_reverse", "rnn.weight_hh_l0", "fc.weight"} <= params
    assert len(params) == 10 and report["op_types"]["LSTM"] == 2 and report["tolerance_used"] <= 1
    proto = onnx.load(str(tmp_path / "m.onnx"))
    floats = sum(
        t.ByteSize() for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
    )
    weights = sum(p.numel() for n, p in model.named_parameters() if "weight" in n and p.dim() > 1)
    assert floats < 0.06 * 4 * weights  # biases and scales only: every weight matrix is int8
    if decode == "run":  # DequantizeLinear (both directions' rows in one) feeds W and R
        producer = {o: n for n in proto.graph.node for o in n.output}
        for lstm in (n for n in proto.graph.node if n.op_type == "LSTM"):
            for name in lstm.input[1:3]:
                chain = []
                while name in producer and len(chain) < 4:
                    chain.append(producer[name].op_type)
                    name = producer[name].input[0]
                assert "DequantizeLinear" in chain
    big = torch.randn(5, 1, 4, 10, generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(big).numpy()
    actual = session.run(None, {"input_0": big.numpy()})[0]
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-3)


def test_channel_affine_is_the_batchnorm() -> None:
    bn = _with_statistics(nn.Sequential(nn.BatchNorm1d(6)))[0]
    affine = ChannelAffine.from_batchnorm(bn)
    for shape in ((3, 6), (3, 6, 5)):
        x = torch.randn(*shape)
        torch.testing.assert_close(affine(x), bn(x), atol=1e-6, rtol=1e-6)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    twin, names = batchnorm_as_affine(model)
    assert names == ["1"] and isinstance(twin[1], ChannelAffine)
    assert isinstance(model[1], nn.BatchNorm2d)  # the model itself is left alone
    lin = nn.Linear(2, 2)
    assert batchnorm_as_affine(lin) == (lin, [])  # no BatchNorm: no copy


def test_unmatched_weights_say_why() -> None:
    w = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    src = Source("conv.weight", w, w.astype(np.int32), np.ones((3, 1), np.float32),
                 np.zeros((3, 1), np.int32), 8, True, "per_channel")  # fmt: skip
    folded = w * np.array([[0.5], [2.0], [3.0]], np.float32)
    reason = unmatched_reason(src, {"x": np.zeros(5, np.float32), "w_folded": folded})
    assert "BatchNorm folding: initializer w_folded" in reason
    other = unmatched_reason(src, {"w2": w[::-1].copy()})
    assert other == "the exporter changed its values (initializer w2 has its shape)"
    assert "transformed it" in unmatched_reason(src, {})
