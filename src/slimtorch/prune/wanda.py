"""Wanda (Sun et al., 2023) and OWL (Yin et al., 2024): pruning by weight times input norm.

Wanda scores every weight by ``|W_ij| * ||X_j||_2`` (``X_j``: the layer's input channel ``j``
over all calibration tokens) and prunes the lowest scores of every output row (its comparison
group), or the lowest ``m - n`` of every ``m`` consecutive inputs for N:M. No weight update.

OWL gives layers with more outliers (scores above ``M`` times their layer's mean) a lower
sparsity: :func:`outlier_ratio` measures one layer (a decoder block: all its linear maps
together), :func:`owl_sparsities` turns the ratios into per-layer sparsities whose mean is the
target. The input norms come from ``slimtorch.calibrate.statistics.InputNormAccumulator``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slimtorch.core.errors import ConfigError, UnsupportedModelError, UserInputError
from slimtorch.graph.weights import from_matrix, to_matrix
from slimtorch.prune.criteria import num_pruned
from slimtorch.prune.nm import check_nm, nm_mask


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * sqrt(input_sq_norm)`` in the matrix view ``[out, in]`` (float32)."""
    mat = to_matrix(weight.detach()).to(torch.float32)
    norm = input_sq_norm.detach().to(torch.float32).flatten()
    if norm.numel() != mat.shape[1]:
        raise UserInputError(
            f"input_sq_norm has {norm.numel()} entries but the weight has {mat.shape[1]} input"
            " columns; accumulate the norms on the inputs of this very layer"
        )
    if not bool(torch.isfinite(mat).all()):
        raise UnsupportedModelError("the weight contains NaN or Inf; fix the model before pruning")
    if not bool(torch.isfinite(norm).all()) or bool((norm < 0).any()):
        raise UserInputError(
            "input_sq_norm must be finite and >= 0 (a sum of squares); check the calibration"
            " inputs for NaN/Inf"
        )
    return mat.abs() * norm.sqrt()


def wanda_mask(
    weight: torch.Tensor,
    input_sq_norm: torch.Tensor,
    sparsity: float,
    *,
    n: int = 0,
    m: int = 0,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep-mask (shape of ``weight``) pruning the lowest Wanda scores.

    Unstructured: exactly ``round(sparsity * in)`` weights of every output row (ties: earlier
    column first). N:M (``n``, ``m`` set, ``sparsity`` ignored): exactly ``m - n`` of every ``m``
    consecutive inputs. ``prior`` (True = kept) entries already pruned rank lowest and stay pruned.
    """
    scores = wanda_scores(weight, input_sq_norm)
    keep_prior = None if prior is None else to_matrix(prior.to(torch.bool))
    if n or m:
        check_nm(n, m)
        if scores.shape[1] % m:
            raise ConfigError(
                f"{n}:{m} sparsity needs the input size ({scores.shape[1]}) to be a multiple of"
                f" m={m}; ignore this layer or choose an m that divides it"
            )
        keep = nm_mask(scores, n, m, prior=keep_prior)
        return from_matrix(keep, weight.shape)
    k = num_pruned(scores.shape[1], sparsity)
    if keep_prior is not None:
        scores = scores.masked_fill(~keep_prior, -1.0)
    drop = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    keep = torch.ones_like(scores, dtype=torch.bool).scatter_(1, drop, False)
    if keep_prior is not None:
        keep &= keep_prior
    return from_matrix(keep, weight.shape)


def outlier_ratio(
    weights: Sequence[torch.Tensor],
    input_sq_norms: Sequence[torch.Tensor],
    threshold: float = 5.0,
) -> float:
    """Fraction of the Wanda scores of one layer above ``threshold`` times their mean.

    ``weights`` and ``input_sq_norms`` are the linear maps of one layer (e.g. a decoder block)
    and their input norms; the scores are pooled, as in OWL (``M`` = ``threshold``, 5 there).
    """
    if len(weights) != len(input_sq_norms) or not weights:
        raise UserInputError(
            f"outlier_ratio needs one input norm per weight, got {len(weights)} weights and"
            f" {len(input_sq_norms)} norms"
        )
    if not threshold > 0:
        raise ConfigError(f"the outlier threshold M must be > 0, got {threshold}; OWL uses 5")
    scores = torch.cat([wanda_scores(w, s).flatten() for w, s in zip(weights, input_sq_norms)])
    return float((scores > threshold * scores.mean()).to(torch.float64).mean())


def owl_sparsities(
    outlier_ratios: Sequence[float], target: float, lam: float = 0.08
) -> list[float]:
    """Per-layer sparsities: more outliers, lower sparsity; mean = ``target``, spread ``<= lam``.

    As OWL: ratios are min-max normalised onto ``[0, 2 * lam]`` and the densities ``1 - s`` are
    that shifted to mean ``1 - target``. Where this would leave ``[target - lam, target + lam]``
    (or ``[0, 1]``), values are clipped and the shift re-solved so the mean stays ``target``.
    """
    ratios = torch.tensor(list(outlier_ratios), dtype=torch.float64)
    if ratios.numel() == 0:
        raise UserInputError("owl_sparsities needs at least one layer's outlier ratio")
    if not bool(torch.isfinite(ratios).all()) or bool((ratios < 0).any()):
        raise UserInputError(f"outlier ratios must be finite and >= 0, got {list(outlier_ratios)}")
    if not 0.0 <= target < 1.0:
        raise ConfigError(f"target sparsity must be in [0, 1), got {target}; e.g. 0.5")
    if not 0.0 <= lam <= 0.5:
        raise ConfigError(f"lam (OWL's lambda) must be in [0, 0.5], got {lam}; OWL uses 0.08")
    span = ratios.max() - ratios.min()
    if float(span) == 0.0 or lam == 0.0:
        return [float(target)] * ratios.numel()
    base = -(ratios - ratios.min()) / span * (2 * lam)  # sparsity offsets: outliers lower
    lo, hi = max(0.0, target - lam), min(1.0, target + lam)

    def mean_at(shift: float) -> float:
        return float((base + shift).clamp(lo, hi).mean())

    shift = target - float(base.mean())
    raw = base + shift
    if bool(((raw < lo) | (raw > hi)).any()):  # clipping moves the mean: bisect the shift
        a, b = lo - float(base.max()), hi - float(base.min())
        for _ in range(200):
            shift = (a + b) / 2
            a, b = (shift, b) if mean_at(shift) < target else (a, shift)
    return [float(s) for s in (base + shift).clamp(lo, hi)]
