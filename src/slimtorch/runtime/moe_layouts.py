"""How a model stores and gates its fused experts, beside Mixtral's ``gate_up_proj [E, 2I, H]``
(gate rows, then up rows) / ``down_proj [E, H, I]`` with ``act(gate) * up``:

* **transposed** (Llama 4, gpt-oss; transformers' ``is_transposed``): the experts compute
  ``x @ W``, ``gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]``;
* **interleaved** (gpt-oss; ``is_concatenated=False``): gate and up alternate along the ``2I``
  axis, gate ``[..., ::2]`` and up ``[..., 1::2]``;
* **bias** (gpt-oss; ``has_bias``): ``gate_up_proj_bias [E, 2I]`` (split as the weight) and
  ``down_proj_bias [E, H]``;
* **clamped SwiGLU** (gpt-oss's ``_apply_gate``): ``gate = min(gate, limit)``,
  ``up = clamp(up, -limit, limit)``, ``(up + 1) * gate * sigmoid(alpha * gate)``.

Pure functions: :func:`fused_form` reads a module's layout (checked against its own
``_apply_gate`` on random numbers), :func:`split_fused` / :func:`join_fused` turn the fused
tensors into per-expert Linear weights and back, :func:`fused_parts` names the part of a
checkpoint tensor each per-expert parameter is (plain, transposed, interleaved, biases, and
the MXFP4 ``*_blocks`` / ``*_scales`` of gpt-oss's Hub checkpoints, decoded by
:func:`decode_mxfp4`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.formats.floats import decode_e2m1, decode_e8m0

# experts modules whose forward takes one tensor: every expert's rows, already multiplied by
# the router's score ([E * tokens, H], Llama 4's ``routed_in``); the others take
# ``(hidden, top_k_index, top_k_weights)``
PRESCALED = {"Llama4TextExperts"}
# model types whose checkpoints interleave gate and up (transformers' is_concatenated=False)
INTERLEAVED_MODELS = {"gpt_oss"}
MXFP4_FIX = (
    "load it in transformers dequantized (quantization_config=Mxfp4Config(dequantize=True))"
    " and save_pretrained it, or compress it offloaded (--max-memory), which decodes MXFP4"
)


@dataclass(frozen=True)
class ExpertLayout:
    """How fused experts are stored (``transposed``, ``interleaved``, ``bias``) and gated
    (``limit`` set: gpt-oss's clamped SwiGLU with slope ``alpha``); module docstring."""

    transposed: bool = False
    interleaved: bool = False
    bias: bool = False
    alpha: float | None = None
    limit: float | None = None

    def config(self) -> dict[str, Any]:
        """The fields that differ from Mixtral's layout (``{}`` for it)."""
        default = ExpertLayout()
        return {k: v for k, v in asdict(self).items() if v != getattr(default, k)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> ExpertLayout:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config or {}) - known)
        if unknown:
            raise UnsupportedModelError(
                f"expert layout fields {unknown} are not known to this slimtorch ({sorted(known)})"
            )
        return cls(**dict(config or {}))


STANDARD = ExpertLayout()


def clamped_glu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's gate: ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``,
    ``g = min(gate, limit)``."""
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def _halves(t: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up parts of ``t`` along dimension 1 (``[E, 2I, ...]``)."""
    if interleaved:
        return t[:, 0::2], t[:, 1::2]
    gate, up = t.chunk(2, dim=1)
    return gate, up


