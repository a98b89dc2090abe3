"""Low-bit ONNX export: compressed weights stored as int8/int4/codebook, checked in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.export.onnx.export import OnnxExportError, export_onnx
from slimtorch.export.onnx.qops import Encoded, decode, pack_nibbles
from slimtorch.testing.models import example_input, tiny_cnn, tiny_llama, tiny_lstm, tiny_stack

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

INT8 = {"stages": [{"method": "quantize.rtn", "bits": 8}]}
INT4 = {"stages": [{"method": "quantize.rtn", "bits": 4, "symmetric": False,
                    "granularity": "per_group", "group_size": 16}]}  # fmt: skip
KMEANS4 = {"stages": [{"method": "share.kmeans", "bits": 4}]}
DYNAMIC = {"stages": [{"method": "quantize.dynamic_int8"}]}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()


def _export(model: nn.Module, recipe: dict, x: torch.Tensor, tmp_path, **kw):  # type: ignore[no-untyped-def]
    compressed = st.compress(model, recipe).model
    out = tmp_path / "m.onnx"
    report = export_onnx(compressed, (x,), out, **kw)
    return report, onnx.load(str(out))


def _ops(proto) -> set[str]:  # type: ignore[no-untyped-def]
    return {n.op_type for n in proto.graph.node}


def _storage(proto) -> set[int]:  # type: ignore[no-untyped-def]
    return {t.data_type for t in proto.graph.initializer}


def test_int8_weights_are_int8_with_dequantize_linear(tmp_path) -> None:
    report, proto = _export(_mlp(), INT8, torch.randn(4, 64), tmp_path, decode="run")
    assert report["dense_float_bytes"] / report["bytes"] > 2.5  # 12.4k weights: 4x minus graph
    assert "DequantizeLinear" in _ops(proto) and "Gemm" in _ops(proto)
    assert onnx.TensorProto.INT8 in _storage(proto)
    assert [x["param"] for x in report["lowbit_layers"]] == ["0.weight", "2.weight"]
    assert report["max_abs_diff"] <= 1e-5 and report["tolerance_used"] <= 1
    assert report["atol"] == 1e-4 and report["dense_layers"] == []


def test_int4_groups_on_linear_become_matmulnbits(tmp_path) -> None:
    report, proto = _export(_mlp(), INT4, torch.randn(4, 64), tmp_path, decode="run")
    assert report["dense_float_bytes"] / report["bytes"] > 3.5
    assert "MatMulNBits" in _ops(proto) and "Gemm" not in _ops(proto)
    assert any(o.domain == "com.microsoft" for o in proto.opset_import)
    assert {x["op"] for x in report["lowbit_layers"]} == {"MatMulNBits"}
    assert report["max_abs_diff"] <= 1e-5


def test_kmeans_cnn_stores_indices_and_gathers(tmp_path) -> None:
    model = tiny_cnn()
    report, proto = _export(model, KMEANS4, example_input(model, 2), tmp_path, decode="run")
    assert report["dense_float_bytes"] / report["bytes"] > 1.1  # tiny: ~15 nodes per layer
    assert "Gather" in _ops(proto) and onnx.TensorProto.UINT4 in _storage(proto)
    assert len(report["lowbit_layers"]) == 4 and report["max_abs_diff"] <= 1e-5


def test_lstm_gate_rows_are_matched_and_stored_int8(tmp_path) -> None:
    model = tiny_lstm()
    x = example_input(model, 2)  # static: the tiny file's size is mostly graph (dynamic: +30 kB)
    report, proto = _export(model, INT8, x, tmp_path, decode="run", static=True)
    layouts = {x["param"]: x["layout"] for x in report["lowbit_layers"]}
    assert layouts["lstm.weight_ih_l0"] == "rows" and layouts["gru.weight_hh_l0"] == "rows"
    assert report["dense_layers"] == [] and report["dense_float_bytes"] / report["bytes"] > 1.6
    assert "LSTM" in _ops(proto) and report["max_abs_diff"] <= 1e-5


def test_dynamic_int8_runs_integer_matmuls(tmp_path) -> None:
    model = tiny_stack()
    report, proto = _export(model, DYNAMIC, example_input(model, 2), tmp_path)
    assert "MatMulInteger" in _ops(proto) and "DynamicQuantizeLinear" not in _ops(proto)
    assert sum(x["op"] == "MatMulInteger" for x in report["lowbit_layers"]) == 7
    assert report["layer_tolerance_used"] <= 1 and report["tolerance_used"] <= 1
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert not any(n.metadata_props for n in proto.graph.node)  # no stack traces, local paths
    # 16-wide layers: the int8 graph's quantize nodes outweigh the bytes the codes save, so the
    # size check takes a model whose weights dominate its file
    report, _ = _export(_mlp(), DYNAMIC, torch.randn(4, 64), tmp_path / "mlp")
    assert report["dense_float_bytes"] / report["bytes"] > 2.5


@pytest.mark.parametrize("kernel", ["auto", "int_mm"])
@pytest.mark.parametrize("which", ["mlp", "lstm"])
def test_dynamic_int8_matches_per_token_arithmetic(tmp_path, kernel: str, which: str) -> None:
    """The ONNX graph quantizes per token as Int8DynamicLinear does: same codes, same int32
    sums, so the outputs agree to float rounding (the weight-only tolerance), end to end."""
    from slimtorch.runtime.int8 import Int8DynamicLinear

    model = _mlp() if which == "mlp" else tiny_lstm()
    x = torch.randn(16, 64) * torch.rand(16, 1) * 4 if which == "mlp" else example_input(model, 4)
    compressed = st.compress(model, DYNAMIC).model
    for mod in compressed.modules():
        if isinstance(mod, Int8DynamicLinear):
            mod.kernel = kernel  # type: ignore[assignment]
    report = export_onnx(compressed, (x,), tmp_path / "m.onnx")
    assert report["layer_tolerance_used"] <= 1 and report["layer_max_abs_diff"] < 1e-5
    with torch.no_grad():
        expected, float_out = compressed(x), model(x)
    actual = torch.from_numpy(_run(tmp_path / "m.onnx", x))
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-3)
    # a per-tensor activation scale (the old DynamicQuantizeLinear form) is far outside that
    assert (expected - float_out).abs().max() > 1e-3


def _run(path, x: torch.Tensor) -> np.ndarray:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("recipe", [INT8, INT4, KMEANS4], ids=["int8", "int4", "kmeans4"])
def test_load_time_decode_is_exact_small_and_has_no_dequantize(tmp_path, recipe) -> None:  # type: ignore[no-untyped-def]
    model = tiny_cnn()
    x = example_input(model, 2)
    report, proto = _export(model, recipe, x, tmp_path)
    assert report["max_abs_diff"] <= 1e-5 and report["dense_layers"] == []
    assert not _ops(proto) & {"DequantizeLinear", "MatMulNBits"}
    assert {e["decode"] for e in report["lowbit_layers"]} == {"load"}
    assert onnx.TensorProto.FLOAT not in {
        t.data_type for t in proto.graph.initializer if t.name.endswith("_q")
    }
    run_report, _ = _export(model, recipe, x, tmp_path / "run", decode="run")

    def weight_bytes(r):  # type: ignore[no-untyped-def]
        return sum(e["bytes"] for e in r["lowbit_layers"])

    overhead = 250 * len(report["lowbit_layers"])  # 16-entry table and shape constants
    assert weight_bytes(report) <= weight_bytes(run_report) * 1.05 + overhead  # 2 codes a byte
    assert report["dense_float_bytes"] / report["bytes"] > 1.1  # tiny: ~15 nodes per layer


@pytest.mark.slow
def test_tiny_llama_int4_and_int8(tmp_path) -> None:
    x = torch.randint(0, 128, (1, 8))
    # static: on a 1-layer model the dynamic-shape nodes would be a visible share of the file
    report, proto = _export(
        tiny_llama(layers=1, std=0.1), INT4, x, tmp_path, decode="run", static=True
    )
    assert "MatMulNBits" in _ops(proto) and report["tolerance_used"] <= 1
    assert report["dense_float_bytes"] / report["bytes"] > 1.8
    report8, _ = _export(tiny_llama(layers=1, std=0.1), INT8, x, tmp_path / "b")
    assert report8["max_abs_diff"] < 1e-4  # no onnxruntime int8-activation fusion


def test_per_group_grid_below_opset_21_is_dense_or_an_error(tmp_path) -> None:
    model = tiny_cnn()
    x = example_input(model, 2)
    with pytest.raises(OnnxExportError, match=r"conv\.weight .*opset >= 21"):
        _export(model, INT4, x, tmp_path, opset=18, strict=True, decode="run")
    assert list(tmp_path.iterdir()) == []
    report, _ = _export(model, INT4, x, tmp_path, opset=18, decode="run")
    reasons = {d["param"]: d["reason"] for d in report["dense_layers"]}
    assert "opset >= 21" in reasons["conv.weight"] and report["max_abs_diff"] <= 1e-5
    report, _ = _export(model, INT4, x, tmp_path / "load", opset=18, strict=True)
    assert report["dense_layers"] == [] and report["opset"] == 18  # load-time decode: any opset


def test_sparse_only_weights_stay_dense_and_quantized_false_is_float(tmp_path) -> None:
    sparse = {"stages": [{"method": "prune.magnitude", "sparsity": 0.5}]}
    report, proto = _export(_mlp(), sparse, torch.randn(2, 64), tmp_path)
    assert "DequantizeLinear" not in _ops(proto) and len(report["dense_layers"]) == 2
    assert "sparsity" in report["dense_layers"][0]["reason"]
    report, proto = _export(_mlp(), INT8, torch.randn(2, 64), tmp_path / "f", quantized=False)
    assert "DequantizeLinear" not in _ops(proto) and report["bytes"] == report["dense_float_bytes"]


def test_decode_and_nibble_packing() -> None:
    q = np.array([[1, -2, 3, 0]], dtype=np.int32)
    enc = Encoded("qdq", q, 4, True, np.array([0.5, 2.0], np.float32), np.array([[0, 1]]), 1, 2)
    enc.zero_point = np.array([[0, 1]], dtype=np.int32)
    enc.scale = np.array([[0.5, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(decode(enc), [[0.5, -1.0, 4.0, -2.0]])
    assert pack_nibbles(np.array([[1, 15, 0, 7]])).tolist() == [[0xF1, 0x70]]
