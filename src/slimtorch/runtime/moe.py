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

Other layouts (:mod:`slimtorch.runtime.moe_layouts`): gpt-oss (transposed ``[E, H, 2I]``,
gate/up interleaved, biases, a clamped SwiGLU; routed like Mixtral) and Llama 4 (transposed;
its ``Llama4TextMoe`` calls the experts with one tensor, every expert's copy of the tokens
already multiplied by the router's sigmoid score, and adds its shared expert itself). The
router and the rest of the MoE block stay the model's own; only the experts module changes.

``calibrate_all``: during calibration every expert also runs on every token (its ``nn.Linear``
hooks then see all tokens), while the layer's output still uses only the router's choice: the
model's function is unchanged, the experts the router starves get statistics too (not for
Llama 4's pre-scaled call: an unchosen expert's rows are zeros there).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.graph.weights import replace_module
from slimtorch.runtime.moe_layouts import (
    STANDARD,
    ExpertLayout,
    Part,
    checkpoint_layout,
    clamped_glu,
    fused_form,
    fused_parts,
    join_fused,
    split_fused,
)

__all__ = [
    "ExpertLayout",
    "ExpertMLP",
    "Part",
    "UnfusedExperts",
    "all_experts",
    "checkpoint_names",
    "checkpoint_parts",
    "fused_state",
    "unfuse",
    "unfuse_experts",
]

# activation names of transformers' ACT2FN that these experts use
_ACTS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``; with a clamped layout (gpt-oss)
    ``down(clamped_glu(gate(x), up(x)))``. Biases where the layout has them."""

    def __init__(
        self, hidden: int, intermediate: int, act: str, layout: ExpertLayout = STANDARD
    ) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=layout.bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=layout.bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=layout.bias)
        self.act_fn = _ACTS[act]()
        self.alpha, self.limit = layout.alpha, layout.limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.limit is not None:
            return self.down_proj(clamped_glu(gate, up, self.alpha or 1.0, self.limit))  # type: ignore[no-any-return]
        return self.down_proj(self.act_fn(gate) * up)  # type: ignore[no-any-return]


class UnfusedExperts(nn.Module):
    """transformers' fused experts module, one :class:`ExpertMLP` per expert (same outputs).
    The experts are children ``"0"``, ``"1"``, ... (not an ``nn.ModuleList``: the sequential
    pipeline takes the longest ModuleList for the model's blocks). ``layout``: how the fused
    module stored and gated them (:mod:`slimtorch.runtime.moe_layouts`), for
    :func:`fused_state`."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        act: str,
        layout: ExpertLayout = STANDARD,
    ) -> None:
        if act not in _ACTS:
            raise UnsupportedModelError(
                f"experts with activation {act!r}: slimtorch unfuses {sorted(_ACTS)} experts only"
            )
        super().__init__()
        for i in range(num_experts):
            self.add_module(str(i), ExpertMLP(hidden, intermediate, act, layout))
        self.num_experts, self.hidden, self.intermediate, self.act = (
            num_experts,
            hidden,
            intermediate,
            act,
        )
        self.layout = layout
        self.calibrate_all = False

    def experts(self) -> list[ExpertMLP]:
        return [m for m in self.children() if isinstance(m, ExpertMLP)]

    def subset(self, kept: Sequence[int]) -> UnfusedExperts:
        """The experts ``kept`` (in that order; the same modules), same layout."""
        new = UnfusedExperts(0, self.hidden, self.intermediate, self.act, self.layout)
        for i, j in enumerate(kept):
            new.add_module(str(i), self._modules[str(j)])
        new.num_experts = len(kept)
        return new

    def config(self) -> dict[str, Any]:
        layout = self.layout.config()
        return {
            "num_experts": self.num_experts,
            "hidden": self.hidden,
            "intermediate": self.intermediate,
            "act": self.act,
            **({"layout": layout} if layout else {}),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UnfusedExperts:
        return cls(
            int(config["num_experts"]),
            int(config["hidden"]),
            int(config["intermediate"]),
            str(config["act"]),
            ExpertLayout.from_config(config.get("layout")),
        )

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if top_k_index is None or top_k_weights is None:
            return self._prescaled(hidden_states)
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

    def _prescaled(self, routed: torch.Tensor) -> torch.Tensor:
        """Llama 4's call: ``routed [E * tokens, H]``, every expert's copy of the tokens
        already multiplied by its router score (0 where the router did not choose it). Each
        expert runs on its nonzero rows only (a zero row gives zero: no biases); so
        ``calibrate_all`` adds nothing here (a starved expert's statistics stay empty and the
        methods' data-free fallback applies)."""
        if self.layout.bias:
            raise UnsupportedModelError("pre-scaled expert rows with biases: not a known layout")
        rows = routed.view(self.num_experts, -1, routed.shape[-1])
        out = torch.zeros_like(rows)
        for e, expert in enumerate(self.experts()):
            (tokens,) = torch.where(rows[e].ne(0).any(-1))
            if tokens.numel():
                out[e].index_copy_(0, tokens, expert(rows[e, tokens]).to(out.dtype))
        return out.view(-1, routed.shape[-1])


def _fused_shapes(module: nn.Module) -> tuple[tuple[int, int, int], ExpertLayout] | None:
    """``((E, H, I), layout)`` of a transformers fused-experts module, None for anything else
    (:func:`~slimtorch.runtime.moe_layouts.fused_form`)."""
    return fused_form(module)


def _act_name(module: nn.Module, layout: ExpertLayout) -> str:
    if layout.limit is not None:
        return "silu"  # gpt-oss's clamped SwiGLU: g * sigmoid(alpha * g), its own act_fn-less gate
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
    form = _fused_shapes(module)
    if form is None:
        raise UnsupportedModelError(f"{type(module).__name__} has no fused 3-D expert weights")
    (e, h, i), layout = form
    new = UnfusedExperts(e, h, i, _act_name(module, layout), layout)
    fused = {k: v.detach() for k, v in module._parameters.items() if v is not None}
    new.to(dtype=fused["gate_up_proj"].dtype, device=fused["gate_up_proj"].device)
    parts = split_fused(fused, layout)
    with torch.no_grad():
        for k, expert in enumerate(new.experts()):
            for name, value in parts.items():
                expert.get_parameter(name).copy_(value[k])
    return new


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused-experts module of ``model`` by :class:`UnfusedExperts` (in place);
    the names replaced."""
    names = [n for n, m in model.named_modules() if n and _fused_shapes(m) is not None]
    for name in names:
        replace_module(model, name, unfuse(model.get_submodule(name)))
    return names


def fused_state(experts: UnfusedExperts) -> dict[str, torch.Tensor]:
    """The fused module's tensors from the experts' current (dense) weights, in the layout
    the model stored them (``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, or
    transposed, interleaved, with ``*_bias``): what transformers' fused module loads."""
    mlps = experts.experts()
    names = [n for n, _ in mlps[0].named_parameters()] if mlps else []
    stacked = {n: torch.stack([m.get_parameter(n).detach() for m in mlps]) for n in names}
    return join_fused(stacked, experts.layout)


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
_W = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}


