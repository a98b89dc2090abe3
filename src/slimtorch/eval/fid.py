"""Frechet distance between two sets of features (the FID of Heusel et al. 2017).

:func:`frechet_distance` is the pure maths: the squared 2-Wasserstein distance between two
Gaussians, ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``, computed in float64
with symmetric eigendecompositions (no complex square roots). :func:`feature_fid` fits the
Gaussians to feature rows ``[N, D]``; :func:`module_features` collects those rows from any module
of a model (a classifier's penultimate layer). The usual FID uses Inception-v3's pool features
of 299x299 RGB images: numbers from another feature extractor (e.g. the Fashion-MNIST classifier
builtin:lenet5-fashion) are comparable only with each other, and must say which it was.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimtorch.core.errors import UserInputError


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of feature rows ``[N, D]``."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise UserInputError(
            f"features must be [N, D] with N >= 2 rows, got shape {tuple(features.shape)}"
        )
    x = features.detach().to(torch.float64)
    mean = x.mean(dim=0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)`` (>= 0; 0 iff equal)."""
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (*mu1.shape,) * 2:
        raise UserInputError(
            f"Gaussians of different sizes: means {tuple(mu1.shape)} / {tuple(mu2.shape)},"
            f" covariances {tuple(sigma1.shape)} / {tuple(sigma2.shape)}"
        )
    m1, m2 = mu1.to(torch.float64), mu2.to(torch.float64)
    s1, s2 = sigma1.to(torch.float64), sigma2.to(torch.float64)
    root1 = _sqrt_psd(s1)
    inner = torch.linalg.eigvalsh(root1 @ s2 @ root1)  # symmetric PSD up to rounding
    cross = inner.clamp_min(0).sqrt().sum()
    value = (m1 - m2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2.0 * cross
    return max(float(value), 0.0)


def feature_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets ``[N, D]``/``[M, D]``."""
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


@torch.no_grad()
def module_features(
    model: nn.Module,
    module: str,
    inputs: torch.Tensor,
    batch_size: int = 500,
    after: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Rows ``[N, D]`` of ``model.<module>``'s output on ``inputs`` (eval mode, flattened per
    row; ``after`` e.g. ``torch.relu`` when the model applies its activation functionally)."""
    target = model.get_submodule(module)
    found: list[torch.Tensor] = []
    handle = target.register_forward_hook(lambda _m, _i, out: found.append(out.flatten(1)))
    was = model.training
    model.eval()
    try:
        for start in range(0, inputs.shape[0], batch_size):
            model(inputs[start : start + batch_size])
    finally:
        handle.remove()
        model.train(was)
    rows = torch.cat(found).float()
    return after(rows) if after is not None else rows
