"""ONNX files take any batch size (and sequence length for Transformers) by default, with the
input/output names users know; ``static=True`` fixes the shapes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.export import export
from slimtorch.export.onnx.export import export_onnx
from slimtorch.export.onnx.signature import Signature, check_inputs, signature
from slimtorch.testing.models import example_input, tiny_bert, tiny_cnn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

INT8 = {"stages": [{"method": "quantize.rtn", "bits": 8}]}


def _session(path) -> object:  # type: ignore[no-untyped-def]
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_int8_cnn_runs_at_any_batch_and_static_opts_out(tmp_path) -> None:
    model = st.compress(tiny_cnn(), INT8).model
    x = example_input(model, 1)
    report = export_onnx(model, (x,), tmp_path / "m.onnx")
    assert report["dynamic_error"] is None and report["static"] is False
    assert report["file_inputs"] == [{"name": "input_0", "shape": ["batch_size", 1, 8, 8]}]
    assert report["dynamic_axes"] == {
        "input_0": {"0": "batch_size"},
        "output_0": {"0": "batch_size"},
    }
    assert report["checked_shapes"] == [[[1, 1, 8, 8]], [[3, 1, 8, 8]]]
    assert len(report["lowbit_layers"]) == 4 and report["tolerance_used"] <= 1
    session = _session(tmp_path / "m.onnx")
    big = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(big).numpy()
    (actual,) = session.run(None, {"input_0": big.numpy()})  # type: ignore[attr-defined]
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-3)

    fixed = export_onnx(model, (x,), tmp_path / "s.onnx", static=True)
    assert (
        fixed["static"]
        and fixed["dynamic_axes"] == {}
        and fixed["checked_shapes"] == [[[1, 1, 8, 8]]]
    )
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        _session(tmp_path / "s.onnx").run(None, {"input_0": big.numpy()})  # type: ignore[attr-defined]


def test_bert_gets_optimum_names_and_a_dynamic_sequence(tmp_path) -> None:
    pytest.importorskip("transformers")
    model = tiny_bert()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 99, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    report = export(model, "onnx", tmp_path / "m.onnx", inputs=(ids, mask))
    assert report["input_names"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert report["output_names"] == ["last_hidden_state", "pooler_output"]
    dyn = {"0": "batch_size", "1": "sequence_length"}
    assert (
        report["dynamic_axes"]["input_ids"] == dyn
        and report["dynamic_axes"]["token_type_ids"] == dyn
    )
    assert report["dynamic_axes"]["last_hidden_state"] == dyn
    assert report["checked_shapes"][1] == [[4, 7]] * 3  # batch 2 -> 4, sequence 12 -> 7
    session = _session(tmp_path / "m.onnx")
    for batch, length in ((1, 5), (6, 20)):
        ids = torch.randint(0, 99, (batch, length), generator=gen)
        mask = (torch.rand(batch, length, generator=gen) > 0.2).long()
        mask[:, 0] = 1
        types = torch.zeros_like(ids)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        actual = session.run(None, {k: v.numpy() for k, v in feeds.items()})  # type: ignore[attr-defined]
        with torch.no_grad():
            out = model(**feeds)
        np.testing.assert_allclose(actual[0], out.last_hidden_state.numpy(), atol=1e-4, rtol=1e-3)
        np.testing.assert_allclose(actual[1], out.pooler_output.numpy(), atol=1e-4, rtol=1e-3)


class _FixedBatch(nn.Module):
    """Adds a [2, 4] parameter: runs at batch 2 only."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.offset = nn.Parameter(torch.randn(2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.offset


def test_a_model_tied_to_its_batch_size_is_written_static_with_the_reason(tmp_path, caplog) -> None:
    model = _FixedBatch().eval()
    with caplog.at_level(logging.WARNING, logger="slimtorch.export.onnx.export"):
        report = export_onnx(model, (torch.randn(2, 4),), tmp_path / "m.onnx")
    assert "does not run at input shapes [[4, 4]]" in report["dynamic_error"]
    assert report["dynamic_axes"] == {} and report["file_inputs"][0]["shape"] == [2, 4]
    assert "writing fixed shapes [[2, 4]]" in caplog.text and "--static" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_signature_and_check_inputs_by_hand() -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    out = {"logits": torch.zeros(1, 4, 3)}
    sig = Signature((ids,), ["input_ids"], ["logits"], [(1, 4, 3)], {"input_ids": {0: "b", 1: "s"}})
    (check,) = check_inputs(sig)
    assert check[0].shape == (3, 3) and set(check[0].unique().tolist()) <= {5, 6, 7, 8}
    assert signature(nn.Linear(4, 2), (torch.randn(3, 4),), torch.zeros(3, 2), True).axes == {}
    plain = signature(nn.Linear(4, 2), (torch.randn(3, 4),), (torch.zeros(3, 2),) * 2, False)
    assert plain.input_names == ["input_0"] and plain.output_names == ["output_0", "output_1"]
    assert plain.axes == {"input_0": {0: "batch_size"}}  # no sequence axis outside Transformers
    assert plain.dynamic_axes() == {
        "input_0": {0: "batch_size"},
        "output_0": {0: "batch_size"},
        "output_1": {0: "batch_size"},
    }
    assert sig.dynamic_shapes() == {"inputs": ({0: "b", 1: "s"},)}
    assert out  # the dict output form is covered by the BERT test
