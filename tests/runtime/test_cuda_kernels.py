"""The CUDA paths of the runtime modules: their logic on CPU (int4 CUDA packing against a
reference of the kernel's arithmetic, fp8 W8A8 through torch's CPU ``_scaled_mm``, 2:4 checks and
swaps), and the kernels themselves under the ``cuda`` marker (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimtorch.core.errors import ArtifactError, ConfigError, UserInputError
from slimtorch.runtime import (
    RUNTIME_MODULES,
    Fp8Linear,
    Int4WeightOnlyLinear,
    SemiStructuredLinear,
    use_semi_structured,
)
from slimtorch.runtime import device as rt_device
from slimtorch.runtime.int4 import kernel_group, tinygemm_available
from slimtorch.runtime.int4_cuda import (
    inner_k_tiles,
    pack_uint8_cuda,
    reference_matmul,
    unpack_uint8_cuda,
)
from slimtorch.runtime.sparse24 import is_2to4, kernel_shape_ok

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (CI has none)")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def int4_module(out: int, inp: int, group: int, seed: int = 0) -> Int4WeightOnlyLinear:
    g = torch.Generator().manual_seed(seed)
    groups = -(-inp // group)
    codes = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.uint8)
    scales = torch.rand(out, groups, generator=g) * 0.05 + 0.01
    zps = torch.randint(0, 16, (out, groups), generator=g, dtype=torch.uint8)
    return Int4WeightOnlyLinear.from_quantized(
        codes, scales, zps, group, torch.randn(out, generator=g)
    )


def two_four_linear(out: int, inp: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out)
    with torch.no_grad():
        w = lin.weight.reshape(out, -1, 4)
        keep = w.abs().topk(2, dim=-1).indices
        mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, keep, True)
        lin.weight.copy_((w * mask).reshape(out, inp))
    return lin


# --- int4 on CUDA: packing and arithmetic, checked on CPU -----------------------------------


def test_cuda_int4_packing_layout() -> None:
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 7, 8]])
    packed = pack_uint8_cuda(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2)
    assert packed[0].tolist() == [0x12, 0x34]  # even column in the high nibble
    assert packed[1].tolist() == [0xF0, 0x78]
    rand = torch.randint(0, 16, (9, 64), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_uint8_cuda(pack_uint8_cuda(rand)), rand.to(torch.int32))
    with pytest.raises(ValueError, match="K even"):
        pack_uint8_cuda(torch.zeros(2, 3, dtype=torch.int32))


def test_inner_k_tiles() -> None:
    assert inner_k_tiles(128) == 8 and inner_k_tiles(256) == 8
    assert inner_k_tiles(64) == 4 and inner_k_tiles(96) == 2 and inner_k_tiles(32) == 2
    with pytest.raises(ValueError, match="multiple of 32"):
        inner_k_tiles(48)


@pytest.mark.skipif(not tinygemm_available(), reason="torch without the int4 CPU kernel")
@pytest.mark.parametrize("shape", [(64, 128, 32), (40, 96, 32), (32, 200, 128), (24, 512, 512)])
def test_cuda_int4_inputs_reproduce_the_module(shape: tuple[int, int, int]) -> None:
    """The scales/zeros and codes the CUDA path hands the kernel, computed as the kernel
    computes (``(code - 8) * scale + zero``), give the module's dequantized product."""
    out, inp, group = shape
    mod = int4_module(out, inp, group)
    plan = mod._build_tinygemm()  # the CPU build: the same scales_and_zeros the CUDA path uses
    kg = kernel_group(group)
    assert kg is not None
    k_pad = mod.scales.shape[1] * group
    codes = nn.functional.pad(mod.codes().to(torch.int32), (0, k_pad - inp, 0, -out % 16))
    x = torch.randn(3, inp, generator=torch.Generator().manual_seed(1))
    xp = nn.functional.pad(x, (0, k_pad - inp))
    y = reference_matmul(xp, pack_uint8_cuda(codes), kg, plan["sz"])[:, :out]
    expected = x @ mod.dequantized_weight().t()
    assert rel_err(y, expected) < 1e-2  # bfloat16 scales and zeros


