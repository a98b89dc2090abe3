"""A mixture-of-experts model from dense models (mergekit-moe's maths, Mixtral output).

Every expert of every layer is a dense model's MLP; attention, norms and embeddings come from the
base model. The router of layer ``l`` has one row per expert, a unit vector saying which hidden
states should reach that expert (``gate_mode``):

- ``hidden``: the base model's hidden state entering layer ``l`` at the last position of each of
  the expert's positive prompts, averaged over prompts (minus the same for its negative prompts);
- ``hidden_avg``: the same with each prompt's states averaged over its positions;
- ``cheap_embed``: the sum of the prompts' token embeddings (every layer the same);
- ``random`` / ``uniform_random``: normal / ``U(-1/sqrt(H), 1/sqrt(H))`` draws (for training).

Each row is normalised to unit length (clamped at 1e-8). Expert weights may get Gaussian noise
(``noise_scale``) and the down projection a factor (``residual_scale``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")


@dataclass(frozen=True)
class ExpertSpec:
    """One expert: its source model and routing prompts."""

    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


def unit(v: torch.Tensor) -> torch.Tensor:
    """``v`` over its L2 norm along the last axis (clamped at 1e-8)."""
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def cheap_embedding(
    embed: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, num_layers: int
) -> torch.Tensor:
    """``(num_layers, H)``: the unit sum over prompts and positions of the token embeddings
    (padding masked), the same for every layer."""
    h = embed.float()[input_ids]  # equals one_hot(ids) @ embed: one non-zero product per sum
    summed = (h * mask.unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return unit(summed).repeat(num_layers, 1)


def hidden_summary(hidden_states: tuple[torch.Tensor, ...], average: bool) -> torch.Tensor:
    """``(num_layers, H)`` from a transformers ``output_hidden_states`` tuple (the inputs of
    every layer, the final norm's output dropped): each prompt's mean over positions
    (``average``) or its last position, then the mean over prompts."""
    states = torch.stack(hidden_states[:-1])  # (layers, batch, seq, H)
    states = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
    return states.sum(dim=1) / states.shape[1]


def random_gates(
    layers: int, experts: int, hidden: int, uniform: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """``(layers, experts, hidden)`` router rows drawn for training (not normalised)."""
    if uniform:
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((layers, experts, hidden), generator=generator) * 2 * scale - scale
    return torch.randn((layers, experts, hidden), generator=generator)


def noise_and_scale(
    weight: torch.Tensor,
    expert: ExpertSpec,
    residual: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """An expert weight with its noise added and, for the down projection, its scale."""
    if expert.noise_scale is not None:
        noise = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
        weight = weight + noise * expert.noise_scale
    if residual and expert.residual_scale is not None:
        weight = weight * expert.residual_scale
    return weight


def fused_experts(
    gates: list[torch.Tensor], ups: list[torch.Tensor], downs: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers v5 Mixtral layout: ``gate_up_proj`` ``(E, 2I, H)`` (gate rows, then up
    rows) and ``down_proj`` ``(E, H, I)``."""
    return torch.cat([torch.stack(gates), torch.stack(ups)], dim=1), torch.stack(downs)


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly dependent (condition number above ``threshold``):
    prompts too alike, so some experts will hardly be chosen."""
    return [i for i in range(gates.shape[0]) if torch.linalg.cond(gates[i].float()) > threshold]


@dataclass(frozen=True)
class MoeConfig:
    """A mergekit-moe YAML, checked."""

    base_model: str
    experts: tuple[ExpertSpec, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2


_MOE_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token",
             "shared_experts", "architecture"}  # fmt: skip
_EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale",
                "residual_scale"}  # fmt: skip


def _prompts(raw: object, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise ValueError(f"{where} must be a list of strings, got {raw!r}")
    return tuple(raw)


def _expert(raw: object, i: int) -> ExpertSpec:
    where = f"experts[{i}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("source_model"), str):
        raise ValueError(f"{where} must be a mapping with a source_model path, got {raw!r}")
    unknown = sorted(set(raw) - _EXPERT_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(_EXPERT_KEYS)}")
    scales = {k: raw.get(k) for k in ("noise_scale", "residual_scale")}
    for k, v in scales.items():
        if v is not None and not isinstance(v, int | float):
            raise ValueError(f"{where}.{k} must be a number, got {v!r}")
    return ExpertSpec(
        raw["source_model"],
        _prompts(raw.get("positive_prompts"), f"{where}.positive_prompts"),
        _prompts(raw.get("negative_prompts"), f"{where}.negative_prompts"),
        None if scales["noise_scale"] is None else float(scales["noise_scale"]),
        None if scales["residual_scale"] is None else float(scales["residual_scale"]),
    )


def parse_moe_config(data: object, allow_all_same: bool = False) -> MoeConfig:
    """Check a mergekit-moe config (a parsed YAML mapping) as mergekit does; ValueError names
    what is wrong. Mixtral output only: ``shared_experts`` are refused."""
    if not isinstance(data, dict):
        raise ValueError(f"a MoE config must be a YAML mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - _MOE_KEYS)
    if unknown:
        raise ValueError(f"unknown MoE config keys {unknown}; known: {sorted(_MOE_KEYS)}")
    if data.get("shared_experts"):
        raise ValueError(
            "shared_experts need a Qwen2-MoE/DeepSeek output; slimtorch writes Mixtral"
        )
    arch = data.get("architecture")
    if arch is not None and not "mixtral".startswith(str(arch).lower()):
        raise ValueError(f"architecture {arch!r}: slimtorch writes Mixtral MoE models only")
    if not isinstance(data.get("base_model"), str):
        raise ValueError("base_model must be the path of the model giving attention and embeddings")
    raw = data.get("experts")
    if not isinstance(raw, list) or not raw:
        raise ValueError("experts must be a non-empty list of {source_model, positive_prompts}")
    experts = tuple(_expert(e, i) for i, e in enumerate(raw))
    mode, k = data.get("gate_mode", "hidden"), data.get("experts_per_token", 2)
    if mode not in GATE_MODES:
        raise ValueError(f"gate_mode {mode!r} is not one of {', '.join(GATE_MODES)}")
    if not isinstance(k, int) or k < 1 or k > len(experts):
        raise ValueError(
            f"experts_per_token must be between 1 and the {len(experts)} experts, got {k!r}"
        )
    if mode not in ("random", "uniform_random"):
        bare = [i for i, e in enumerate(experts) if not e.positive_prompts]
        if bare:
            raise ValueError(
                f"experts {bare} have no positive_prompts (gate_mode {mode} routes by them)"
            )
        if (
            len(experts) > 1
            and len({(e.positive_prompts, e.negative_prompts) for e in experts}) == 1
        ):
            raise ValueError(
                "every expert has the same prompts: the router could not tell them apart"
            )
    if not allow_all_same and len(experts) > 1 and len({e.source_model for e in experts}) == 1:
        raise ValueError(
            "every expert is the same model: the MoE would cost more and compute the same; pass"
            " --i-understand-this-is-not-useful-without-training to build it for training"
        )
    return MoeConfig(data["base_model"], experts, mode, data.get("dtype"), k)
