"""Runtime modules left behind by BatchNorm folding (``fuse.batchnorm``, ``fuse.conv_bn_relu``).

* :class:`FusedLayer` holds a Linear or convolution *with* bias (the BN folded into it) and,
  optionally, the ReLU that followed the BN. It replaces a layer whose architecture changed:
  one that had ``bias=False``, or one that now also applies the ReLU. The inner ``layer`` is a
  plain ``nn.Linear``/``nn.ConvNd``, so later pruning and quantization stages still find it.
  Under ``torch.no_grad``/``inference_mode`` on CPU a fused ReLU runs inside oneDNN's
  convolution (``mkldnn._convolution_pointwise`` with the weight pre-packed in oneDNN's blocked
  layout, as Inductor does for conv+relu) for Conv2d; the packed copy is a cache, rebuilt when
  the weight changes, never saved. Otherwise the ReLU is applied in place on the output.
* :class:`FusedIdentity` replaces the folded BatchNorm (and the fused ReLU): it returns its
  input, and records in its config what it replaced so ``slimtorch inspect`` can say so.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from slimtorch.core.errors import ArtifactError

_LAYERS: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "ConvTranspose1d": nn.ConvTranspose1d,
    "ConvTranspose2d": nn.ConvTranspose2d,
    "ConvTranspose3d": nn.ConvTranspose3d,
}
_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")


def layer_args(layer: nn.Module) -> dict[str, Any]:
    """JSON-serialisable constructor arguments of a Linear or convolution (without ``bias``)."""
    if isinstance(layer, nn.Linear):
        return {"in_features": layer.in_features, "out_features": layer.out_features}
    if not isinstance(layer, nn.modules.conv._ConvNd):
        raise TypeError(f"not a Linear or convolution: {type(layer).__name__}")
    args: dict[str, Any] = {}
    for key in _CONV_ARGS:
        value = getattr(layer, key)
        args[key] = list(value) if isinstance(value, tuple) else value
    args["groups"] = layer.groups
    args["padding_mode"] = layer.padding_mode
    if layer.transposed:
        args["output_padding"] = list(layer.output_padding)
    return args


Layer = nn.Linear | nn.modules.conv._ConvNd


def _build_layer(kind: str, args: dict[str, Any]) -> Layer:
    cls = _LAYERS[kind]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    return cast(Layer, cls(**kwargs, bias=True))


class FusedLayer(nn.Module):
    """A Linear/ConvNd with the following BatchNorm folded into it, then optionally ReLU."""

    def __init__(self, kind: str, args: dict[str, Any], relu: bool = False) -> None:
        super().__init__()
        if kind not in _LAYERS:
            raise ValueError(f"FusedLayer cannot hold {kind!r}; known: {', '.join(_LAYERS)}")
        self.kind = kind
        self.args = dict(args)
        self.relu = relu
        self.layer: Layer = _build_layer(kind, args)
        self.kernel: Literal["auto", "plain"] = "auto"  # "plain": layer, then relu_ (always)
        self._packed: Tensor | None = None
        self._packed_key: tuple[Any, ...] | None = None

    @classmethod
    def wrap(cls, layer: Layer, weight: Tensor, bias: Tensor, relu: bool) -> FusedLayer:
        """A FusedLayer shaped like ``layer`` holding ``weight`` and ``bias``."""
        mod = cls(type(layer).__name__, layer_args(layer), relu)
        mod.layer.to(device=layer.weight.device, dtype=layer.weight.dtype)
        inner = mod.layer
        assert inner.bias is not None
        with torch.no_grad():
            inner.weight.copy_(weight)
            inner.bias.copy_(bias)
        mod.train(layer.training)
        return mod

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (weights come from the state dict)."""
        return {"kind": self.kind, "args": self.args, "relu": self.relu}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> FusedLayer:
        """Rebuild an empty module from :meth:`config` output; then ``load_state_dict``."""
        try:
            return cls(str(cfg["kind"]), dict(cfg["args"]), bool(cfg["relu"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"bad FusedLayer config {cfg!r} ({exc}); it needs kind, args and relu -"
                " re-save the artifact"
            ) from None

    def extra_repr(self) -> str:
        return f"relu={self.relu}"

    def _fast_conv_relu(self, x: Tensor) -> bool:
        layer = self.layer
        if not isinstance(layer, nn.Conv2d):
            return False
        ok = (
            self.relu
            and self.kernel == "auto"
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.dim() == 4
            and not torch.is_grad_enabled()
            and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str)
            and torch.backends.mkldnn.is_available()
        )
        if not ok:
            return False
        # Where ATen itself would pick oneDNN (aten/src/ATen/native/Convolution.cpp,
        # use_mkldnn): for a single small image its im2col kernel is faster than oneDNN.
        kh, kw = layer.kernel_size[0], layer.kernel_size[-1]
        return x.shape[0] > 1 or layer.groups > 1 or (kh > 3 and kw > 3) or x.numel() > 20480

    def __getstate__(self) -> dict[str, Any]:
        # The packed weight is an opaque oneDNN tensor: drop it (rebuilt on the next call).
        state = dict(super().__getstate__())
        state["_packed"] = None
        state["_packed_key"] = None
        return state

    def _packed_weight(self, conv: nn.Conv2d, x: Tensor) -> Tensor:
        """The weight in oneDNN's blocked layout, rebuilt whenever the weight changes."""
        w = conv.weight
        key = (w.device, w.data_ptr(), w._version)
        if self._packed is None or self._packed_key != key:
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(
                w.detach(), list(conv.padding), list(conv.stride), list(conv.dilation),
                conv.groups, list(x.shape),
            )  # fmt: skip
            self._packed_key = key
        return self._packed

    def forward(self, x: Tensor) -> Tensor:
        if self.relu and self._fast_conv_relu(x):
            conv = self.layer
            assert isinstance(conv, nn.Conv2d)
            out: Tensor = torch.ops.mkldnn._convolution_pointwise(
                x, self._packed_weight(conv, x), conv.bias, list(conv.padding),
                list(conv.stride), list(conv.dilation), conv.groups, "relu", [], "",
            )  # fmt: skip
            return out
        y: Tensor = self.layer(x)
        return torch.relu_(y) if self.relu else y


class FusedIdentity(nn.Module):
    """Stands where a folded BatchNorm (or a fused ReLU) was; returns its input."""

    def __init__(self, replaced: str = "BatchNorm2d") -> None:
        super().__init__()
        self.replaced = replaced

    def config(self) -> dict[str, Any]:
        return {"replaced": self.replaced}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> FusedIdentity:
        return cls(str(cfg.get("replaced", "BatchNorm2d")))

    def extra_repr(self) -> str:
        return f"replaced={self.replaced}"

    def forward(self, x: Tensor) -> Tensor:
        return x