def _merge(gate: torch.Tensor, up: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Inverse of :func:`_halves`: ``[E, I, ...]`` twice -> ``[E, 2I, ...]``."""
    if interleaved:
        return torch.stack([gate, up], dim=2).flatten(1, 2)
    return torch.cat([gate, up], dim=1)


def split_fused(fused: Mapping[str, torch.Tensor], layout: ExpertLayout) -> dict[str, torch.Tensor]:
    """``gate_up_proj``, ``down_proj`` (and ``gate_up_proj_bias``, ``down_proj_bias``) of the
    fused module -> every expert's Linear tensors stacked: ``gate_proj.weight`` and
    ``up_proj.weight`` ``[E, I, H]``, ``down_proj.weight`` ``[E, H, I]`` (and the ``.bias``
    ``[E, I]`` / ``[E, H]``)."""
    gate_up, down = fused["gate_up_proj"], fused["down_proj"]
    if layout.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    gate, up = _halves(gate_up, layout.interleaved)
    out = {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down}
    if layout.bias:
        gate_b, up_b = _halves(fused["gate_up_proj_bias"], layout.interleaved)
        out |= {"gate_proj.bias": gate_b, "up_proj.bias": up_b}
        out["down_proj.bias"] = fused["down_proj_bias"]
    return out


def join_fused(parts: Mapping[str, torch.Tensor], layout: ExpertLayout) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_fused`: the fused module's tensors, contiguous."""
    gate_up = _merge(parts["gate_proj.weight"], parts["up_proj.weight"], layout.interleaved)
    down = parts["down_proj.weight"]
    if layout.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    out = {"gate_up_proj": gate_up.contiguous(), "down_proj": down.contiguous()}
    if layout.bias:
        bias = _merge(parts["gate_proj.bias"], parts["up_proj.bias"], layout.interleaved)
        out |= {"gate_up_proj_bias": bias.contiguous()}
        out["down_proj_bias"] = parts["down_proj.bias"].contiguous()
    return out


def _transposed(module: nn.Module, gate_up: torch.Size, down: torch.Size) -> bool:
    """Whether the experts compute ``x @ W`` (``[E, H, 2I]`` / ``[E, I, H]``), from the shapes
    (never both readings: that would need ``I = 0``) and transformers' ``is_transposed``."""
    e, a, b = gate_up
    plain = down == (e, b, a // 2) and a % 2 == 0
    flipped = down == (e, b // 2, a) and b % 2 == 0
    flag = getattr(module, "is_transposed", None)
    if plain == flipped or (isinstance(flag, bool) and flag != flipped):
        raise UnsupportedModelError(
            f"{type(module).__name__}: fused experts gate_up_proj {tuple(gate_up)} / down_proj"
            f" {tuple(down)} are neither [E, 2I, H] / [E, H, I] nor transposed [E, H, 2I] /"
            " [E, I, H]; slimtorch cannot unfuse them"
        )
    return flipped


def _gate_layout(module: nn.Module, intermediate: int) -> tuple[bool, float | None, float | None]:
    """``(interleaved, alpha, limit)`` of the module's gate function: transformers' default
    ``act(gate) * up`` over concatenated halves, or a clamped SwiGLU (gpt-oss) checked against
    the module's own ``_apply_gate``."""
    gate_fn = getattr(type(module), "_apply_gate", None)
    if gate_fn is None or gate_fn.__name__ == "_default_apply_gate":
        return False, None, None
    alpha, limit = getattr(module, "alpha", None), getattr(module, "limit", None)
    interleaved = getattr(module, "is_concatenated", True) is False
    if isinstance(alpha, (int, float)) and isinstance(limit, (int, float)):
        z = 4 * torch.randn(5, 2 * intermediate, generator=torch.Generator().manual_seed(0))
        gate, up = _halves(z.T[None], interleaved)
        ours = clamped_glu(gate[0].T, up[0].T, float(alpha), float(limit))
        with torch.no_grad():
            theirs = module._apply_gate(z)  # type: ignore[operator]
        if isinstance(theirs, torch.Tensor) and torch.allclose(ours, theirs, atol=1e-6):
            return interleaved, float(alpha), float(limit)
    raise UnsupportedModelError(
        f"{type(module).__name__}: its experts' gate function (_apply_gate) is neither"
        " act(gate) * up nor gpt-oss's clamped SwiGLU; slimtorch cannot unfuse these experts"
    )


def fused_form(module: nn.Module) -> tuple[tuple[int, int, int], ExpertLayout] | None:
    """``((E, H, I), layout)`` of a transformers fused-experts module (3-D ``gate_up_proj``
    and ``down_proj`` parameters), None for any other module; UnsupportedModelError for fused
    experts slimtorch cannot run as one Linear each (naming why)."""
    gate_up = module._parameters.get("gate_up_proj")
    down = module._parameters.get("down_proj")
    if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
        return None
    name = type(module).__name__
    if not gate_up.dtype.is_floating_point:
        raise UnsupportedModelError(
            f"{name}: experts packed as {gate_up.dtype} (MXFP4 kernels) cannot be unfused; "
            + MXFP4_FIX
        )
    if getattr(module, "has_post_expert_norm", False):
        raise UnsupportedModelError(
            f"{name}: experts with a norm after each expert; slimtorch cannot unfuse them"
        )
    transposed = _transposed(module, gate_up.shape, down.shape)
    e, h = int(down.shape[0]), int(down.shape[2] if transposed else down.shape[1])
    i = int(gate_up.shape[1 + transposed]) // 2
    biases = [module._parameters.get(f"{p}_bias") for p in ("gate_up_proj", "down_proj")]
    if (biases[0] is None) != (biases[1] is None) or (
        biases[0] is not None
        and biases[1] is not None
        and (biases[0].shape != (e, 2 * i) or biases[1].shape != (e, h))
    ):
        raise UnsupportedModelError(
            f"{name}: expert biases other than gate_up_proj_bias [E, 2I] with down_proj_bias"
            " [E, H] (gpt-oss's); slimtorch cannot unfuse these experts"
        )
    interleaved, alpha, limit = _gate_layout(module, i)
    params = list(inspect.signature(type(module).forward).parameters)[1:]
    if len(params) < 3 and name not in PRESCALED:
        raise UnsupportedModelError(
            f"{name}.forward{tuple(params)}: slimtorch unfuses experts called as (hidden,"
            f" top_k_index, top_k_weights) or Llama 4's pre-scaled rows ({sorted(PRESCALED)})"
        )
    layout = ExpertLayout(transposed, interleaved, biases[0] is not None, alpha, limit)
    return (e, h, i), layout


# a part of a stored tensor: of expert ``expert`` (its 2-D matrix, transposed if
# ``transposed``, or its 1-D bias), the rows ``first:end:step``; ``scales``: the key of the E8M0
# scales of these MXFP4 blocks (decoded first)
class Part(NamedTuple):
    expert: int
    first: int
    end: int
    step: int = 1
    transposed: bool = False
    scales: str | None = None


def take_part(expert: torch.Tensor, part: Part, scales: torch.Tensor | None = None) -> torch.Tensor:
    """``part`` of one expert's stored tensor (``scales``: its MXFP4 scales, if blocks)."""
    if part.scales is not None:
        if scales is None:
            raise ValueError(f"MXFP4 blocks need their scales {part.scales!r}")
        expert = decode_mxfp4(expert, scales)
    if part.transposed:
        expert = expert.transpose(0, 1)
    return expert[part.first : part.end : part.step].contiguous()


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 ``[..., rows, G * 32]`` of MXFP4 ``blocks [..., rows, G, 16]`` (uint8, two E2M1
    codes a byte, low nibble first) and E8M0 ``scales [..., rows, G]``: what transformers'
    ``convert_moe_packed_tensors`` gives before its transpose (exact)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)}: expected"
            " [..., G, 16] and [..., G]"
        )
    b = blocks.to(torch.int64)
    codes = torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2)  # [..., G, 32]
    values = decode_e2m1(codes) * decode_e8m0(scales)[..., None]
    return values.flatten(-2)


