"""Int4 weight-only Linear: packed 4-bit codes with group scales and zero points.

    w[o, k] = (codes[o, k] - zero_points[o, g]) * scales[o, g]        g = k // group_size

State (buffers, in ``state_dict``, portable): ``qweight`` uint8 ``[out, ceil(in / 2)]`` with two
codes per byte (column ``2j`` in the low nibble, ``2j + 1`` in the high one), ``scales``
``[out, groups]`` (float16 where exact, else float32), ``zero_points`` uint8 ``[out, groups]``
(0..15) and ``bias``. The last group may be partial: it is zero-padded.

Kernels (``kernel = "auto"`` picks the first that applies; set ``module.kernel`` to force one):

* ``tinygemm``: ``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)``
  (torch >= 2.5, CPU). It wants bfloat16 activations (float32 input runs ~15x slower there, so
  activations are cast to bfloat16 and the output back), the weight repacked by
  ``_convert_weight_to_int4pack_for_cpu(int32 [N, K], 1)`` with ``N % 16 == 0``, a group of 32,
  64, 128 or 256 and ``K % group == 0``, and ``scales_and_zeros`` ``[K / group, N, 2]`` in the
  activation dtype with tinygemm's float zero: ``w = (codes - 8) * scale + zero``, so
  ``zero = (8 - zero_point) * scale``. Rows are padded to a multiple of 16 and the input to
  whole groups; a group that is a multiple of 32 but not a kernel size is split into kernel-size
  groups with repeated parameters. Accuracy: bfloat16 rounding of activations and of the scales,
  about 3e-3 relative error against the float32 dequantized product.
  On a CUDA device of compute capability >= 8.0 the same name runs torch's CUDA tinygemm,
  ``_weight_int4pack_mm`` (same arithmetic, its own packing: :mod:`slimtorch.runtime.int4_cuda`).
* ``dequant``: pure PyTorch, float32: ``F.linear(x, dequantized_weight())`` (the dequantized
  weight is cached). Used where the op is missing (a GPU older than Ampere: logged once), or
  for group sizes the op cannot run.

The kernel's packed copy is derived from the buffers, cached, and rebuilt when they change.
At batch 1 a layer's kernel call takes ~30 us (576x576, one thread), so the per-call Python is
kept to a few attribute reads (identity and version of the buffers): it was ~36 us a call, about
7 ms of a SmolLM2-135M token's 210 calls (measured). Threads: on a loaded 2-core machine a
2-thread call waits ~10 ms whenever one thread is descheduled; one thread decodes faster there.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtorch.core.errors import ArtifactError, ConfigError, UserInputError
from slimtorch.formats.state import QuantState, code_range, to_matrix
from slimtorch.runtime import int4_cuda
from slimtorch.runtime.device import fallback, int4_cuda_available

log = logging.getLogger(__name__)

Kernel = Literal["auto", "tinygemm", "dequant"]
ScaleDtype = Literal["float16", "float32"]

_KERNEL_GROUPS = (256, 128, 64, 32)
_MID = 8  # tinygemm's implicit code offset


def tinygemm_available() -> bool:
    """Whether this torch build has the CPU int4 weight-only matmul."""
    try:
        return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
            torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
        )
    except (AttributeError, RuntimeError):
        return False


def kernel_group(group_size: int) -> int | None:
    """The tinygemm group size that tiles ``group_size`` exactly, or None."""
    for g in _KERNEL_GROUPS:
        if group_size % g == 0:
            return g
    return None


def pack_int4(codes: Tensor) -> Tensor:
    """``uint8 [out, ceil(in / 2)]``: codes 0..15 of ``[out, in]``, two per byte (low nibble first)."""
    c = codes.to(torch.uint8)
    if c.shape[1] % 2:
        c = F.pad(c, (0, 1))
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [out, in_features]``."""
    both = torch.stack([packed & 0x0F, packed >> 4], dim=-1)
    return both.reshape(packed.shape[0], -1)[:, :in_features]