def checkpoint_names(
    key: str, shape: Sequence[int], layout: ExpertLayout = STANDARD
) -> dict[str, Part | None]:
    """The parameters of a transformers v5 model with :class:`UnfusedExperts` (names as
    ``named_parameters`` gives them) that the checkpoint tensor ``key`` of ``shape`` holds, each
    with the part of the tensor it is (None: all of it); ``{}`` when ``key`` needs no other
    name. What transformers' conversion mapping does on load: Mixtral's ``.block_sparse_moe.``
    is ``.mlp.`` and its experts' ``w1``/``w3``/``w2`` are ``gate_proj``/``up_proj``/
    ``down_proj``; a fused ``experts.gate_up_proj`` ``[E, 2I, H]`` (``save_pretrained(...,
    save_original_format=False)``) holds every expert's gate rows then up rows, and
    ``experts.down_proj`` ``[E, H, I]`` every expert's down projection. In another ``layout``
    (:func:`~slimtorch.runtime.moe_layouts.checkpoint_layout`: Llama 4's and gpt-oss's
    transposed tensors, gpt-oss's interleaved gate/up and ``*_bias``, its Hub checkpoints'
    MXFP4 ``*_blocks`` with ``*_scales``) the parts say so."""
    name = key.replace(".block_sparse_moe.", ".mlp.")
    if m := _ORIGINAL.fullmatch(name):
        return {f"{m.group(1)}{_W[m.group(2)]}.weight": None}
    parts = fused_parts(name, shape, layout)
    if parts is not None:
        return dict(parts)
    return {name: None} if name != key else {}


def checkpoint_parts(
    shapes: Mapping[str, Sequence[int]], config: Any
) -> dict[str, tuple[str, Part | None]]:
    """Every parameter name of the unfused model that a checkpoint stores under another name
    or inside another tensor -> ``(key, part)`` (:func:`checkpoint_names`), for a checkpoint of
    tensors ``shapes`` whose config.json says ``config``; names stored as they are left out."""
    layout = checkpoint_layout(config if isinstance(config, dict) else {}, shapes)
    parts: dict[str, tuple[str, Part | None]] = {}
    for key, shape in shapes.items():
        for name, part in checkpoint_names(key, shape, layout).items():
            parts.setdefault(name, (key, part))
    return {n: kp for n, kp in parts.items() if n not in shapes}