_FUSED = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)(_bias|_blocks)?")


def fused_parts(key: str, shape: Sequence[int], layout: ExpertLayout) -> dict[str, Part] | None:
    """The per-expert parameters (``{experts}.{e}.gate_proj.weight``, ...) a fused checkpoint
    tensor ``key`` of ``shape`` holds, stored in ``layout`` (None: not a fused tensor)."""
    m = _FUSED.fullmatch(key)
    if m is None or not shape:
        return None
    experts, proj, kind = m.group(1), m.group(2), m.group(3) or ""
    e = int(shape[0])
    if kind == "_blocks":  # MXFP4: [E, out rows, G, 16], never transposed
        if len(shape) != 4:
            return None
        rows, flip = int(shape[1]), False
        scales: str | None = key.removesuffix("_blocks") + "_scales"
    elif kind == "_bias":
        if len(shape) != 2:
            return None
        rows, flip, scales = int(shape[1]), False, None
    else:
        if len(shape) != 3:
            return None
        rows, flip, scales = int(shape[2 if layout.transposed else 1]), layout.transposed, None
    leaf = "bias" if kind == "_bias" else "weight"
    if proj == "down_proj":
        return {
            f"{experts}.{i}.down_proj.{leaf}": Part(i, 0, rows, 1, flip, scales) for i in range(e)
        }
    if rows % 2:
        return None
    half = rows // 2
    if layout.interleaved:
        gate, up = (0, rows, 2), (1, rows, 2)
    else:
        gate, up = (0, half, 1), (half, rows, 1)
    out = {f"{experts}.{i}.gate_proj.{leaf}": Part(i, *gate, flip, scales) for i in range(e)}
    return out | {f"{experts}.{i}.up_proj.{leaf}": Part(i, *up, flip, scales) for i in range(e)}


def checkpoint_layout(
    config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]
) -> ExpertLayout:
    """The storage layout of a checkpoint's fused experts: interleaved for the model types
    that interleave (config.json's ``model_type``, or its ``text_config``'s), transposed where
    the first fused ``gate_up_proj`` / ``down_proj`` pair's shapes say so."""
    types = {config.get("model_type"), (config.get("text_config") or {}).get("model_type")}
    layout = ExpertLayout(interleaved=bool(types & INTERLEAVED_MODELS))
    for key, shape in shapes.items():
        m = _FUSED.fullmatch(key)
        partner = (
            shapes.get(f"{m.group(1)}.down_proj") if m and m.group(2) == "gate_up_proj" else None
        )
        if m and not m.group(3) and len(shape) == 3 and partner is not None and len(partner) == 3:
            e, a, b = (int(s) for s in shape)
            return replace(layout, transposed=tuple(partner) == (e, b // 2, a) and b % 2 == 0)
    return layout
