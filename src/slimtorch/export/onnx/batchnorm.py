"""BatchNorm as a per-channel scale and shift, so that a low-bit convolution keeps its codes.

Both ONNX exporters fold an inference-mode BatchNorm into the convolution before it (the dynamo
exporter's optimizer, the TorchScript exporter's peephole pass): the folded weight is
``W * gamma / sqrt(var + eps)`` per output channel, values that no longer decode from the
convolution's int8/int4/codebook codes, so the whole weight was written dense float (a ResNet-18
int8 artifact: 1.6 MB on disk, 6.4 MB as ONNX). :func:`batchnorm_as_affine` gives the exporter a
copy of the model whose BatchNorms are :class:`ChannelAffine` (``x * scale + shift``, the same
function): exported as ``Mul``/``Add`` after the ``Conv``, which the exporters leave alone, so the
convolution's weight initializer is the model's and is stored low-bit. onnxruntime folds the
``Mul``/``Add`` (and the decoded weight, with ``decode="load"``) into the ``Conv`` when it loads
the file, so the running model is the same as with BatchNorm folded.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ChannelAffine(nn.Module):
    """``x * scale + shift`` along axis 1: an inference-mode BatchNorm, for export only."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> ChannelAffine:
        assert bn.running_mean is not None and bn.running_var is not None
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var.float() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.float()
            shift = -bn.running_mean.float() * scale
            if bn.bias is not None:
                shift = shift + bn.bias.float()
        return cls(scale.clone(), shift.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * self.scale.view(shape).to(x.dtype) + self.shift.view(shape).to(x.dtype)


def _foldable(module: nn.Module) -> bool:
    """An inference-mode BatchNorm with running statistics (what the exporters fold)."""
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.running_mean is not None
        and module.running_var is not None
    )


def batchnorm_as_affine(model: nn.Module, copied: bool = False) -> tuple[nn.Module, list[str]]:
    """``model`` (copied unless ``copied``: it already is a private copy) with every
    BatchNorm with running statistics as a :class:`ChannelAffine`; and their names."""
    from slimtorch.graph.weights import replace_module

    names = [n for n, m in model.named_modules() if n and _foldable(m)]
    if not names:
        return model, []
    twin = model if copied else copy.deepcopy(model)
    for name in names:
        bn = twin.get_submodule(name)
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        replace_module(twin, name, ChannelAffine.from_batchnorm(bn).eval())
    return twin, names
