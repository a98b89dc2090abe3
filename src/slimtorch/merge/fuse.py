"""Fold BatchNorm into the preceding convolution or Linear; fuse Conv-BN-ReLU for inference.

    y = gamma * (W x + b - mean) / sqrt(var + eps) + beta  =  (s W) x + (s (b - mean) + beta)

with ``s = gamma / sqrt(var + eps)`` per output channel (:func:`fold_bn`, pure).

Pairs are found with ``torch.fx`` symbolic tracing: a Conv1d/2d/3d, ConvTranspose1d/2d/3d or
Linear module whose output feeds only a BatchNorm of the matching kind and width, each module
called once. When the model cannot be traced, adjacent children of ``nn.Sequential``
containers are used instead (with a warning naming the tracing error). A Linear is folded into
a following ``BatchNorm1d`` assuming its output is ``[N, features]`` (BatchNorm1d normalises
dim 1; a ``[N, L, features]`` output with ``L == features`` would be folded wrongly).

The layer keeps its weights in place when it already has a bias; otherwise it becomes a
:class:`~slimtorch.runtime.fused.FusedLayer` (the architecture changes). The BatchNorm becomes a
:class:`~slimtorch.runtime.fused.FusedIdentity`. ``fuse.conv_bn_relu`` also moves an
``nn.ReLU`` module that follows the BN into the FusedLayer; a functional ``torch.relu`` in the
model's ``forward`` cannot be removed and stays. Pruning masks survive folding (a zero weight
stays zero); a weight that already carries a quantization grid is refused: fuse first. The
recipe stages ``fuse.batchnorm`` and ``fuse.conv_bn_relu`` are in :mod:`slimtorch.merge.stages.fuse`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.core.targets import Targets, describe_model
from slimtorch.formats.state import clear_state, get_state, set_state
from slimtorch.graph.weights import replace_module
from slimtorch.runtime.fused import FusedIdentity, FusedLayer

log = logging.getLogger(__name__)

_CONV = nn.modules.conv._ConvNd
_BN_FOR_DIM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@dataclass(frozen=True)
class BNParams:
    """What folding needs from a BatchNorm: running statistics and the affine parameters."""

    mean: Tensor
    var: Tensor
    eps: float
    gamma: Tensor | None = None
    beta: Tensor | None = None

    @classmethod
    def of(cls, bn: nn.modules.batchnorm._BatchNorm) -> BNParams:
        if bn.running_mean is None or bn.running_var is None:
            raise UnsupportedModelError(
                f"{type(bn).__name__} has no running statistics (track_running_stats=False):"
                " it normalises with batch statistics and cannot be folded; ignore it"
            )
        gamma = bn.weight.detach() if bn.weight is not None else None
        beta = bn.bias.detach() if bn.bias is not None else None
        return cls(bn.running_mean.detach(), bn.running_var.detach(), bn.eps, gamma, beta)


def fold_bn(
    weight: Tensor,
    bias: Tensor | None,
    bn: BNParams,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weight and bias of a Linear/ConvNd that computes ``bn(layer(x))`` (BN in eval mode).

    ``weight`` is ``[out, in/groups, *k]`` (Linear: ``[out, in]``), or for a transposed
    convolution ``[in, out/groups, *k]``. Computed in float64, returned in ``weight.dtype``.
    """
    w = weight.detach().to(torch.float64)
    out = w.shape[1] * groups if transposed else w.shape[0]
    if bn.mean.numel() != out:
        raise UnsupportedModelError(
            f"BatchNorm has {bn.mean.numel()} features but the layer has {out} outputs;"
            " only a BatchNorm directly after its layer can be folded"
        )
    inv_std = (bn.var.to(torch.float64) + bn.eps).rsqrt()
    scale = inv_std if bn.gamma is None else bn.gamma.to(torch.float64) * inv_std
    shift = -bn.mean.to(torch.float64)
    if bias is not None:
        shift = shift + bias.detach().to(torch.float64)
    new_bias = shift * scale
    if bn.beta is not None:
        new_bias = new_bias + bn.beta.to(torch.float64)
    kernel = (1,) * (w.dim() - 2)
    if transposed:
        per_group = w.shape[0] // groups
        grouped = w.reshape(groups, per_group, w.shape[1], *w.shape[2:])
        folded = grouped * scale.reshape(groups, 1, w.shape[1], *kernel)
        new_w = folded.reshape(w.shape)
    else:
        new_w = w * scale.reshape(out, 1, *kernel)
    return new_w.to(weight.dtype), new_bias.to(weight.dtype)


@dataclass(frozen=True)
class FusePair:
    """Module names of a layer, the BatchNorm after it, and optionally the ReLU after that."""

    layer: str
    bn: str
    relu: str | None = None


