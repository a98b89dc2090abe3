"""Which weights an ExecuTorch XNNPACK file holds as our codes, the lowered model's maths and
the byte layout searched in the file (no ExecuTorch needed)."""

from __future__ import annotations

import torch
from torch import nn

import slimtorch as st
from slimtorch.export.executorch_check import compare, stored_bytes
from slimtorch.export.executorch_lower import conv_bn_pairs, fake_quant_rows, lowered_twin
from slimtorch.export.executorch_plan import Carried, fold_scale, plan_model
from slimtorch.testing.models import tiny_resnet


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 10)  # 48 is not a multiple of 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _rtn(model: nn.Module, **stage: object) -> nn.Module:
    return st.compress(model, {"stages": [{"method": "quantize.rtn", **stage}]}).model


def _plan(model: nn.Module) -> tuple[dict[str, Carried], dict[str, str]]:
    carried, dense = plan_model(model)
    return {c.module: c for c in carried}, {d["param"]: d["reason"] for d in dense}


def test_int8_codes_are_carried_exactly_and_depthwise_stays_dense() -> None:
    model = _rtn(tiny_resnet(), bits=8)
    carried, dense = _plan(model)
    assert set(carried) == {
        "block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "block2.shortcut.0",
        "side", "fc",
    }  # fmt: skip
    assert "depthwise" in dense["depthwise.weight"] and "stem.weight" in dense
    pairs = conv_bn_pairs(model)
    for name, c in carried.items():
        assert c.layout == "qc8w" and c.codes.dtype == torch.int8
        assert int(c.codes.abs().max()) == 127  # min-max symmetric: each row reaches +-127
        if name in pairs:  # BatchNorm folded into the scales: tested below
            continue
        w = model.get_submodule(name).weight.detach()
        twin, _ = lowered_twin(model, [c])
        assert torch.equal(twin.get_submodule(f"{name}.weight")(), w)  # same values, same layout


def test_asymmetric_4bit_per_channel_fits_int8_but_per_group_needs_symmetric() -> None:
    per_channel = _rtn(_Mlp(), bits=4, symmetric=False, granularity="per_channel")
    carried, _ = _plan(per_channel)
    assert carried["fc1"].layout == "qc8w" and int(carried["fc1"].codes.abs().max()) <= 15
    grouped = _rtn(_Mlp(), bits=4, symmetric=False, granularity="per_group", group_size=16)
    carried, dense = _plan(grouped)
    assert not carried and "symmetric: true" in dense["fc1.weight"]
    sym = _rtn(_Mlp(), bits=4, symmetric=True, granularity="per_group", group_size=32)
    carried, dense = _plan(sym)
    assert carried["fc1"].layout == "qb4w" and carried["fc1"].group == 32
    assert carried["fc1"].scale.shape == (48, 2)
    assert int(carried["fc1"].codes.min()) >= -8 and int(carried["fc1"].codes.max()) <= 7
    assert "not a multiple of the group 32" in dense["fc2.weight"]


def test_codebooks_and_unquantized_weights_stay_dense() -> None:
    shared = st.compress(_Mlp(), {"stages": [{"method": "share.kmeans", "bits": 4}]}).model
    carried, dense = _plan(shared)
    assert not carried and "lookup-table" in dense["fc1.weight"]
    assert plan_model(_Mlp()) == ([], [])


def test_batchnorm_folds_into_scales_and_codes_stay() -> None:
    model = _rtn(tiny_resnet(), bits=8)
    assert conv_bn_pairs(model)["block1.conv1"] == "block1.bn1"
    assert "stem" in conv_bn_pairs(model)  # found, though the stem is not carried
    carried, _ = plan_model(model)
    twin, folded = lowered_twin(model, carried)
    assert {"block1.bn1", "block1.bn2", "block2.bn1", "block2.bn2", "block2.shortcut.1"} == set(
        folded
    )
    assert torch.equal(twin.block1.conv1.weight.codes.flatten(), _codes_of(carried, "block1.conv1"))
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        result = compare([twin(x)], model(x))
    # dynamic int8 activations only: within 2% of the largest logit, same argmax
    assert result["relative_diff"] < 0.02 and result["top1_agreement"] == 1.0
    c = carried[0]
    assert torch.equal(fold_scale(c, torch.full((c.codes.shape[0],), 2.0)).codes, c.codes)


def _codes_of(carried: list[Carried], name: str) -> torch.Tensor:
    from slimtorch.formats.state import from_matrix

    c = next(c for c in carried if c.module == name)
    return from_matrix(c.codes, (c.codes.shape[0], -1, 3, 3)).flatten()


def test_fake_quant_rows_is_per_row_asymmetric_int8() -> None:
    x = torch.tensor([[0.0, 1.0, 2.55], [-1.0, 0.0, 1.0]])
    y = fake_quant_rows(x)
    assert torch.allclose(y[0], x[0], atol=1e-6)  # 2.55 / 255 = 0.01: every value a code
    assert float((y[1] - x[1]).abs().max()) <= 2.0 / 255 / 2 + 1e-7
    assert float(y[1, 1]) == 0.0  # zero is exact


def test_stored_bytes_layouts() -> None:
    codes = torch.tensor([[-8, 7, 0, -1]], dtype=torch.int8)
    c = Carried("fc", "qb4w", codes, torch.tensor([[0.5, 0.25]]), 2)
    packed, scales = stored_bytes(c, codes)
    assert packed == bytes([(15 << 4) | 0, (7 << 4) | 8])  # code + 8, even column low
    assert (
        scales == torch.tensor([0.5, 0.25]).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    )
    conv = torch.arange(24, dtype=torch.int8).reshape(2, 3, 2, 2)
    c8 = Carried("conv", "qc8w", conv.reshape(2, -1), torch.ones(2))
    assert stored_bytes(c8, conv)[0] == conv.permute(0, 2, 3, 1).contiguous().numpy().tobytes()
