"""QuaRot's rotations applied to a Llama-family decoder (RMSNorm pre-norm blocks).

:func:`llama_parts` finds (and checks) the pieces the residual stream passes through: the
layers outside the blocks (:func:`outside_parts`) and each block (:func:`block_parts`). The
rotation is global (one ``Q`` of the residual width) but every piece needs only ``Q`` and its
own weights, so it is applied piece by piece, by the same functions in memory
(:func:`rotate_model`) and block by block in an offloaded run (``quantize.rotate``'s
layer-wise form):

1. per block, :func:`rotate_block`: every RMSNorm scale moves into the Linears that read it
   (``input_layernorm`` -> q/k/v, ``post_attention_layernorm`` -> gate/up), the norms' weights
   become 1, so that ``RMSNorm(h Q) = RMSNorm(h) Q`` for any orthogonal ``Q``; every Linear
   reading the residual ``W <- W Q``, every Linear writing it (o_proj, down_proj)
   ``W <- Q^T W`` (bias ``b Q``); per attention head (``heads``), ``V_h <- V_h R`` (v_proj's
   rows) and o_proj's matching input columns ``<- R``: the values lose their outliers too;
2. outside the blocks, :func:`rotate_outside`: the final norm into the LM head (untied from the
   embedding first when they share one tensor: :func:`untie_head`), ``W_E <- W_E Q``, head
   ``W <- W Q``;
3. :func:`insert_online_block`: an :class:`~slimtorch.runtime.hadamard.OnlineHadamardLinear`
   before down_proj (and optionally o_proj), its Linear's weight ``W <- W T``.

Each step leaves the model's function unchanged up to float rounding (float64 arithmetic), and
each tensor goes through the same operations in the same order on both paths: the offloaded
artifact is the in-memory one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.formats.state import get_state
from slimtorch.graph.weights import replace_module
from slimtorch.quantize.rotation import (
    RotationKind,
    fold_scale_into_inputs,
    hadamard_factor,
    hadamard_matrix,
    head_blocks,
    orthogonal,
    rotate_inputs,
    rotate_outputs,
)
from slimtorch.runtime.hadamard import OnlineHadamardLinear, hadamard_transform

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NORMS = {"input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"}
WHY = (
    "quantize.rotate applies to Llama-family decoders (Llama, Mistral, Qwen2/3, SmolLM: RMSNorm"
    " pre-norm blocks with q/k/v/o_proj and gate/up/down_proj Linears)"
)


@dataclass
class Block:
    name: str
    input_norm: nn.Module
    attn: dict[str, nn.Linear]
    post_norm: nn.Module
    mlp: dict[str, nn.Linear]
    heads: int
    kv_heads: int
    head_dim: int


@dataclass
class Outside:
    embed: nn.Embedding
    final_norm: nn.Module
    head: nn.Linear


@dataclass
class LlamaParts(Outside):
    blocks: list[Block]


@dataclass(frozen=True)
class Rotation:
    """What a rotation does, the same for every piece: ``q`` (the residual's, float64),
    ``head`` (the per-head one, None: no head rotation), ``online`` (the projections that get
    an online Hadamard: ``down_proj``, ``o_proj``)."""

    q: Tensor
    head: Tensor | None
    online: tuple[str, ...]


def make_rotation(
    width: int, head_dim: int, kind: RotationKind, seed: int, heads: bool, online: tuple[str, ...]
) -> Rotation:
    """The rotation of a model of residual ``width`` (from the seed alone: no weights)."""
    r = head_rotation(head_dim) if heads else None
    return Rotation(orthogonal(width, kind, seed), r, online)


def head_rotation(head_dim: int) -> Tensor:
    """The per-head rotation: the normalised Hadamard of order ``head_dim`` (float64)."""
    return hadamard_matrix(head_dim) / math.sqrt(head_dim)


def _child(module: nn.Module, path: str, where: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError:
        raise UnsupportedModelError(f"{WHY}; {where} has no {path!r}") from None


def _plain_linear(module: nn.Module, name: str) -> nn.Linear:
    if type(module) is not nn.Linear:
        raise UnsupportedModelError(
            f"{name} is a {type(module).__name__}, not a plain Linear: put quantize.rotate"
            " before every stage that replaces or quantizes layers"
        )
    if get_state(module, "weight") is not None:
        raise UnsupportedModelError(
            f"{name} is already quantized or pruned; a rotation would destroy its grid: put"
            " quantize.rotate first in the recipe"
        )
    return module


def check_rmsnorm(norm: nn.Module, name: str, width: int, numeric: bool = True) -> None:
    """Refuse a norm that is not ``x / rms(x) * w`` (LayerNorm's mean, Gemma's ``1 + w``);
    ``numeric=False``: its shape only (weights still on ``meta``)."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (width,) or eps is None:
        raise UnsupportedModelError(f"{WHY}; {name} ({type(norm).__name__}) is no RMSNorm")
    if not numeric:
        return
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, width, generator=gen).to(weight.device, weight.dtype) * 3 + 1
    with torch.no_grad():
        got = norm(x).double()
        x64 = x.double()
        want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + float(eps)) * weight.double()
    if float((got - want).abs().max()) > 1e-2 * float(want.abs().max()) + 1e-6:
        raise UnsupportedModelError(
            f"{WHY}; {name} ({type(norm).__name__}) does not compute x / rms(x) * weight"
        )


