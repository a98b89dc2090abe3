"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8.

Per input channel ``j`` of the linears sharing one input::

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)      (max over tokens; over all linears' rows)

then ``X / s`` feeds ``W * s`` (same product): :func:`apply_smoothing` folds ``1 / s`` into the
op producing ``X`` (a LayerNorm/RMSNorm or a previous Linear) and ``s`` into the linears, exactly
as AWQ folds its scales. ``alpha = 0.5`` balances the two; larger alpha moves more of the
activation range into the weights.

:func:`fold_is_exact` tells, for any architecture, whether a (producer, consumers) pair may be
folded at all: it folds random scales, reruns the caller's block and restores the weights.

W8A8 afterwards is :class:`slimtorch.runtime.Int8DynamicLinear`: int8 weights per output
channel, activations quantized per token at run time (``quantize.dynamic_int8``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from slimtorch.core.errors import ConfigError, UnsupportedModelError, UserInputError
from slimtorch.quantize.awq import apply_awq_scales, input_matrix

MIN_SCALE = 1e-5


def channel_absmax(x: Tensor) -> Tensor:
    """``max |x|`` per channel (last dimension) over all other dimensions, float32 ``[in]``."""
    if x.numel() == 0:
        raise UserInputError("no calibration tokens; give calibration data to SmoothQuant")
    x2 = x.detach().reshape(-1, x.shape[-1])
    if not bool(torch.isfinite(x2).all()):
        raise UnsupportedModelError("calibration inputs hold NaN or Inf; check the model/data")
    return x2.abs().amax(dim=0).to(torch.float32)


def weight_absmax(weights: Sequence[Tensor]) -> Tensor:
    """``max |W[:, j]|`` per input column over every ``[out, in]`` weight given, float32 ``[in]``."""
    if not weights:
        raise UserInputError("no weights given; pass the linears that read this input")
    widths = {w.shape[-1] for w in weights}
    if len(widths) != 1 or any(w.dim() != 2 for w in weights):
        raise UserInputError(
            f"weights must be matrices [out, in] sharing one input width, got"
            f" {[tuple(w.shape) for w in weights]}"
        )
    cols = [w.detach().abs().amax(dim=0).to(torch.float32) for w in weights]
    return torch.stack(cols).amax(dim=0)


def smooth_scales(
    act_absmax: Tensor, weight_absmax: Tensor, alpha: float = 0.5, min_scale: float = MIN_SCALE
) -> Tensor:
    """``s = act^alpha / w^(1 - alpha)`` per input channel, at least ``min_scale``.

    A channel whose activations (or weights) are all zero gets ``s = 1``: there is nothing to move.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha}; SmoothQuant's migration strength must be in [0, 1]")
    if act_absmax.shape != weight_absmax.shape or act_absmax.dim() != 1:
        raise UserInputError(
            f"act_absmax {tuple(act_absmax.shape)} and weight_absmax"
            f" {tuple(weight_absmax.shape)} must be vectors of the same input width"
        )
    a = act_absmax.to(torch.float32)
    w = weight_absmax.to(torch.float32).to(a.device)
    if not bool(torch.isfinite(a).all() and torch.isfinite(w).all()):
        raise UnsupportedModelError("activation or weight ranges hold NaN or Inf")
    dead = (a <= 0) | (w <= 0)
    s = a.pow(alpha) / w.clamp_min(MIN_SCALE).pow(1 - alpha)
    return torch.where(dead, torch.ones_like(s), s.clamp_min(min_scale))


def outlier_ratio(absmax: Tensor) -> float:
    """``max / median`` of per-channel ranges: how much one channel dominates a per-token grid."""
    med = float(absmax.median())
    return float(absmax.max()) / med if med > 0 else float("inf")


def apply_smoothing(prev: nn.Module, linears: Sequence[nn.Module], scales: Tensor) -> None:
    """Fold ``1 / scales`` into ``prev`` and ``scales`` into ``linears`` (see ``apply_awq_scales``)."""
    apply_awq_scales(prev, linears, scales)


def smooth_input(
    prev: nn.Module, linears: Sequence[nn.Module], act_absmax: Tensor, alpha: float = 0.5
) -> Tensor:
    """Smooth the input of ``linears`` (produced by ``prev``) in place; returns the scales.

    The weights' ranges come from the linears themselves (Linear or HF Conv1D).
    """
    if not linears:
        raise UserInputError("no linears given; pass every layer that reads prev's output")
    w_max = weight_absmax([input_matrix(lin) for lin in linears])
    s = smooth_scales(act_absmax, w_max, alpha)
    apply_smoothing(prev, linears, s)
    return s


@torch.no_grad()
def fold_is_exact(
    prev: nn.Module, linears: Sequence[nn.Module], run: Callable[[], Tensor], rtol: float = 1e-4
) -> bool:
    """Whether folding scales between ``prev`` and ``linears`` leaves ``run()`` unchanged.

    ``run`` computes something downstream of both (e.g. the decoder block on a calibration
    batch). Random scales in ``[0.5, 2]`` are folded, ``run`` is called again, and every
    parameter of ``prev`` and ``linears`` is restored bit for bit. False where the fold is
    refused (shapes, unscalable norms) or changes the result (a non-linearity in between, or
    ``prev``'s output also feeding a residual, as in post-norm BERT blocks).
    """
    if not linears:
        return False
    mods = [prev, *linears]
    saved = [(p, p.detach().clone()) for m in mods for p in m.parameters(recurse=False)]
    before = run().detach().float()
    width = input_matrix(linears[0]).shape[1]
    s = 0.5 + 1.5 * torch.rand(width, generator=torch.Generator().manual_seed(0))
    try:
        apply_awq_scales(prev, linears, s)
        after = run().detach().float()
    except UserInputError:  # includes UnsupportedModelError: the fold is not possible
        return False
    finally:
        for p, old in saved:
            p.copy_(old)
    return float((after - before).norm()) <= rtol * float(before.norm()) + 1e-12
