"""Data-whitened truncated SVD (SVD-LLM, Wang et al. 2024) and the input statistics it needs.

Plain SVD keeps the directions of largest weight energy, but a Linear layer's error that matters
is on its *outputs*, ``||(W - A B) X||_F`` over real inputs ``X [in, tokens]``. With the input
Gram matrix ``G = X X^T = S S^T`` (Cholesky), that error is ``||(W - A B) S||_F``, so the best
rank-``r`` factors are the truncated SVD of ``W S``, mapped back by ``S^-1``::

    W S = U Σ V^T      A = U_r sqrt(Σ_r)      B = sqrt(Σ_r) V_r^T S^-1

Transformer activations are very anisotropic (a few channels carry most of the energy), which is
why this beats plain SVD by a wide margin there. ``damp`` adds ``damp * mean(diag G)`` to the
diagonal before the factorization (as GPTQ does) so that directions the calibration data never
visits still keep a little weight, and ``G`` is always positive definite.

:func:`input_grams` gathers ``G`` for chosen Linear layers with forward hooks while the task's
``forward`` runs over a few calibration batches (padding positions are left out when the task
has a ``token_mask``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, UnsupportedModelError, UserInputError
from slimtorch.core.methods import Task
from slimtorch.lowrank.svd import singular_values, truncated_svd


def whitening_factor(gram: Tensor, damp: float) -> Tensor:
    """Lower-triangular ``S`` (float64) with ``S S^T = G + damp * mean(diag G) * I``."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise UnsupportedModelError(f"a Gram matrix is square, got shape {tuple(gram.shape)}")
    if not torch.isfinite(gram).all():
        raise UserInputError(
            "the calibration inputs hold NaN/Inf values; check the data and the model"
        )
    if damp <= 0:
        raise ConfigError(f"damp must be > 0, got {damp}")
    g = gram.detach().to(torch.float64)
    g = (g + g.T) / 2
    scale = float(torch.diagonal(g).mean())
    if scale <= 0.0:
        raise UserInputError(
            "the calibration inputs of a layer are all zero; give real data (--data)"
        )
    g = g + damp * scale * torch.eye(g.shape[0], dtype=torch.float64, device=g.device)
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:  # numerically indefinite despite damping: add more and retry once
        factor = torch.linalg.cholesky(g + 10 * damp * scale * torch.eye(g.shape[0], dtype=g.dtype))
    return factor


def whitened_svd(w: Tensor, gram: Tensor, rank: int, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """``(A [out, r], B [r, in])`` minimising ``||(w - A B) S||_F``, ``S S^T`` = damped ``gram``."""
    if gram.shape != (w.shape[1], w.shape[1]):
        raise UnsupportedModelError(
            f"Gram matrix {tuple(gram.shape)} does not match the weight's {w.shape[1]} inputs"
        )
    s = whitening_factor(gram, damp)
    a, b_white = truncated_svd(w.detach().to(torch.float64) @ s, rank)
    # B = B_white S^-1, i.e. solve B S = B_white (S lower triangular): S^T B^T = B_white^T
    b = torch.linalg.solve_triangular(s.T, b_white.T, upper=True).T
    return a.to(w.dtype), b.to(w.dtype)


def whitened_singular_values(w: Tensor, gram: Tensor, damp: float = 0.01) -> Tensor:
    """Singular values of ``w S`` (the spectrum an energy threshold should read)."""
    return singular_values(w.detach().to(torch.float64) @ whitening_factor(gram, damp))


def _token_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """The input as ``[tokens, in]`` rows, dropping padding positions when ``mask`` fits."""
    if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[mask.to(torch.bool)]
    return x.reshape(-1, x.shape[-1])


def input_grams(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    task: Task,
    ctx: Context,
    batches: int,
    batch_size: int,
) -> dict[str, Tensor]:
    """``{name: X^T X}`` (float64) of the inputs each Linear in ``layers`` sees on the task."""
    grams: dict[str, Tensor] = {}
    for name, module in layers.items():
        if not isinstance(module, nn.Linear):
            raise UnsupportedModelError(
                f"input statistics are gathered for nn.Linear layers, not {name!r}"
                f" ({type(module).__name__})"
            )
        grams[name] = torch.zeros(module.in_features, module.in_features, dtype=torch.float64)
    seen = dict.fromkeys(layers, 0)
    current: dict[str, Tensor | None] = {"mask": None}

    def hook_for(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            rows = _token_rows(args[0].detach(), current["mask"]).float()
            # one float32 product per batch (fast), summed across batches in float64
            grams[name].add_((rows.T @ rows).cpu().to(torch.float64))
            seen[name] += rows.shape[0]

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    token_mask = getattr(task, "token_mask", None)
    try:
        with torch.no_grad():
            for batch in task.train_batches(ctx, batches, batch_size):
                current["mask"] = token_mask(batch) if callable(token_mask) else None
                task.forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n, count in seen.items() if count == 0]
    if missing:
        raise UserInputError(
            f"the calibration data never reached {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}; these layers are not used by the task's"
            " forward pass: leave them out of `targets`"
        )
    return grams
