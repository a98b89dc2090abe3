"""Expert merging of mixture-of-experts layers (the idea of M-SMoE, Li et al. 2023, "Merge, then
compress", and HC-SMoE, Chen et al. 2024, "Retraining-free merging of sparse MoE via
hierarchical clustering"): the maths, pure functions over tensors.

Instead of dropping its least salient experts (:mod:`slimtorch.prune.experts`), a layer folds
each of them into the kept expert that behaves most like it on the calibration tokens, then
removes its router row. Similarity is the cosine of two experts' outputs over the same tokens
(every expert run on every calibration token): with ``Y_i`` the ``[tokens, hidden]`` outputs of
expert ``i`` flattened, ``cos(i, j) = <Y_i, Y_j> / (||Y_i|| ||Y_j||)``, from a running Gram
matrix. An expert whose best match is not similar enough (a threshold) is dropped instead: the
average of two unrelated experts serves neither's tokens. A merged expert's every parameter (gate/up/down weights, biases where present) is the
average of its group's, weighted by routing frequency (M-SMoE), saliency, or uniformly
(HC-SMoE's plain average); a group whose weights sum to 0 is averaged uniformly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slimtorch.formats.state import iter_states
from slimtorch.prune.experts import experts_to_keep


class OutputGram:
    """Running ``[E, E]`` sums of ``<f_i(x), f_j(x)>`` over calibration tokens ``x``."""

    def __init__(self, num_experts: int) -> None:
        self.gram = torch.zeros(num_experts, num_experts, dtype=torch.float64)

    def add(self, outputs: torch.Tensor) -> None:
        """``outputs [E, n, hidden]``: every expert's output for the same ``n`` tokens."""
        flat = outputs.detach().double().flatten(1)
        self.gram += (flat @ flat.T).cpu()

    def cosine(self) -> torch.Tensor:
        """``[E, E]`` cosine similarity of the experts' outputs (0 next to an all-zero expert)."""
        norms = self.gram.diagonal().clamp(min=0).sqrt()
        denom = torch.outer(norms, norms)
        return torch.where(denom > 0, self.gram / denom.clamp(min=1e-300), 0.0)


def merge_groups(
    saliency: torch.Tensor,
    similarity: torch.Tensor,
    drop: int,
    min_similarity: float | None = None,
) -> dict[int, list[int]]:
    """``kept expert -> its group`` (the kept expert first, then the experts merged into it,
    ascending): the ``drop`` least salient experts (as :func:`experts_to_keep` picks them) each
    join the kept expert of highest ``similarity`` (ties: the lower index), unless that
    similarity is not above ``min_similarity``: such an expert joins no group (it is dropped).
    Keys ascending."""
    num = saliency.numel()
    if similarity.shape != (num, num):
        raise ValueError(f"similarity of shape {tuple(similarity.shape)} for {num} experts")
    kept = experts_to_keep(saliency, drop)
    groups: dict[int, list[int]] = {k: [k] for k in kept}
    index = torch.tensor(kept)
    for j in sorted(set(range(num)) - set(kept)):
        row = similarity[j].index_select(0, index)
        best = int(torch.argmax(row))  # argmax returns the first of equal maxima
        if min_similarity is None or float(row[best]) > min_similarity:
            groups[kept[best]].append(j)
    return groups


def group_weights(weights: torch.Tensor, group: Sequence[int]) -> torch.Tensor:
    """The ``group``'s members' shares of the merged expert (sum 1): their ``weights``
    normalised, or uniform when those sum to 0. Negative weights are refused."""
    w = weights.double()[list(group)]
    if (w < 0).any() or not torch.isfinite(w).all():
        raise ValueError(f"merge weights must be finite and >= 0, got {w.tolist()}")
    total = w.sum()
    return w / total if total > 0 else torch.full_like(w, 1.0 / len(group))


def weighted_average(tensors: Sequence[torch.Tensor], shares: torch.Tensor) -> torch.Tensor:
    """``sum_i shares[i] * tensors[i]`` computed in float64, returned in ``tensors[0]``'s
    dtype (all tensors of one shape)."""
    if len(tensors) != shares.numel() or not tensors:
        raise ValueError(f"{len(tensors)} tensors for {shares.numel()} shares")
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors):
        raise ValueError(f"tensors of different shapes {[tuple(t.shape) for t in tensors]}")
    acc = torch.zeros(shape, dtype=torch.float64, device=tensors[0].device)
    for t, s in zip(tensors, shares.tolist(), strict=True):
        acc += float(s) * t.detach().double()
    return acc.to(tensors[0].dtype)


def check_mergeable(expert: nn.Module) -> None:
    """Raise ValueError unless every module of ``expert`` holding parameters is a plain
    ``nn.Linear``, none holds buffers and no weight carries a compressed state (quantization
    codes, a sparsity mask: an average of those would not be what is saved)."""
    odd = [
        f"{n or 'expert'} ({type(m).__name__})"
        for n, m in expert.named_modules()
        if (any(True for _ in m.parameters(recurse=False)) and type(m) is not nn.Linear)
        or any(True for _ in m.buffers(recurse=False))
    ]
    compressed = [f"{n}.{p}" if n else p for n, _, p, _ in iter_states(expert)]
    if odd or compressed:
        what = f"expert modules {odd} are not plain float Linears" if odd else ""
        what += f"{'; ' if odd else ''}weights {compressed} are compressed" if compressed else ""
        raise ValueError(
            f"{what}: merge experts before quantizing, pruning or adapting them (put"
            " prune.experts first in the recipe)"
        )


def merged_parameters(
    experts: Sequence[nn.Module], shares: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Every parameter of the merged expert (names as ``named_parameters`` gives them): the
    ``shares``-weighted average of the same parameter of each of ``experts`` (same structure,
    floating-point parameters only: merge before quantizing)."""
    for expert in experts:
        check_mergeable(expert)
    params = [dict(e.named_parameters()) for e in experts]
    names = list(params[0])
    for p in params[1:]:
        if list(p) != names:
            raise ValueError(f"experts with different parameters: {names} vs {list(p)}")
    out = {}
    for name in names:
        tensors = [p[name] for p in params]
        if not all(t.is_floating_point() for t in tensors):
            raise ValueError(
                f"expert parameter {name} is not floating point: merge experts before quantizing"
            )
        out[name] = weighted_average(tensors, shares)
    return out