def _geometry(config: Any, width: int) -> tuple[int, int, int]:
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or width // max(heads, 1))
    if heads <= 0 or heads % kv:
        raise UnsupportedModelError(f"{WHY}; its config has {heads} heads, {kv} KV heads")
    return heads, kv, head_dim


def block_parts(layer: nn.Module, name: str, config: Any = None, numeric: bool = True) -> Block:
    """One decoder block's pieces, checked (``numeric=False``: structure only, for a block whose
    weights are still on ``meta``); ``config`` gives the head counts (default: its attention's
    own ``config``, as transformers' Llama-family attentions hold it)."""
    norm = _child(layer, "input_layernorm", name)
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1:
        raise UnsupportedModelError(f"{WHY}; {name}.input_layernorm has no weight vector")
    width = int(weight.shape[0])
    norms = {n for n, m in layer.named_modules() if n and "norm" in type(m).__name__.lower()}
    extra = sorted(norms - _NORMS)
    if extra:
        raise UnsupportedModelError(f"{WHY}; {name} has other norms too: {', '.join(extra)}")
    attn = {p: _plain_linear(_child(layer, f"self_attn.{p}", name), f"{name}.self_attn.{p}")
            for p in _ATTN}  # fmt: skip
    mlp = {p: _plain_linear(_child(layer, f"mlp.{p}", name), f"{name}.mlp.{p}") for p in _MLP}
    if config is None:
        config = getattr(_child(layer, "self_attn", name), "config", None)
    heads, kv, head_dim = _geometry(config, width)
    block = Block(name, norm, attn, _child(layer, "post_attention_layernorm", name), mlp,
                  heads, kv, head_dim)  # fmt: skip
    check_rmsnorm(block.input_norm, f"{name}.input_layernorm", width, numeric)
    check_rmsnorm(block.post_norm, f"{name}.post_attention_layernorm", width, numeric)
    return block


def outside_parts(model: nn.Module, numeric: bool = True) -> Outside:
    """The embedding, final norm and LM head of a Llama-family causal LM, checked."""
    base = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if base is None or getattr(model, "config", None) is None or not isinstance(head, nn.Module):
        raise UnsupportedModelError(
            f"{WHY}; this {type(model).__name__} is not a transformers causal LM with"
            " .model.layers and .lm_head"
        )
    embed = _child(base, "embed_tokens", "the model")
    if not isinstance(embed, nn.Embedding):
        raise UnsupportedModelError(f"{WHY}; embed_tokens is a {type(embed).__name__}")
    final = _child(base, "norm", "the model")
    check_rmsnorm(final, "model.norm", embed.embedding_dim, numeric)
    return Outside(embed, final, _plain_linear(head, "lm_head"))


def llama_parts(model: nn.Module, numeric: bool = True) -> LlamaParts:
    """The pieces of a Llama-family causal LM, checked; UnsupportedModelError naming what does
    not fit otherwise (``numeric=False``: structure only, weights still on ``meta``)."""
    outside = outside_parts(model, numeric)
    layers = list(_child(model.get_submodule("model"), "layers", "the model").children())
    config = getattr(model, "config", None)
    blocks = [block_parts(layer, f"model.layers.{i}", config, numeric)
              for i, layer in enumerate(layers)]  # fmt: skip
    if not blocks:
        raise UnsupportedModelError(f"{WHY}; the model has no decoder layers")
    return LlamaParts(outside.embed, outside.final_norm, outside.head, blocks)


