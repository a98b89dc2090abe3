"""Mixture-of-experts layers as one ``nn.Linear`` per expert, so that every weight method
reaches every expert.

transformers v5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, ... as
two fused 3-D parameters on one module: ``gate_up_proj [E, 2I, H]`` (gate rows first, then up)
and ``down_proj [E, H, I]``, called as ``experts(hidden, top_k_index, top_k_weights)``. A
quantizer that walks ``nn.Linear`` modules never sees them. :func:`unfuse_experts` replaces each
such module by :class:`UnfusedExperts`: the same routing arithmetic over ``E`` small
``ExpertMLP`` modules (``{i}.gate_proj``, ``{i}.up_proj``, ``{i}.down_proj``: the names of the
per-expert checkpoints vLLM and older transformers read). :func:`fused_state` gives the 3-D
tensors back for a transformers export. :func:`checkpoint_names` maps the tensors of the
checkpoint layouts transformers reads (Mixtral's original ``block_sparse_moe.experts.{i}.w1``,
per-expert ``experts.{i}.gate_proj``, fused ``experts.gate_up_proj``) to the names of the
unfused model's parameters, for the offloaded reader.

``calibrate_all``: during calibration every expert also runs on every token (its ``nn.Linear``
hooks then see all tokens), while the layer's output still uses only the router's choice: the
model's function is unchanged, the experts the router starves get statistics too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.graph.weights import replace_module

# activation names of transformers' ACT2FN that these experts use
_ACTS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = _ACTS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))  # type: ignore[no-any-return]


class UnfusedExperts(nn.Module):
    """transformers' fused experts module, one :class:`ExpertMLP` per expert (same outputs).
    The experts are children ``"0"``, ``"1"``, ... (not an ``nn.ModuleList``: the sequential
    pipeline takes the longest ModuleList for the model's blocks)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str) -> None:
        if act not in _ACTS:
            raise UnsupportedModelError(
                f"experts with activation {act!r}: slimtorch unfuses {sorted(_ACTS)} experts only"
            )
        super().__init__()
        for i in range(num_experts):
            self.add_module(str(i), ExpertMLP(hidden, intermediate, act))
        self.num_experts, self.hidden, self.intermediate, self.act = (
            num_experts,
            hidden,
            intermediate,
            act,
        )
        self.calibrate_all = False

    def experts(self) -> list[ExpertMLP]:
        return [m for m in self.children() if isinstance(m, ExpertMLP)]

    def config(self) -> dict[str, Any]:
        return {
            "num_experts": self.num_experts,
            "hidden": self.hidden,
            "intermediate": self.intermediate,
            "act": self.act,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UnfusedExperts:
        return cls(
            int(config["num_experts"]),
            int(config["hidden"]),
            int(config["intermediate"]),
            str(config["act"]),
        )

    def forward(  # type: ignore[override]
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        # [E + 1, tokens, k]: which (token, slot) pairs chose each expert (index E: none, as
        # transformers' expert-parallel sentinel)
        chosen = nn.functional.one_hot(top_k_index, self.num_experts + 1).permute(2, 0, 1)
        for e, expert in enumerate(self.experts()):
            tokens, slots = torch.where(chosen[e])
            if self.calibrate_all:
                y = expert(hidden_states)[tokens]
            elif tokens.numel() == 0:
                continue
            else:
                y = expert(hidden_states[tokens])
            y = y * top_k_weights[tokens, slots, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def _fused_shapes(module: nn.Module) -> tuple[int, int, int] | None:
    """``(E, H, I)`` of a transformers fused-experts module, None for anything else."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if not isinstance(gate_up, nn.Parameter) or not isinstance(down, nn.Parameter):
        return None
    if gate_up.dim() != 3 or down.dim() != 3:
        return None
    e, two_i, h = gate_up.shape
    if hasattr(module, "gate_up_proj_bias") or down.shape != (e, h, two_i // 2) or two_i % 2:
        raise UnsupportedModelError(
            f"{type(module).__name__}: experts stored transposed or with biases (gpt-oss,"
            " Llama 4) are not unfused by slimtorch yet; only the [E, 2I, H] / [E, H, I] layout"
            " of Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek-V3 is"
        )
    return int(e), int(h), int(two_i // 2)


def _act_name(module: nn.Module) -> str:
    act = getattr(module, "act_fn", None)
    name = type(act).__name__.lower()
    for key, cls in _ACTS.items():
        if isinstance(act, cls) or key in name:
            return "silu" if key == "swish" else key
    raise UnsupportedModelError(
        f"{type(module).__name__}: expert activation {type(act).__name__} is not one of"
        f" {sorted(_ACTS)}; slimtorch cannot unfuse these experts"
    )


def unfuse(module: nn.Module) -> UnfusedExperts:
    """The :class:`UnfusedExperts` holding the same weights as fused ``module``."""
    shapes = _fused_shapes(module)
    if shapes is None:
        raise UnsupportedModelError(f"{type(module).__name__} has no fused 3-D expert weights")
    e, h, i = shapes
    new = UnfusedExperts(e, h, i, _act_name(module))
    gate_up = getattr(module, "gate_up_proj").detach()  # noqa: B009 (a Parameter, not a method)
    down = getattr(module, "down_proj").detach()  # noqa: B009
    new.to(dtype=gate_up.dtype, device=gate_up.device)
    with torch.no_grad():
        for k, expert in enumerate(new.experts()):
            expert.gate_proj.weight.copy_(gate_up[k, :i])
            expert.up_proj.weight.copy_(gate_up[k, i:])
            expert.down_proj.weight.copy_(down[k])
    return new


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused-experts module of ``model`` by :class:`UnfusedExperts` (in place);
    the names replaced."""
    names = [n for n, m in model.named_modules() if n and _fused_shapes(m) is not None]
    for name in names:
        replace_module(model, name, unfuse(model.get_submodule(name)))
    return names


def fused_state(experts: UnfusedExperts) -> dict[str, torch.Tensor]:
    """``{"gate_up_proj": [E, 2I, H], "down_proj": [E, H, I]}`` from the experts' current
    (dense) weights: what transformers' fused module loads."""
    mlps = experts.experts()
    gate_up = torch.stack([torch.cat([x.gate_proj.weight, x.up_proj.weight]) for x in mlps])
    down = torch.stack([x.down_proj.weight for x in mlps])
    return {"gate_up_proj": gate_up.detach(), "down_proj": down.detach()}


@contextmanager
def all_experts(model: nn.Module, enabled: bool = True) -> Iterator[list[str]]:
    """Within the block, every :class:`UnfusedExperts` of ``model`` runs every expert on every
    token (statistics for all experts; the outputs are the router's)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, UnfusedExperts)]
    before = [m.calibrate_all for _, m in found]
    for _, m in found:
        m.calibrate_all = enabled
    try:
        yield [n for n, _ in found]
    finally:
        for (_, m), old in zip(found, before, strict=True):
            m.calibrate_all = old


# Mixtral's original checkpoint names: w1 = gate_proj, w2 = down_proj, w3 = up_proj
_ORIGINAL = re.compile(r"(.*\.experts\.\d+\.)w([123])\.weight")
_FUSED = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)")
_W = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}

# a part of a stored tensor: (expert, first row, end row) of a fused [E, rows, cols] tensor,
# or None for the whole tensor
Part = tuple[int, int, int] | None


def checkpoint_names(key: str, shape: Sequence[int]) -> dict[str, Part]:
    """The parameters of a transformers v5 model with :class:`UnfusedExperts` (names as
    ``named_parameters`` gives them) that the checkpoint tensor ``key`` of ``shape`` holds, each
    with the part of the tensor it is; ``{}`` when ``key`` needs no other name. What
    transformers' conversion mapping does on load: Mixtral's ``.block_sparse_moe.`` is
    ``.mlp.`` and its experts' ``w1``/``w3``/``w2`` are ``gate_proj``/``up_proj``/``down_proj``;
    a fused ``experts.gate_up_proj`` ``[E, 2I, H]`` (``save_pretrained(...,
    save_original_format=False)``) holds every expert's gate rows then up rows, and
    ``experts.down_proj`` ``[E, H, I]`` every expert's down projection."""
    name = key.replace(".block_sparse_moe.", ".mlp.")
    if m := _ORIGINAL.fullmatch(name):
        return {f"{m.group(1)}{_W[m.group(2)]}.weight": None}
    m = _FUSED.fullmatch(name)
    if m is not None and len(shape) == 3:
        experts, rows = int(shape[0]), int(shape[1])
        if m.group(2) == "down_proj":
            return {f"{m.group(1)}.{e}.down_proj.weight": (e, 0, rows) for e in range(experts)}
        if rows % 2 == 0:
            half = rows // 2
            gate = {f"{m.group(1)}.{e}.gate_proj.weight": (e, 0, half) for e in range(experts)}
            up = {f"{m.group(1)}.{e}.up_proj.weight": (e, half, rows) for e in range(experts)}
            return {**gate, **up}
    return {name: None} if name != key else {}