def _compatible(layer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return False
    if isinstance(layer, nn.Linear):
        return type(bn) is nn.BatchNorm1d and bn.num_features == layer.out_features
    if isinstance(layer, _CONV):
        dims = len(layer.kernel_size)
        return type(bn) is _BN_FOR_DIM.get(dims) and bn.num_features == layer.out_channels
    return False


def _traced_pairs(gm: fx.GraphModule, model: nn.Module, with_relu: bool) -> list[FusePair]:
    modules = dict(model.named_modules())
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    counts = Counter(str(n.target) for n in calls)
    # a module whose parameters the forward also reads directly (get_attr) must keep them
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            counts[str(n.target).rpartition(".")[0]] += 1
    pairs = []
    for node in calls:
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(node.args) != 1:
            continue
        layer_name, bn_name = str(src.target), str(node.target)
        if not _compatible(modules[layer_name], modules[bn_name]):
            continue
        if len(src.users) != 1 or counts[layer_name] != 1 or counts[bn_name] != 1:
            continue
        relu = None
        if with_relu and len(node.users) == 1:
            user = next(iter(node.users))
            name = str(user.target)
            if user.op == "call_module" and type(modules[name]) is nn.ReLU and counts[name] == 1:
                relu = name
        pairs.append(FusePair(layer_name, bn_name, relu))
    return pairs


def _sequential_pairs(model: nn.Module, with_relu: bool) -> list[FusePair]:
    pairs = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        kids = list(module.named_children())
        for i in range(len(kids) - 1):
            (a, layer), (b, bn) = kids[i], kids[i + 1]
            if not _compatible(layer, bn):
                continue
            relu = None
            if with_relu and i + 2 < len(kids) and type(kids[i + 2][1]) is nn.ReLU:
                relu = kids[i + 2][0]
            dot = f"{prefix}." if prefix else ""
            pairs.append(FusePair(dot + a, dot + b, dot + relu if relu else None))
    return pairs


def find_fusable(model: nn.Module, with_relu: bool = False) -> list[FusePair]:
    """Layer -> BatchNorm (-> ReLU) chains of ``model`` that can be fused, in graph order."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # tracing runs arbitrary user code: any error means untraceable
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        pairs = _sequential_pairs(model, with_relu)
        if not pairs:
            raise UnsupportedModelError(
                f"torch.fx cannot trace the model ({reason}) and no Conv/Linear -> BatchNorm"
                " pair sits in an nn.Sequential; make that operation traceable or fold the"
                " layers with slimtorch.merge.fuse.fold_bn"
            ) from None
        log.warning("torch.fx cannot trace the model (%s); using nn.Sequential order", reason)
        return pairs
    return _traced_pairs(gm, model, with_relu)


def fuse_pair(model: nn.Module, pair: FusePair) -> None:
    """Fold ``pair.bn`` into ``pair.layer`` (and fuse ``pair.relu``), in place."""
    layer = model.get_submodule(pair.layer)
    bn = model.get_submodule(pair.bn)
    assert isinstance(layer, (nn.Linear, _CONV))
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    if bn.training:
        raise UnsupportedModelError(
            f"BatchNorm {pair.bn!r} is in training mode: folding uses its running statistics,"
            " so call model.eval() before fusing"
        )
    state = get_state(layer, "weight")
    if state is not None and state.quant is not None:
        raise ConfigError(
            f"{pair.layer!r} is already quantized; put fuse.* before quantize.* in the recipe"
        )
    transposed = isinstance(layer, _CONV) and layer.transposed
    groups = layer.groups if isinstance(layer, _CONV) else 1
    bias = layer.bias
    w, b = fold_bn(layer.weight, bias, BNParams.of(bn), transposed, groups)
    if bias is not None and pair.relu is None:
        with torch.no_grad():
            layer.weight.copy_(w)
            bias.copy_(b)
    else:
        fused = FusedLayer.wrap(layer, w, b, relu=pair.relu is not None)
        if state is not None:
            set_state(fused.layer, "weight", state)
            clear_state(layer, "weight")
        replace_module(model, pair.layer, fused)
    replace_module(model, pair.bn, FusedIdentity(type(bn).__name__))
    if pair.relu is not None:
        replace_module(model, pair.relu, FusedIdentity("ReLU"))


class FuseConfig(StageConfig):
    """``targets`` select the Conv/Linear layers; ``ignore`` may name layers or BatchNorms."""


def _selected(model: nn.Module, pairs: list[FusePair], sel: Targets) -> list[FusePair]:
    out = []
    for p in pairs:
        layer, bn = model.get_submodule(p.layer), model.get_submodule(p.bn)
        if sel.selects(p.layer, layer) and not any(sel.matches(i, p.bn, bn) for i in sel.ignore):
            out.append(p)
    return out


def fuse_model(model: nn.Module, config: FuseConfig, with_relu: bool) -> list[FusePair]:
    """Fuse every selected pair of ``model`` in place; returns the fused pairs."""
    sel = Targets.of(config.targets, config.ignore)
    found = find_fusable(model, with_relu)
    pairs = _selected(model, found, sel)
    if not pairs:
        if found:
            raise sel.no_match_error(model, ["Conv1d/2d/3d", "ConvTranspose1d/2d/3d", "Linear"])
        raise UnsupportedModelError(
            "no Conv/Linear layer followed directly by a BatchNorm of its width (model has:"
            f" {describe_model(model)}); remove the fuse stage from the recipe"
        )
    for p in pairs:
        fuse_pair(model, p)
    relus = sum(p.relu is not None for p in pairs)
    log.info("folded %d BatchNorm layers (%d ReLUs fused)", len(pairs), relus)
    return pairs
