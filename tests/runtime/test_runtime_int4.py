"""Int4WeightOnlyLinear: kernel vs dequantized product, packing, config and state round trips."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimtorch.core.errors import ArtifactError, ConfigError, UserInputError
from slimtorch.formats.state import dequantize
from slimtorch.runtime import RUNTIME_MODULES, Int4WeightOnlyLinear
from slimtorch.runtime.int4 import kernel_group, pack_int4, tinygemm_available, unpack_int4

KERNELS = ["dequant", *(["tinygemm"] if tinygemm_available() else [])]
# bfloat16 activations and scales in the tinygemm kernel: ~3e-3 relative error measured
TOL = {"dequant": 1e-6, "tinygemm": 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def random_module(
    out: int, inp: int, group: int, seed: int = 0, bias: bool = True
) -> Int4WeightOnlyLinear:
    g = torch.Generator().manual_seed(seed)
    groups = -(-inp // group)
    codes = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.uint8)
    scales = torch.rand(out, groups, generator=g) * 0.05 + 0.01
    zps = torch.randint(0, 16, (out, groups), generator=g, dtype=torch.uint8)
    b = torch.randn(out, generator=g) if bias else None
    return Int4WeightOnlyLinear.from_quantized(codes, scales, zps, group, b)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "shape",
    [(64, 128, 32), (48, 256, 64), (40, 96, 32), (32, 200, 128), (16, 512, 256), (24, 512, 512)],
)
def test_matches_dequantized_product(kernel: str, shape: tuple[int, int, int]) -> None:
    out, inp, group = shape
    mod = random_module(out, inp, group)
    mod.kernel = kernel  # type: ignore[assignment]
    x = torch.randn(5, 3, inp, generator=torch.Generator().manual_seed(1))
    expected = x @ mod.dequantized_weight().t() + mod.bias
    y = mod(x)
    assert y.shape == (5, 3, out) and y.dtype == torch.float32
    assert rel_err(y, expected) < TOL[kernel]


def test_auto_kernel_and_fallback_for_odd_groups() -> None:
    mod = random_module(32, 48, 16)  # group 16: no kernel size tiles it
    assert kernel_group(16) is None and kernel_group(512) == 256 and kernel_group(96) == 32
    x = torch.randn(4, 48)
    assert mod._kernel_for(x) == "dequant"
    assert rel_err(mod(x), x @ mod.dequantized_weight().t() + mod.bias) < 1e-6
    mod.kernel = "tinygemm"
    if tinygemm_available():
        with pytest.raises(ConfigError, match="multiple of 32"):
            mod(x)


def test_pack_roundtrip_and_layout() -> None:
    codes = torch.randint(0, 16, (7, 9), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 5) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)
    assert torch.equal(unpack_int4(packed, 9), codes)


def test_dequantized_weight_formula() -> None:
    codes = torch.tensor([[0, 15, 3, 4, 9]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 2.0]])
    zps = torch.tensor([[3, 10]], dtype=torch.uint8)
    mod = Int4WeightOnlyLinear.from_quantized(codes, scales, zps, group_size=3)
    expected = torch.tensor([[-1.5, 6.0, 0.0, -12.0, -2.0]])
    assert torch.equal(mod.dequantized_weight(), expected)
    assert mod.bias is None and mod.scales.dtype == torch.float16


def test_config_and_state_roundtrip(tmp_path: object) -> None:
    mod = random_module(48, 160, 32, seed=3)
    with torch.no_grad():
        mod.scales.mul_(1.0 + 1e-6)  # not representable in fp16 any more
    cfg = mod.config()
    assert RUNTIME_MODULES.get("Int4WeightOnlyLinear") is Int4WeightOnlyLinear
    rebuilt = Int4WeightOnlyLinear.from_config(cfg)
    assert rebuilt.config() == cfg
    path = f"{tmp_path}/m.safetensors"
    save_file({k: v.contiguous() for k, v in mod.state_dict().items()}, path)
    rebuilt.load_state_dict(load_file(path))
    x = torch.randn(3, 160)
    assert torch.equal(rebuilt(x), mod(x))
    assert torch.equal(rebuilt.dequantized_weight(), mod.dequantized_weight())


def test_from_state_of_signed_affine_weight() -> None:
    from slimtorch.quantize.affine import quantize_weight
    from slimtorch.quantize.primitives import QuantSpec

    w = torch.randn(32, 100, generator=torch.Generator().manual_seed(4))
    for gran, group in (("per_group", 32), ("per_channel", None)):
        spec = QuantSpec(4, signed=True, symmetric=False, granularity=gran, group_size=group)
        q = quantize_weight(w, spec)
        mod = Int4WeightOnlyLinear.from_state(q)
        assert torch.allclose(mod.dequantized_weight(), dequantize(q, w.shape), atol=1e-6)
    q3 = quantize_weight(w, QuantSpec(3, signed=True, symmetric=False, granularity="per_channel"))
    mod3 = Int4WeightOnlyLinear.from_state(q3)
    assert int(mod3.codes().max()) <= 7
    assert torch.allclose(mod3.dequantized_weight(), dequantize(q3, w.shape), atol=1e-6)
    with pytest.raises(UserInputError, match="at most 4 bits"):
        Int4WeightOnlyLinear.from_state(quantize_weight(w, QuantSpec(8)))


def test_bad_inputs() -> None:
    codes = torch.zeros(4, 8, dtype=torch.uint8)
    s, z = torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.uint8)
    with pytest.raises(UserInputError, match=r"0\.\.15"):
        Int4WeightOnlyLinear.from_quantized(codes + 16, s, z, 4)
    with pytest.raises(UserInputError, match="expected"):
        Int4WeightOnlyLinear.from_quantized(codes, torch.ones(4, 3), z, 4)
    with pytest.raises(UserInputError, match="NaN"):
        Int4WeightOnlyLinear.from_quantized(codes, s * float("nan"), z, 4)
    with pytest.raises(ConfigError, match="group_size"):
        Int4WeightOnlyLinear.from_quantized(codes, s, z, 0)
    with pytest.raises(ArtifactError, match="re-save"):
        Int4WeightOnlyLinear.from_config({"in_features": 8})


def test_empty_batch_and_bf16_input() -> None:
    mod = random_module(32, 64, 32)
    assert mod(torch.randn(0, 64)).shape == (0, 32)
    x = torch.randn(2, 64)
    y = mod(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), mod(x)) < 2e-2


def test_saved_and_loaded_by_slimtorch(tmp_path: object) -> None:
    import slimtorch as st
    from slimtorch.graph.weights import replace_module
    from slimtorch.quantize.affine import quantize_weight
    from slimtorch.quantize.primitives import QuantSpec
    from slimtorch.testing.models import TinyTransformer

    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x = torch.randint(0, 32, (3, 5))
    dense = model(x).detach()
    spec = QuantSpec(4, signed=False, symmetric=False, granularity="per_group", group_size=32)
    for name in ("ff.0", "ff.2", "head"):
        lin = model.get_submodule(name)
        assert isinstance(lin, torch.nn.Linear)
        q = quantize_weight(lin.weight.detach(), spec)
        replace_module(model, name, Int4WeightOnlyLinear.from_state(q, lin.bias))
    y = model(x).detach()
    assert rel_err(y, dense) < 0.2
    st.save(model, f"{tmp_path}/art")
    loaded = st.load(f"{tmp_path}/art", trust_factory=True)
    assert isinstance(loaded.get_submodule("ff.2"), Int4WeightOnlyLinear)
    assert torch.equal(loaded(x), y)