# --- fp8 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("activations", ["none", "dynamic"])
def test_fp8_matches_linear(activations: str) -> None:
    lin = nn.Linear(72, 40)
    mod = Fp8Linear.from_linear(lin, activations)
    assert rel_err(mod.dequantized_weight(), lin.weight.detach()) < 0.04  # 3 mantissa bits
    x = torch.randn(2, 5, 72)
    with torch.no_grad():
        ref = lin(x)
        assert mod._kernel_for(x) == "dequant"  # auto on CPU
        assert rel_err(mod(x), ref) < 0.04
        if rt_device.scaled_mm_available("cpu"):
            mod.kernel = "scaled_mm"  # the W8A8 arithmetic through torch's CPU _scaled_mm
            y = mod(x)
            assert y.shape == (2, 5, 40) and y.dtype == torch.float32
            assert rel_err(y, ref) < 0.06
            assert mod(torch.randn(0, 72)).shape == (0, 40)


def test_fp8_state_roundtrip_and_bad_inputs(tmp_path: object) -> None:
    lin = nn.Linear(32, 16, bias=False)
    mod = Fp8Linear.from_linear(lin, "dynamic")
    assert RUNTIME_MODULES.get("Fp8Linear") is Fp8Linear
    rebuilt = Fp8Linear.from_config(mod.config())
    path = f"{tmp_path}/m.safetensors"
    save_file({k: v.contiguous() for k, v in mod.state_dict().items()}, path)
    rebuilt.load_state_dict(load_file(path))
    x = torch.randn(3, 32)
    assert torch.equal(rebuilt(x), mod(x))
    assert mod(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="activations"):
        Fp8Linear(4, 4, activations="static")
    with pytest.raises(ArtifactError, match="re-save"):
        Fp8Linear.from_config({"in_features": 4})
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(UserInputError, match="NaN"):
        Fp8Linear.from_linear(lin)


# --- 2:4 -------------------------------------------------------------------------------------


def test_semi_structured_checks_and_dense_fallback() -> None:
    lin = two_four_linear(64, 128)
    assert is_2to4(lin.weight) and not is_2to4(nn.Linear(128, 64).weight)
    assert not is_2to4(torch.zeros(4, 6)) and kernel_shape_ok(64, 128)
    assert not kernel_shape_ok(48, 128) and not kernel_shape_ok(64, 96)
    mod = SemiStructuredLinear.from_linear(lin)
    x = torch.randn(3, 7, 128)
    with torch.no_grad():
        assert mod._kernel_for(x) == "dense"
        assert torch.allclose(mod(x), lin(x), atol=1e-5)
        assert mod(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(UserInputError, match="2:4"):
        SemiStructuredLinear.from_linear(nn.Linear(8, 4))
    with pytest.raises(ConfigError, match="multiple of 4"):
        SemiStructuredLinear(6, 4)
    with pytest.raises(ArtifactError, match="re-save"):
        SemiStructuredLinear.from_config({})
    rebuilt = SemiStructuredLinear.from_config(mod.config())
    rebuilt.load_state_dict(mod.state_dict())
    assert torch.equal(rebuilt(x), mod(x))


def test_use_semi_structured_swaps_only_2to4_layers() -> None:
    model = nn.Sequential(two_four_linear(32, 64), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 64)
    with torch.no_grad():
        before = model(x)
        assert use_semi_structured(model) == ["0"]
        assert isinstance(model[0], SemiStructuredLinear) and isinstance(model[2], nn.Linear)
        assert torch.allclose(model(x), before, atol=1e-5)


# --- device checks ---------------------------------------------------------------------------


def test_device_checks_answer_false_off_cuda() -> None:
    assert rt_device.cuda_capability("cpu") is None
    assert not rt_device.int4_cuda_available("cpu")
    assert not rt_device.semi_structured_available("cpu")
    assert rt_device.describe("cpu") == "cpu"
    if not HAS_CUDA:
        assert rt_device.cuda_capability("cuda") is None
        assert not rt_device.scaled_mm_available("cuda")


def test_fallback_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="slimtorch.runtime.device"):
        rt_device.fallback("test-kernel", "cpu", "reason-xyz")
        rt_device.fallback("test-kernel", "cpu", "reason-xyz")
    assert sum("reason-xyz" in r.message for r in caplog.records) == 1


