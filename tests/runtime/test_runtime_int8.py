"""Int8DynamicLinear: accuracy against fp32, shapes, kernels, bit-exact state round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimtorch.core.errors import ArtifactError
from slimtorch.runtime import RUNTIME_MODULES, Int8DynamicLinear, onednn_available
from slimtorch.runtime.int8 import quantize_tokens_u8, quantize_weight_int8

KERNELS = ["int_mm", *(["onednn"] if onednn_available() else [])]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(96, 80)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
    return lin


@pytest.mark.parametrize("kernel", KERNELS)
def test_close_to_fp32(linear: nn.Linear, kernel: str) -> None:
    q = Int8DynamicLinear.from_linear(linear)
    q.kernel = kernel  # type: ignore[assignment]
    x = torch.randn(3, 17, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(q(x), linear(x)) < 0.02
        # outliers in some tokens do not hurt the others (per-token scales)
        x[0, 0] *= 1000
        err_rest = rel_err(q(x)[1:], linear(x)[1:])
    assert err_rest < 0.02


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(96,), (1, 96), (5, 96), (2, 3, 4, 96), (0, 96)])
def test_any_leading_shape(linear: nn.Linear, kernel: str, shape: tuple[int, ...]) -> None:
    q = Int8DynamicLinear.from_linear(linear)
    q.kernel = kernel  # type: ignore[assignment]
    x = torch.randn(*shape)
    y = q(x)
    assert y.shape == (*shape[:-1], 80) and y.dtype == torch.float32
    if x.numel():
        assert rel_err(y, linear(x).detach()) < 0.03


def test_int_mm_kernel_is_exact_integer_arithmetic(linear: nn.Linear) -> None:
    q = Int8DynamicLinear.from_linear(linear)
    q.kernel = "int_mm"
    x = torch.randn(9, 96, generator=torch.Generator().manual_seed(2))
    amax = x.abs().amax(1, keepdim=True)
    xq = torch.round(x * (127 / amax))
    acc = xq.double() @ q.weight_int8.double().t()
    expected = acc * (amax.double() / 127) * q.weight_scale.double() + q.bias.double()
    assert torch.allclose(q(x).double(), expected, rtol=1e-6, atol=1e-6)


def test_weights_codes_and_mask(linear: nn.Linear) -> None:
    mask = torch.rand(linear.weight.shape, generator=torch.Generator().manual_seed(3)) > 0.3
    q = Int8DynamicLinear.from_linear(linear, mask)
    assert q.weight_int8.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    assert int(q.weight_int8.abs().max()) == 127
    assert bool((q.weight_int8[~mask] == 0).all())
    w = linear.weight.detach() * mask
    assert rel_err(q.dequantized_weight(), w) < 0.01
    codes, scale = quantize_weight_int8(torch.zeros(3, 4))
    assert bool((codes == 0).all()) and bool((scale == 1).all())


def test_no_bias_and_bf16_input() -> None:
    lin = nn.Linear(32, 16, bias=False)
    q = Int8DynamicLinear.from_linear(lin)
    assert q.bias is None and "bias" not in q.state_dict()
    x = torch.randn(4, 32)
    y = q(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), lin(x).detach()) < 0.03


def test_state_dict_round_trip_is_bit_exact(linear: nn.Linear, tmp_path) -> None:  # type: ignore[no-untyped-def]
    q = Int8DynamicLinear.from_linear(linear)
    x = torch.randn(6, 96)
    y = q(x)
    cls = RUNTIME_MODULES.get("Int8DynamicLinear")
    assert cls is Int8DynamicLinear
    path = tmp_path / "m.safetensors"
    save_file(q.state_dict(), str(path))
    fresh = cls.from_config(q.config())  # type: ignore[attr-defined]
    before = fresh(x)
    fresh.load_state_dict(load_file(str(path)))
    assert not torch.equal(before, y)
    assert torch.equal(fresh(x), y)  # the packed weight cache follows the loaded buffer
    assert torch.equal(copy.deepcopy(q)(x), y)
    assert q.config() == {"in_features": 96, "out_features": 80, "bias": True}


def test_bad_config() -> None:
    with pytest.raises(ArtifactError, match="in_features"):
        Int8DynamicLinear.from_config({"out_features": 3})


@pytest.mark.skipif(not onednn_available(), reason="oneDNN int8 ops not in this build")
def test_onednn_kernel_matches_integer_reference_without_saturation() -> None:
    gen = torch.Generator().manual_seed(4)
    q = Int8DynamicLinear(256, 64)
    signs = torch.randint(0, 2, (64, 256), generator=gen) * 2 - 1
    q.weight_int8.copy_(signs * 127)  # worst case for int16 pair sums
    q.weight_scale.uniform_(0.5, 1.5, generator=gen)
    q.bias.normal_(generator=gen)
    q.kernel = "onednn"
    x = torch.rand(33, 256, generator=gen) * 4 - 1  # asymmetric rows
    x[0] = 0.0  # an all-zero token
    qmax = q._act_qmax_u8
    hi = x.amax(1, keepdim=True).clamp_min(0)
    lo = x.amin(1, keepdim=True).clamp_max(0)
    s = (hi - lo).clamp_min(1e-30) / qmax
    zp = torch.floor(-lo * (1 / s))
    codes = torch.floor(x * (1 / s) + zp + 0.5).clamp(min=0)
    acc = (codes - zp).double() @ q.weight_int8.double().t()
    expected = acc * s.double() * q.weight_scale.double() + q.bias.double()
    y = q(x)
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-4 * float(expected.abs().max()))
    assert torch.allclose(y[0], q.bias)


@pytest.mark.parametrize("qmax", [127, 255])
def test_quantize_tokens_u8(qmax: int) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 77, generator=gen) * torch.rand(40, 1, generator=gen) * 10
    x[1] = x[1].abs()  # all positive: zero point 0
    x[2] = -x[2].abs()  # all negative: zero point qmax
    x[3] = 0.0
    codes, scale, zp = quantize_tokens_u8(x, qmax)
    assert codes.dtype == torch.uint8 and scale.shape == zp.shape == (40, 1)
    c = codes.float()
    assert float(c.min()) == 0 and float(c.max()) == qmax
    assert float(zp[1]) == 0 and float(zp[2]) == qmax and bool((c[3] == zp[3]).all())
    assert torch.equal(zp, torch.floor(-x.amin(1, keepdim=True).clamp(max=0) / scale))
    expected = torch.floor(x / scale + zp + 0.5).clamp(min=0)  # truncation toward 0
    assert int((c != expected).sum()) <= 2  # x * (1/s) vs x / s may differ at exact ties
    err = ((c - zp) * scale - x).abs()
    assert bool(err.le(scale * 1.0001).all())  # at most one step (the row minimum)
    assert float((err <= scale * 0.5001).float().mean()) > 0.99