def _set(param: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        param.copy_(value)


def untie_head(model: nn.Module, parts: Outside) -> bool:
    """Give the LM head its own weight when it shares the embedding's; True if it did."""
    if parts.head.weight is not parts.embed.weight:
        return False
    parts.head.weight = nn.Parameter(parts.embed.weight.detach().clone())
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
    return True


def _by_rows(param: Tensor, fn: Callable[[Tensor], Tensor], chunk: int = 1 << 22) -> None:
    """``param <- fn(param)`` for a row-wise ``fn``, a slice of rows at a time: the float64
    temporaries of an embedding or LM head (``W Q``) are a few MiB, not 4x the table."""
    rows = max(1, chunk // max(1, param.shape[-1]))
    with torch.no_grad():
        for part in param.detach().split(rows):
            part.copy_(fn(part))


def _fold(norm: nn.Module, linears: list[nn.Linear]) -> None:
    weight = norm.weight
    assert isinstance(weight, Tensor)  # checked by check_rmsnorm
    scale = weight.detach()
    for linear in linears:
        _by_rows(linear.weight, lambda w: fold_scale_into_inputs(w, scale))
    _set(weight, torch.ones_like(scale))


def _rotate_writer(linear: nn.Linear, q: Tensor) -> None:
    bias = linear.bias.detach() if linear.bias is not None else None
    w, b = rotate_outputs(linear.weight.detach(), bias, q)
    _set(linear.weight, w)
    if b is not None and linear.bias is not None:
        _set(linear.bias, b)


def rotate_block(block: Block, rotation: Rotation) -> None:
    """Norms folded, residual ``Q`` and (``rotation.head``) per-head rotations of one block."""
    readers = [block.attn[p] for p in _ATTN[:3]] + [block.mlp["gate_proj"], block.mlp["up_proj"]]
    _fold(block.input_norm, readers[:3])
    _fold(block.post_norm, readers[3:])
    for linear in readers:
        _by_rows(linear.weight, lambda w: rotate_inputs(w, rotation.q))
    _rotate_writer(block.attn["o_proj"], rotation.q)
    _rotate_writer(block.mlp["down_proj"], rotation.q)
    if rotation.head is not None:
        _rotate_writer(block.attn["v_proj"], head_blocks(rotation.head, block.kv_heads))
        per_head = head_blocks(rotation.head, block.heads)
        _by_rows(block.attn["o_proj"].weight, lambda w: rotate_inputs(w, per_head))


def rotate_outside(parts: Outside, q: Tensor) -> None:
    """The final norm into the LM head (untied first: :func:`untie_head`), the embedding
    ``W_E Q`` and the head ``W Q``."""
    _fold(parts.final_norm, [parts.head])
    _by_rows(parts.embed.weight, lambda w: rotate_inputs(w, q))
    _by_rows(parts.head.weight, lambda w: rotate_inputs(w, q))


def online_factor(width: int) -> Tensor:
    """The orthonormal small factor of :class:`OnlineHadamardLinear` for ``width`` (float64)."""
    m = hadamard_factor(width)
    if m is None:
        hadamard_matrix(width)  # raises the error naming the widths that work
    assert m is not None
    return hadamard_matrix(m) / math.sqrt(m)


def _online_path(block: Block, proj: str) -> tuple[nn.Linear, str]:
    return (block.mlp[proj], f"mlp.{proj}") if proj in block.mlp else (
        block.attn[proj], f"self_attn.{proj}")  # fmt: skip


def _hadamard_rows(factor: Tensor) -> Callable[[Tensor], Tensor]:
    def rows(w: Tensor) -> Tensor:  # W T in float64
        return hadamard_transform(w.double(), factor.to(w.device)).to(w.dtype)

    return rows


def insert_online_block(root: nn.Module, prefix: str, block: Block, which: tuple[str, ...]) -> int:
    """Wrap ``which`` (``down_proj`` / ``o_proj``) of ``block`` in an online Hadamard (weights
    ``W T``); the block is ``root``'s submodule ``prefix`` (``""``: ``root`` is the block)."""
    for proj in which:
        linear, path = _online_path(block, proj)
        factor = online_factor(linear.in_features)
        wrapper = OnlineHadamardLinear(linear, factor)
        _by_rows(linear.weight, _hadamard_rows(factor))  # W T: the fast transform
        replace_module(root, f"{prefix}.{path}" if prefix else path, wrapper)
    return len(which)


def online_records(model: nn.Module, which: tuple[str, ...]) -> list[dict[str, Any]]:
    """The manifest's ``modules`` entries of the online Hadamards :func:`rotate_model` inserts
    into ``model`` (which may still be on ``meta``), in the order ``named_modules`` lists them."""
    out = []
    for block in llama_parts(model, numeric=False).blocks:
        for proj in sorted(which, key=lambda p: p not in _ATTN):  # self_attn before mlp
            linear, path = _online_path(block, proj)
            config = OnlineHadamardLinear(linear, online_factor(linear.in_features)).config()
            out.append({"name": f"{block.name}.{path}", "type": "OnlineHadamardLinear",
                        "config": config})  # fmt: skip
    return out


def rotate_model(model: nn.Module, parts: LlamaParts, rotation: Rotation) -> tuple[bool, int]:
    """The whole rotation in memory; returns (head untied, online transforms inserted)."""
    untied = untie_head(model, parts)
    for block in parts.blocks:
        rotate_block(block, rotation)
    rotate_outside(parts, rotation.q)
    online = 0
    for block in parts.blocks:
        online += insert_online_block(model, block.name, block, rotation.online)
    return untied, online