def _check_inputs(codes: Tensor, scales: Tensor, zero_points: Tensor, group_size: int) -> None:
    if group_size < 1:
        raise ConfigError(f"group_size={group_size}; use a positive group size, e.g. 128")
    if codes.dim() != 2:
        raise UserInputError(f"codes must be a matrix [out, in], got shape {tuple(codes.shape)}")
    out, inp = codes.shape
    groups = -(-inp // group_size)
    for name, t in (("scales", scales), ("zero_points", zero_points)):
        if tuple(t.shape) != (out, groups):
            raise UserInputError(
                f"{name} has shape {tuple(t.shape)}, expected [out, ceil(in / group_size)] ="
                f" {(out, groups)} for codes {(out, inp)} and group_size {group_size}"
            )
    for name, t in (("codes", codes), ("zero_points", zero_points)):
        if t.is_floating_point() or (t.numel() and (int(t.min()) < 0 or int(t.max()) > 15)):
            raise UserInputError(
                f"{name} must be integers in 0..15 (unsigned 4-bit); shift signed codes by"
                " +8 (from_state does this for a QuantState)"
            )
    if not bool(torch.isfinite(scales).all()):
        raise UserInputError("scales hold NaN or Inf; re-quantize the weight from finite values")


class Int4WeightOnlyLinear(nn.Module):
    """``nn.Linear`` replacement with asymmetric 4-bit group-quantized weights."""

    qweight: Tensor
    scales: Tensor
    zero_points: Tensor
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int = 128,
        bias: bool = True,
        scale_dtype: ScaleDtype = "float16",
    ) -> None:
        super().__init__()
        if group_size < 1 or in_features < 1 or out_features < 1:
            raise ConfigError(
                f"Int4WeightOnlyLinear({in_features}, {out_features}, group_size={group_size}):"
                " sizes must be positive"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        groups = -(-in_features // group_size)
        packed = torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8)
        self.register_buffer("qweight", packed)
        sdtype = torch.float16 if scale_dtype == "float16" else torch.float32
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=sdtype))
        self.register_buffer("zero_points", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.kernel: Kernel = "auto"
        self._cache: dict[str, Tensor] = {}
        self._cache_key: tuple[Any, ...] | None = None
        self._plan: tuple[Tensor, Tensor, int, int] | None = None
        self._plan_key: tuple[Any, ...] | None = None

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_quantized(
        cls,
        codes: Tensor,
        scales: Tensor,
        zero_points: Tensor,
        group_size: int,
        bias: Tensor | None = None,
    ) -> Int4WeightOnlyLinear:
        """The module computing ``x @ ((codes - zp) * scales)^T + bias`` (codes 0..15)."""
        _check_inputs(codes, scales, zero_points, group_size)
        out, inp = codes.shape
        s32 = scales.detach().to(torch.float32)
        exact16 = torch.equal(s32.to(torch.float16).to(torch.float32), s32)
        mod = cls(inp, out, group_size, bias is not None, "float16" if exact16 else "float32")
        mod.qweight.copy_(pack_int4(codes))
        mod.scales.copy_(s32)
        mod.zero_points.copy_(zero_points.to(torch.uint8))
        if bias is not None and mod.bias is not None:
            mod.bias.copy_(bias.detach().to(torch.float32))
        return mod.to(codes.device)

    @classmethod
    def from_state(cls, q: QuantState, bias: Tensor | None = None) -> Int4WeightOnlyLinear:
        """From an affine ``QuantState`` of at most 4 bits (signed codes are shifted to 0..15)."""
        if q.scheme != "affine" or q.bits > 4:
            raise UserInputError(
                f"Int4WeightOnlyLinear runs affine weights of at most 4 bits, got {q.bits}-bit"
                f" {q.scheme}; quantize with quantize.rtn/gptq/awq bits<=4"
            )
        codes = to_matrix(q.codes.to(torch.int32))
        shift = -code_range(q.bits, q.signed)[0]
        out, inp = codes.shape
        scale, zp = q.scale.to(torch.float32), q.zero_point.to(torch.int32)
        if q.granularity == "per_group":
            assert q.group_size is not None
            group = q.group_size
        else:
            group = inp
            scale, zp = scale.expand(out, 1), zp.expand(out, 1)
        return cls.from_quantized(codes + shift, scale, zp + shift, group, bias)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (buffers come from the state dict)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "group_size": self.group_size,
            "bias": self.bias is not None,
            "scale_dtype": "float16" if self.scales.dtype == torch.float16 else "float32",
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Int4WeightOnlyLinear:
        """Rebuild an empty module from :meth:`config` output; then ``load_state_dict``."""
        try:
            sdtype = str(cfg.get("scale_dtype", "float16"))
            if sdtype not in ("float16", "float32"):
                raise ValueError(f"scale_dtype {sdtype!r}")
            return cls(
                int(cfg["in_features"]),
                int(cfg["out_features"]),
                int(cfg["group_size"]),
                bool(cfg["bias"]),
                "float16" if sdtype == "float16" else "float32",
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"bad Int4WeightOnlyLinear config {cfg!r} ({exc}); it needs in_features,"
                " out_features, group_size and bias - re-save the artifact"
            ) from None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features},"
            f" group_size={self.group_size}, bias={self.bias is not None}"
        )

    def codes(self) -> Tensor:
        """The 4-bit codes ``uint8 [out, in]``."""
        return unpack_int4(self.qweight, self.in_features)

    def dequantized_weight(self) -> Tensor:
        """The float32 weight ``[out, in]`` the module represents."""
        zp = self.zero_points.to(torch.float32).repeat_interleave(self.group_size, dim=1)
        scale = self.scales.to(torch.float32).repeat_interleave(self.group_size, dim=1)
        codes = self.codes().to(torch.float32)
        return (codes - zp[:, : self.in_features]) * scale[:, : self.in_features]

    # --- kernels ----------------------------------------------------------------------------
    def _kernel_for(self, x: Tensor) -> Kernel:
        if self.kernel != "auto":
            return self.kernel
        if x.device.type == "cuda":
            ok = int4_cuda_available(x.device)
            if not ok:
                fallback("int4 tinygemm", x.device, "needs compute capability >= 8.0")
        else:
            ok = x.device.type == "cpu" and tinygemm_available()
        return "tinygemm" if ok and kernel_group(self.group_size) is not None else "dequant"

    def _cached(self, kernel: Kernel) -> dict[str, Tensor]:
        bufs = (self.qweight, self.scales, self.zero_points)
        key = (kernel, self.qweight.device, *((b.data_ptr(), b._version) for b in bufs))
        if self._cache_key != key:
            self._cache = self._build_tinygemm() if kernel == "tinygemm" else {}
            if kernel == "dequant":
                self._cache["weight"] = self.dequantized_weight()
            self._cache_key = key
        return self._cache

    def _build_tinygemm(self) -> dict[str, Tensor]:
        kg = kernel_group(self.group_size)
        if kg is None:
            raise ConfigError(
                f"the tinygemm kernel needs a group size that is a multiple of 32, got"
                f" {self.group_size}; use kernel='dequant' or re-quantize with group 32..256"
            )
        out, groups = self.scales.shape
        n_pad = -out % 16
        k_pad = groups * self.group_size
        codes = F.pad(self.codes().to(torch.int32), (0, k_pad - self.in_features, 0, n_pad))
        if codes.device.type == "cuda":
            packed = int4_cuda.convert_cuda(codes)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        rep = self.group_size // kg
        scale = self.scales.to(torch.float32).repeat_interleave(rep, dim=1)
        zero = (_MID - self.zero_points.to(torch.float32)).repeat_interleave(rep, dim=1) * scale
        sz = torch.stack([scale, zero], dim=-1)  # [out, K / kg, 2]
        sz = F.pad(sz, (0, 0, 0, 0, 0, n_pad)).transpose(0, 1).contiguous()
        return {"packed": packed, "sz": sz.to(torch.bfloat16)}

    def _tinygemm_plan(self, x: Tensor) -> tuple[Tensor, Tensor, int, int] | None:
        """``(packed, scales_and_zeros, kernel group, padded in_features)`` when tinygemm runs
        ``x``, else None. Cached with the buffers themselves and their versions (an in-place
        change or a new buffer rebuilds it), checked in a few attribute reads: at batch 1 the
        Python around a ~30 us kernel call is a large share of the layer's time."""
        q, s, z = self.qweight, self.scales, self.zero_points
        key = self._plan_key
        if (
            key is not None
            and key[0] is q
            and key[1] is s
            and key[2] is z
            and key[3] == (q._version, s._version, z._version, self.kernel)
        ):
            return self._plan if x.device.type == q.device.type else None
        if self._kernel_for(x) != "tinygemm":
            return None
        c = self._cached("tinygemm")
        kg = kernel_group(self.group_size)
        assert kg is not None  # checked when the cache was built
        self._plan = (c["packed"], c["sz"], kg, self.scales.shape[1] * self.group_size)
        self._plan_key = (q, s, z, (q._version, s._version, z._version, self.kernel))
        return self._plan

    def _forward_tinygemm(self, x: Tensor) -> Tensor:
        plan = self._tinygemm_plan(x)
        if plan is None:
            raise ConfigError(
                "the tinygemm kernel does not run this input (CPU, or CUDA of capability >= 8.0)"
            )
        return self._run_tinygemm(x, plan, torch.float32)

    def _run_tinygemm(
        self, x2: Tensor, plan: tuple[Tensor, Tensor, int, int], dtype: torch.dtype
    ) -> Tensor:
        packed, sz, kg, k_pad = plan
        xb = x2 if x2.dtype == torch.bfloat16 else x2.to(torch.bfloat16)
        if k_pad != self.in_features:
            xb = F.pad(xb, (0, k_pad - self.in_features))
        if packed.device.type == "cuda":
            y = int4_cuda.matmul_cuda(xb.contiguous(), packed, kg, sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), packed, kg, sz)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None:
            return y.to(torch.float32).add_(self.bias).to(dtype)
        return y.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        plan = self._tinygemm_plan(x2) if self.kernel != "dequant" else None
        if plan is not None:
            y = self._run_tinygemm(x2, plan, x.dtype)
        else:
            if self.kernel == "tinygemm":
                self._cached("tinygemm")  # raises with the reason the kernel cannot run
            w = self._cached("dequant")["weight"]
            y = F.linear(x2.to(torch.float32), w)
            if self.bias is not None:
                y = y + self.bias
            y = y.to(x.dtype)
        return y.reshape(*lead, self.out_features)
