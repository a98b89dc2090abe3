"""Expert pruning of mixture-of-experts layers (REAP: Lasby et al., 2025, "REAP the experts"):
the maths, pure functions over tensors.

An expert's saliency is the router-weighted size of its contribution, averaged over the tokens
the router sends to it: ``S_j = 1/|X_j| * sum_{x in X_j} g_j(x) * ||f_j(x)||_2``, where ``g_j``
is the (top-k, possibly renormalised) routing weight and ``f_j(x)`` the expert's output. An
expert no calibration token reached has saliency 0. The ``frequency`` criterion counts routed
tokens instead. The lowest-saliency experts of a layer are removed together with their router
rows: the remaining experts are then chosen among themselves exactly as before (the softmax
over fewer logits is renormalised over the kept ones).
"""

from __future__ import annotations

import torch


class SaliencySums:
    """Running sums of one MoE layer's per-expert ``g * ||f||`` and routed-token counts."""

    def __init__(self, num_experts: int) -> None:
        self.weighted = torch.zeros(num_experts, dtype=torch.float64)
        self.tokens = torch.zeros(num_experts, dtype=torch.float64)

    def add(self, expert: int, gate: torch.Tensor, output: torch.Tensor) -> None:
        """``gate [n]``: the routing weights of the ``n`` tokens sent to ``expert``;
        ``output [n, hidden]``: the expert's outputs for them (before the gate is applied)."""
        norms = output.detach().double().norm(dim=-1)
        self.weighted[expert] += float((gate.detach().double() * norms).sum())
        self.tokens[expert] += gate.numel()

    def saliency(self, criterion: str = "reap") -> torch.Tensor:
        """``[E]`` per-expert saliency (``reap``: mean ``g * ||f||`` over routed tokens, 0 for an
        expert no token reached; ``frequency``: the number of routed tokens)."""
        if criterion == "frequency":
            return self.tokens.clone()
        return torch.where(self.tokens > 0, self.weighted / self.tokens.clamp(min=1), 0.0)


def experts_to_keep(saliency: torch.Tensor, drop: int) -> list[int]:
    """Indices (ascending) of the experts kept after dropping the ``drop`` least salient; ties
    broken towards dropping the higher index (deterministic)."""
    num = saliency.numel()
    if not 0 <= drop < num:
        raise ValueError(f"cannot drop {drop} of {num} experts")
    order = sorted(range(num), key=lambda j: (float(saliency[j]), -j))
    return sorted(order[drop:])
