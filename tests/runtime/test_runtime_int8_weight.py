"""Int8WeightOnlyLinear: kernel vs dequantized product, zero points, config and state round
trips, and the swap ``slimtorch.load(dir, kernels=True)`` makes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimtorch.core.errors import ArtifactError, UserInputError
from slimtorch.formats.state import dequantize
from slimtorch.runtime import RUNTIME_MODULES, Int8WeightOnlyLinear
from slimtorch.runtime.int8_weight import int8pack_available

KERNELS = ["dequant", *(["int8pack"] if int8pack_available() else [])]
# bfloat16 activations and scales in the int8pack kernel: ~3e-3 relative error measured
TOL = {"dequant": 1e-6, "int8pack": 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def random_module(
    out: int, inp: int, seed: int = 0, bias: bool = True, unsigned: bool = False
) -> Int8WeightOnlyLinear:
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0, 256) if unsigned else (-127, 128)
    codes = torch.randint(lo, hi, (out, inp), generator=g, dtype=torch.int32)
    scale = torch.rand(out, generator=g) * 0.01 + 0.001
    zp = torch.randint(100, 156, (out,), generator=g) if unsigned else torch.zeros(out)
    b = torch.randn(out, generator=g) if bias else None
    return Int8WeightOnlyLinear.from_quantized(codes, scale, zp, b)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("shape", [(64, 128), (40, 96), (7, 33), (300, 576)])
def test_matches_dequantized_product(kernel: str, unsigned: bool, shape: tuple[int, int]) -> None:
    out, inp = shape
    mod = random_module(out, inp, unsigned=unsigned)
    mod.kernel = kernel  # type: ignore[assignment]
    x = torch.randn(5, 3, inp, generator=torch.Generator().manual_seed(1))
    expected = x @ mod.dequantized_weight().t() + mod.bias
    y = mod(x)
    assert y.shape == (5, 3, out) and y.dtype == torch.float32
    assert rel_err(y, expected) < TOL[kernel]
    assert bool(mod.zero_point.any()) == unsigned  # unsigned codes keep a zero point


def test_codes_shift_and_dequantized_formula() -> None:
    codes = torch.tensor([[0, 255, 128], [1, 2, 3]])
    mod = Int8WeightOnlyLinear.from_quantized(
        codes, torch.tensor([0.5, 2.0]), torch.tensor([128, 0])
    )
    assert mod.weight_int8.dtype == torch.int8
    assert torch.equal(mod.weight_int8[0], torch.tensor([-128, 127, 0], dtype=torch.int8))
    want = torch.tensor([[-64.0, 63.5, 0.0], [2.0, 4.0, 6.0]])
    assert torch.equal(mod.dequantized_weight(), want)
    assert mod.bias is None


def test_cached_kernel_follows_buffer_changes() -> None:
    mod = random_module(16, 64, bias=False)
    x = torch.randn(2, 64)
    y = mod(x)
    with torch.no_grad():
        mod.weight_scale.mul_(2.0)  # in place: the kernel's copy must be rebuilt
    assert rel_err(mod(x), 2 * y) < 1e-2
    mod.load_state_dict(random_module(16, 64, seed=5, bias=False).state_dict())
    assert rel_err(mod(x), x @ mod.dequantized_weight().t()) < 1e-2


def test_config_and_state_roundtrip(tmp_path: object) -> None:
    mod = random_module(48, 160, seed=3, unsigned=True)
    cfg = mod.config()
    assert RUNTIME_MODULES.get("Int8WeightOnlyLinear") is Int8WeightOnlyLinear
    rebuilt = Int8WeightOnlyLinear.from_config(cfg)
    assert rebuilt.config() == cfg
    path = f"{tmp_path}/m.safetensors"
    save_file({k: v.contiguous() for k, v in mod.state_dict().items()}, path)
    rebuilt.load_state_dict(load_file(path))
    x = torch.randn(3, 160)
    assert torch.equal(rebuilt(x), mod(x))
    with pytest.raises(ArtifactError, match="re-save"):
        Int8WeightOnlyLinear.from_config({"in_features": 8})


def test_from_state_and_bad_inputs() -> None:
    from slimtorch.quantize.affine import quantize_weight
    from slimtorch.quantize.primitives import QuantSpec

    w = torch.randn(32, 100, generator=torch.Generator().manual_seed(4))
    for bits, signed, symmetric in ((8, True, True), (8, False, False), (6, True, True)):
        spec = QuantSpec(bits, signed=signed, symmetric=symmetric, granularity="per_channel")
        q = quantize_weight(w, spec)
        mod = Int8WeightOnlyLinear.from_state(q)
        assert torch.allclose(mod.dequantized_weight(), dequantize(q, w.shape), atol=1e-6)
    q4 = quantize_weight(w, QuantSpec(4, granularity="per_group", group_size=32))
    with pytest.raises(UserInputError, match="5 to 8 bits"):
        Int8WeightOnlyLinear.from_state(q4)
    with pytest.raises(UserInputError, match="8-bit codes"):
        Int8WeightOnlyLinear.from_quantized(torch.full((2, 3), 300), torch.ones(2), torch.zeros(2))
    with pytest.raises(UserInputError, match="one per"):
        Int8WeightOnlyLinear.from_quantized(
            torch.zeros(2, 3, dtype=torch.int8), torch.ones(3), torch.zeros(3)
        )
    with pytest.raises(UserInputError, match="NaN"):
        Int8WeightOnlyLinear.from_quantized(
            torch.zeros(2, 3, dtype=torch.int8), torch.tensor([1.0, float("nan")]), torch.zeros(2)
        )


def test_empty_batch_and_bf16_input() -> None:
    mod = random_module(32, 64)
    assert mod(torch.randn(0, 64)).shape == (0, 32)
    x = torch.randn(2, 64)
    y = mod(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), mod(x)) < 2e-2