# --- on a GPU --------------------------------------------------------------------------------


@cuda
@needs_cuda
@pytest.mark.parametrize("shape", [(64, 128, 32), (40, 96, 32), (576, 576, 64), (24, 512, 512)])
def test_int4_cuda_kernel(shape: tuple[int, int, int]) -> None:
    out, inp, group = shape
    mod = int4_module(out, inp, group).cuda()
    x = torch.randn(5, inp, device="cuda")
    expected = x @ mod.dequantized_weight().t() + mod.bias
    if not rt_device.int4_cuda_available(x.device):
        pytest.skip("GPU older than compute capability 8.0")
    assert mod._kernel_for(x) == "tinygemm"
    y = mod(x)
    assert y.device.type == "cuda" and y.dtype == torch.float32
    assert rel_err(y, expected) < 1e-2
    assert rel_err(mod(x.half()), expected) < 2e-2


@cuda
@needs_cuda
def test_fp8_scaled_mm_on_cuda() -> None:
    lin = nn.Linear(256, 128).cuda()
    mod = Fp8Linear.from_linear(lin, "dynamic")
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    kernel = mod._kernel_for(x)
    assert kernel == ("scaled_mm" if rt_device.scaled_mm_available(x.device) else "dequant")
    with torch.no_grad():
        assert rel_err(mod(x), lin(x.float())) < 0.06


@cuda
@needs_cuda
def test_semi_structured_on_cuda() -> None:
    lin = two_four_linear(128, 256).cuda().half()
    mod = SemiStructuredLinear.from_linear(lin)
    x = torch.randn(16, 256, device="cuda", dtype=torch.float16)
    if not rt_device.semi_structured_available(x.device):
        pytest.skip("GPU older than compute capability 8.0")
    assert mod._kernel_for(x) == "semi_structured"
    with torch.no_grad():
        assert rel_err(mod(x), lin(x)) < 1e-2


def test_fp8_and_2to4_modules_survive_save_and_load(tmp_path: object) -> None:
    import slimtorch as st
    from slimtorch.graph.weights import replace_module
    from slimtorch.testing.models import TinyTransformer

    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x = torch.randint(0, 32, (3, 5))
    ff0 = model.get_submodule("ff.0")
    assert isinstance(ff0, nn.Linear)
    with torch.no_grad():  # 2:4 along the input of ff.0
        w = ff0.weight.reshape(ff0.out_features, -1, 4)
        keep = w.abs().topk(2, dim=-1).indices
        w.mul_(torch.zeros_like(w).scatter_(-1, keep, 1.0))
    assert use_semi_structured(model) == ["ff.0"]
    head = model.get_submodule("head")
    assert isinstance(head, nn.Linear)
    replace_module(model, "head", Fp8Linear.from_linear(head, "dynamic"))
    with torch.no_grad():
        y = model(x)
    st.save(model, f"{tmp_path}/art")
    loaded = st.load(f"{tmp_path}/art", trust_factory=True)
    assert isinstance(loaded.get_submodule("ff.0"), SemiStructuredLinear)
    assert isinstance(loaded.get_submodule("head"), Fp8Linear)
    assert loaded.get_submodule("head").activations == "dynamic"
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
