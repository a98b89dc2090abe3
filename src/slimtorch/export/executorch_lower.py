"""The model ExecuTorch lowers: carried weights as explicit int8 codes + dequantize ops.

:func:`lowered_twin` copies the model and replaces every Linear/Conv2d whose weight
:mod:`slimtorch.export.executorch_plan` carries by a module that holds the codes (int8 buffers)
and computes with ``dequantize(codes)`` and dynamically quantized int8 activations, written with the
``quantized_decomposed`` ops that ExecuTorch's XNNPACK partitioner lowers to its ``qd8-f32-qc8w``
and ``qd8-f32-qb4w`` kernels. The codes enter the graph as they are: nothing re-quantizes them.
A BatchNorm right after a carried convolution is folded into its per-channel scales (codes
unchanged) where its factor is positive. Needs torch's ``quantized_decomposed`` op library.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtorch.export.executorch_plan import Carried, fold_scale
from slimtorch.formats.state import from_matrix


def _ops() -> object:
    import torch.ao.quantization.fx._decomposed

    return torch.ops.quantized_decomposed


def _dyn_quant(x: Tensor, per_sample: bool) -> Tensor:
    """``x`` through dynamic int8 quantize/dequantize as XNNPACK's ``qd8`` input does it.

    Exported (``torch.export``): the per-tensor ``quantized_decomposed`` pattern, which
    ExecuTorch's XNNPACK backend runs with one scale and zero point per row of a Linear's
    input and per sample of a convolution's. In PyTorch: that per-row/per-sample computation,
    so the lowered model is the reference the file is checked against.
    """
    if torch.compiler.is_exporting():
        ops = _ops()
        scale, zp = ops.choose_qparams.tensor(x, -128, 127, 2.0**-12, torch.int8)  # type: ignore[attr-defined]
        q = ops.quantize_per_tensor.tensor(x, scale, zp, -128, 127, torch.int8)  # type: ignore[attr-defined]
        out: Tensor = ops.dequantize_per_tensor.tensor(q, scale, zp, -128, 127, torch.int8)  # type: ignore[attr-defined]
        return out
    rows = x.reshape(x.shape[0], -1) if per_sample else x.reshape(-1, x.shape[-1])
    return fake_quant_rows(rows).reshape(x.shape)


def fake_quant_rows(x: Tensor, eps: float = 2.0**-12) -> Tensor:
    """Asymmetric int8 quantize/dequantize of each row of ``x`` ``[M, K]`` (range widened to
    hold 0, scale at least ``eps``), as ``choose_qparams`` + ``quantize_per_tensor`` per row."""
    lo = x.amin(dim=1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255.0).clamp(min=eps)
    zp = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    q = (torch.round(x / scale) + zp).clamp(-128, 127)
    return (q - zp) * scale


class CodesWeight(nn.Module):
    """The float weight ``dequantize(codes)`` of a :class:`Carried` (codes int8 buffers)."""

    codes: Tensor
    scale: Tensor
    zero_point: Tensor

    def __init__(self, c: Carried, shape: torch.Size) -> None:
        super().__init__()
        self.layout, self.group, self.shape = c.layout, c.group, tuple(shape)
        self.register_buffer("codes", from_matrix(c.codes, shape).contiguous())
        # ExecuTorch stores per-group scales as bfloat16: compute with exactly those
        scale = c.scale.to(torch.bfloat16).float() if c.layout == "qb4w" else c.scale.clone()
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(c.scale.shape, dtype=torch.int64))
        lo = int(c.codes.min()) if c.codes.numel() else 0
        self.qmin = -128 if lo < -127 else -127

    def forward(self) -> Tensor:
        ops = _ops()
        if self.layout == "qb4w":
            w: Tensor = ops.dequantize_per_channel_group(  # type: ignore[attr-defined]
                self.codes, self.scale, self.zero_point, -8, 7, torch.int8, self.group,
                torch.float32,
            )  # fmt: skip
            return w
        w = ops.dequantize_per_channel.default(  # type: ignore[attr-defined]
            self.codes, self.scale, self.zero_point, 0, self.qmin, 127, torch.int8
        )
        return w


class CodesLinear(nn.Module):
    """``F.linear(qd8(x), dequantize(codes), bias)``."""

    def __init__(self, c: Carried, bias: Tensor | None) -> None:
        super().__init__()
        self.weight = CodesWeight(c, c.codes.shape)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(_dyn_quant(x, False), self.weight(), self.bias)


class CodesConv2d(nn.Module):
    """``F.conv2d(qd8(x), dequantize(codes), bias, ...)`` with the convolution's geometry."""

    def __init__(self, c: Carried, conv: nn.Conv2d, bias: Tensor | None) -> None:
        super().__init__()
        self.weight = CodesWeight(c, conv.weight.shape)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), False)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight(), self.bias
        return F.conv2d(_dyn_quant(x, True), w, b, self.stride, self.padding, self.dilation)


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """``{conv: batchnorm}`` for every Conv2d whose only user is a BatchNorm2d (found by
    tracing with torch.fx; an untraceable model gives none: its BatchNorms stay)."""
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception:
        return {}
    mods = dict(model.named_modules())
    pairs = {}
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.Conv2d):
            continue
        users = list(node.users)
        is_bn = len(users) == 1 and users[0].op == "call_module"
        if is_bn and isinstance(mods.get(users[0].target), nn.BatchNorm2d):
            pairs[str(node.target)] = str(users[0].target)
    return pairs


def _bn_factor_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    assert bn.running_mean is not None and bn.running_var is not None
    k = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        k = k * bn.weight.detach().float()
    shift = -bn.running_mean.float() * k
    if bn.bias is not None:
        shift = shift + bn.bias.detach().float()
    return k, shift


def _bias_of(module: nn.Module) -> Tensor | None:
    """The bias of a Linear-like module (``nn.Linear``, ``Int8DynamicLinear``), or None."""
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, Tensor) else None


def lowered_twin(model: nn.Module, carried: list[Carried]) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` computing with the carried codes; and the BatchNorms folded."""
    from slimtorch.graph.weights import replace_module

    twin = copy.deepcopy(model).eval()
    pairs = conv_bn_pairs(twin) if carried else {}
    folded = []
    for c in carried:
        module = twin.get_submodule(c.module)
        if isinstance(module, nn.Conv2d):
            bias = None if module.bias is None else module.bias.detach().float()
            bn = twin.get_submodule(pairs[c.module]) if c.module in pairs else None
            if isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None:
                k, shift = _bn_factor_shift(bn)
                if bool((k > 0).all()):
                    c = fold_scale(c, k)
                    bias = shift if bias is None else bias * k + shift
                    replace_module(twin, pairs[c.module], nn.Identity())
                    folded.append(pairs[c.module])
            replace_module(twin, c.module, CodesConv2d(c, module, bias))
        else:
            replace_module(twin, c.module, CodesLinear(c, _bias_of(module)))
    return twin, folded
