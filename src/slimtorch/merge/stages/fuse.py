"""Recipe stages ``fuse.batchnorm`` and ``fuse.conv_bn_relu``: fold every selected BatchNorm into
the preceding Conv/Linear (and fuse the ReLU after it), see :mod:`slimtorch.merge.fuse`."""

from __future__ import annotations

from torch import nn

from slimtorch.core.methods import Run, register_method
from slimtorch.merge.fuse import FuseConfig, fuse_model


@register_method("fuse.batchnorm", FuseConfig, "fold BatchNorm into the preceding Conv/Linear")
def fuse_batchnorm(model: nn.Module, config: FuseConfig, run: Run) -> None:
    fuse_model(model, config, with_relu=False)


@register_method(
    "fuse.conv_bn_relu", FuseConfig, "fold BatchNorm and fuse the following ReLU, for inference"
)
def fuse_conv_bn_relu(model: nn.Module, config: FuseConfig, run: Run) -> None:
    fuse_model(model, config, with_relu=True)
