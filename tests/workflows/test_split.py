"""``slimtorch split``: cut enumeration, the latency model at extreme bandwidths, parts that
reproduce the whole model (PyTorch and onnxruntime, dense and int8 at the cut), CLI exits."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from slimtorch.cli.main import main
from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.core.info import update_info
from slimtorch.formats.atomic import temp_siblings
from slimtorch.search.split_cost import Link, best_cut, cut_costs, int8_bytes, parse_bandwidth
from slimtorch.search.split_graph import batchnorm_as_affine, enumerate_cuts, part, trace
from slimtorch.testing.models import tiny_bert, tiny_resnet, tiny_stack
from slimtorch.workflows.split import SplitOptions, plan, split


def _lenet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from slimtorch.models.registry import load_model

    loaded = load_model("builtin:lenet5-fashion")
    assert loaded.example_inputs is not None
    return loaded.model, tuple(loaded.example_inputs(1))


def _whole(traced, inputs):
    return part(traced, 0, len(traced.compute))(*inputs)


def test_parse_bandwidth_units_and_errors() -> None:
    assert parse_bandwidth("20Mbps") == 20e6
    assert parse_bandwidth("1Gbps") == 1e9
    assert parse_bandwidth("500kbps") == 5e5
    assert parse_bandwidth("2MB/s") == 16e6
    assert parse_bandwidth(1000) == 1000.0
    for bad in ("fast", "20 Mbits", "0Mbps", "-3Mbps"):
        with pytest.raises(ConfigError, match="bandwidth"):
            parse_bandwidth(bad)


def test_int8_bytes_per_token_and_per_sample() -> None:
    assert int8_bytes([1, 128, 384], 4, True) == 128 * 384 + 8 * 128  # per token
    assert int8_bytes([2, 48, 14, 14], 4, True) == 2 * 48 * 196 + 8 * 2  # per sample
    assert int8_bytes([1, 1, 128, 128], 1, False) == 128 * 128  # a mask crosses as it is


def test_resnet_cuts_are_block_boundaries_never_inside_a_residual_block() -> None:
    model = tiny_resnet()
    inputs = (torch.randn(1, 1, 8, 8),)
    traced = trace(model, inputs)
    cuts = enumerate_cuts(traced)
    assert traced.dynamic
    assert cuts[0].index == 0 and cuts[-1].index == len(traced.compute)
    assert cuts[0].crossing == ["x"] and cuts[-1].crossing == []
    interior = cuts[1:-1]
    assert all(len(c.crossing) == 1 for c in interior)
    keys = [c.key.partition("|")[0] for c in interior]
    assert any(k == "block1" for k in keys) and any(k == "block2" for k in keys)
    # between block1's conv1 and its residual sum, two float tensors cross: never a cut
    assert not any(k.startswith(("block1.conv", "block1.bn1", "block2.conv")) for k in keys)
    assert cuts[1].shapes == [[-1, 8, 8, 8]] and cuts[1].nbytes == 8 * 8 * 8 * 4


def test_transformer_cuts_carry_the_attention_mask() -> None:
    model = tiny_bert(layers=2)
    ids = torch.randint(0, 99, (1, 16))
    mask = torch.ones(1, 16, dtype=torch.int64)
    traced = trace(model, (ids, mask))
    cuts = enumerate_cuts(traced)
    between = [c for c in cuts if c.key.startswith("encoder.layer.0.output.LayerNorm|")]
    assert len(between) == 1
    dtypes = sorted(between[0].dtypes)
    assert dtypes == ["bool", "float32"], between[0]


@pytest.mark.parametrize("factory", [tiny_resnet, tiny_stack, tiny_bert])
def test_device_then_server_reproduces_the_whole_model(factory) -> None:
    model = factory()
    if factory is tiny_resnet:
        inputs: tuple[torch.Tensor, ...] = (torch.randn(3, 1, 8, 8),)
    else:
        inputs = (torch.randint(0, 32, (3, 16)),)
    traced = trace(model, inputs[:1] if factory is not tiny_bert else inputs)
    with torch.no_grad():
        expected = _whole(traced, inputs)[0]
        reference = model(*inputs)
        reference = reference if isinstance(reference, torch.Tensor) else reference[0]
        assert torch.equal(expected, reference)
        end = len(traced.compute)
        for cut in enumerate_cuts(traced)[:-1]:  # the last cut: the device part is the whole
            middle = part(traced, 0, cut.index)(*inputs)
            assert len(middle) == len(cut.crossing)
            out = part(traced, cut.index, end)(*middle)[0]
            assert torch.allclose(out, expected, atol=1e-6), cut.name


def test_latency_model_picks_the_obvious_cut_at_extreme_bandwidths() -> None:
    model, inputs = _lenet()
    slow = plan(model, inputs, SplitOptions(bandwidth="1bps", timing="torch"))
    assert best_cut(slow.costs).index == len(slow.cuts) - 1  # all on the device
    fast = plan(model, inputs, SplitOptions(bandwidth="1000Gbps", timing="torch"))
    assert best_cut(fast.costs).index == 0  # all on the (8x faster) server
    assert fast.costs[0].total_ms == min(c.total_ms for c in fast.costs)
    assert fast.costs[-1].transfer_ms == 0.0 and fast.costs[0].device_ms == 0.0


def test_cut_costs_arithmetic() -> None:
    costs = cut_costs(([2.0, 4.0], [2.0, 4.0]), [1000, 100, 0], (0.5, 4.0), Link(8e6, rtt_ms=1.0))
    assert [c.device_ms for c in costs] == [0.0, 4.0, 12.0]
    assert [c.server_ms for c in costs] == [1.5, 1.0, 0.0]
    assert costs[0].transfer_ms == pytest.approx(2.0)  # 1 ms RTT + 8000 bits / 8 Mbps
    assert costs[2].transfer_ms == 0.0
    assert best_cut(costs).index == 0
    with pytest.raises(ValueError, match="segments"):
        cut_costs(([1.0], [1.0]), [1, 2, 3], (1.0, 1.0), Link(1e6))


def test_model_with_no_valid_cut_is_refused(tmp_path) -> None:
    model = nn.Linear(4, 4)
    update_info(model, input={"shape": [1, 4], "dtype": "float32"})
    with pytest.raises(UnsupportedModelError, match="no point inside it"):
        split(model, tmp_path / "out", SplitOptions(timing="torch"))
    assert not (tmp_path / "out").exists() and not temp_siblings(tmp_path / "out")


def test_split_lenet_int8_cut_writes_checked_parts(tmp_path) -> None:
    out = tmp_path / "split"
    code = main(["split", "--model", "builtin:lenet5-fashion", "--bandwidth", "1Mbps",
                 "--cut", "6", "--cut-int8", "--timing", "torch", "--out", str(out), "--json"])  # fmt: skip
    assert code == 0
    doc = json.loads((out / "plan.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["device.onnx", "plan.json", "server.onnx"]
    assert doc["chosen"] == 6 and doc["forced"] and doc["cut_int8"]
    assert doc["files"]["device"]["int8_coded"] == ["output_0"]
    assert doc["sent_bytes"] == doc["cuts"][6]["bytes"]  # the prediction's bytes are the real ones
    assert doc["check"]["cosine_first_output"] > 0.999
    assert 0 < doc["check"]["max_abs_diff_over_peak"] < 0.05
    dense = tmp_path / "dense"
    # segments timed in onnxruntime here (the default)
    assert main(["split", "--model", "builtin:lenet5-fashion", "--cut", "6",
                 "--out", str(dense)]) == 0  # fmt: skip
    check = json.loads((dense / "plan.json").read_text())["check"]
    assert check["within_tolerance"] and check["max_abs_diff"] < 1e-4


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "o"
    base = ["split", "--model", "builtin:lenet5-fashion", "--out", str(out)]
    assert main([*base, "--profile", "toaster"]) == 2
    assert "unknown profile 'toaster'" in capsys.readouterr().err
    assert main([*base, "--bandwidth", "fast"]) == 2
    assert "cannot read the bandwidth 'fast'" in capsys.readouterr().err
    assert main([*base, "--server-profile", "nope.yaml"]) == 2
    assert not out.exists() and not temp_siblings(out)
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main([*base, "--force"]) == 2
    assert "not an earlier split" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_recipe_compresses_the_device_part_only(tmp_path) -> None:
    out = tmp_path / "rec"
    options = SplitOptions(bandwidth="1Mbps", recipe="int8", cut=8, timing="torch")
    doc = split("builtin:lenet5-fashion", out, options)
    device, server = doc["files"]["device"], doc["files"]["server"]
    assert device["lowbit_weights"] == 3 and server["lowbit_weights"] == 0  # conv1, conv2, fc1
    assert device["bytes"] < 0.3 * 4 * (500 + 25_000 + 400_000)  # int8 codes, not float32
    assert doc["check"]["within_tolerance"]  # onnxruntime = the same parts in PyTorch
    whole = doc["check_vs_whole_model"]
    assert not whole["within_tolerance"] and whole["max_abs_diff_over_peak"] < 0.01


def test_batchnorm_as_affine_keeps_the_outputs() -> None:
    model, x = tiny_resnet(), torch.randn(3, 1, 8, 8)
    traced = trace(model, (x,))
    whole = part(traced, 0, len(traced.compute))
    with torch.no_grad():
        expected = whole(x)[0]
        assert batchnorm_as_affine(whole) == 6  # stem, 2 per block, the 1x1 shortcut's
        assert torch.allclose(whole(x)[0], expected, atol=1e-5)
    ops = {n.target for n in whole.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.batch_norm.default not in ops
