"""QuaRot's rotations applied to a Llama-family decoder (RMSNorm pre-norm blocks).

:func:`llama_parts` finds (and checks) the pieces the residual stream passes through; then

1. :func:`fold_norms`: every RMSNorm scale moves into the Linears that read it
   (``input_layernorm`` -> q/k/v, ``post_attention_layernorm`` -> gate/up, the final norm -> the
   LM head, untied from the embedding first when they share one tensor), the norms' weights
   become 1, so that ``RMSNorm(h Q) = RMSNorm(h) Q`` for any orthogonal ``Q``;
2. :func:`rotate_residual`: ``W_E <- W_E Q``; every Linear reading the residual ``W <- W Q``;
   every Linear writing it (o_proj, down_proj) ``W <- Q^T W`` (bias ``b Q``); head ``W <- W Q``;
3. :func:`rotate_heads`: per attention head, ``V_h <- V_h R`` (v_proj's rows) and o_proj's
   matching input columns ``<- R``: the values and the o_proj input lose their outliers too;
4. :func:`insert_online`: an :class:`~slimtorch.runtime.hadamard.OnlineHadamardLinear` before
   down_proj (and optionally o_proj), its Linear's weight ``W <- W T``.

Each step leaves the model's function unchanged up to float rounding (float64 arithmetic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.formats.state import get_state
from slimtorch.graph.weights import replace_module
from slimtorch.quantize.rotation import (
    fold_scale_into_inputs,
    hadamard_factor,
    hadamard_matrix,
    head_blocks,
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


@dataclass
class LlamaParts:
    embed: nn.Embedding
    blocks: list[Block]
    final_norm: nn.Module
    head: nn.Linear
    heads: int
    kv_heads: int
    head_dim: int


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


def check_rmsnorm(norm: nn.Module, name: str, width: int) -> None:
    """Refuse a norm that is not ``x / rms(x) * w`` (LayerNorm's mean, Gemma's ``1 + w``)."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (width,) or eps is None:
        raise UnsupportedModelError(f"{WHY}; {name} ({type(norm).__name__}) is no RMSNorm")
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


def _block(layer: nn.Module, name: str, width: int) -> Block:
    norms = {n for n, m in layer.named_modules() if n and "norm" in type(m).__name__.lower()}
    extra = sorted(norms - _NORMS)
    if extra:
        raise UnsupportedModelError(f"{WHY}; {name} has other norms too: {', '.join(extra)}")
    attn = {p: _plain_linear(_child(layer, f"self_attn.{p}", name), f"{name}.self_attn.{p}")
            for p in _ATTN}  # fmt: skip
    mlp = {p: _plain_linear(_child(layer, f"mlp.{p}", name), f"{name}.mlp.{p}") for p in _MLP}
    block = Block(name, _child(layer, "input_layernorm", name), attn,
                  _child(layer, "post_attention_layernorm", name), mlp)  # fmt: skip
    check_rmsnorm(block.input_norm, f"{name}.input_layernorm", width)
    check_rmsnorm(block.post_norm, f"{name}.post_attention_layernorm", width)
    return block


def llama_parts(model: nn.Module) -> LlamaParts:
    """The pieces of a Llama-family causal LM, checked; UnsupportedModelError naming what does
    not fit otherwise."""
    base = getattr(model, "model", None)
    config = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    if base is None or config is None or not isinstance(head, nn.Module):
        raise UnsupportedModelError(
            f"{WHY}; this {type(model).__name__} is not a transformers causal LM with"
            " .model.layers and .lm_head"
        )
    embed = _child(base, "embed_tokens", "the model")
    if not isinstance(embed, nn.Embedding):
        raise UnsupportedModelError(f"{WHY}; embed_tokens is a {type(embed).__name__}")
    width = embed.embedding_dim
    layers = list(_child(base, "layers", "the model").children())
    blocks = [_block(layer, f"model.layers.{i}", width) for i, layer in enumerate(layers)]
    final = _child(base, "norm", "the model")
    check_rmsnorm(final, "model.norm", width)
    heads = int(getattr(config, "num_attention_heads", 0))
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or width // max(heads, 1))
    if not blocks or heads <= 0 or heads % kv:
        raise UnsupportedModelError(f"{WHY}; its config has {heads} heads, {kv} KV heads")
    return LlamaParts(embed, blocks, final, _plain_linear(head, "lm_head"), heads, kv, head_dim)


def _set(param: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        param.copy_(value)


def untie_head(model: nn.Module, parts: LlamaParts) -> bool:
    """Give the LM head its own weight when it shares the embedding's; True if it did."""
    if parts.head.weight is not parts.embed.weight:
        return False
    parts.head.weight = nn.Parameter(parts.embed.weight.detach().clone())
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
    return True


def fold_norms(parts: LlamaParts) -> None:
    """Every RMSNorm scale into the Linears that read it; the norms' weights become 1
    (untie the head first: :func:`untie_head`)."""
    pairs = [(b.input_norm, [b.attn[p] for p in _ATTN[:3]]) for b in parts.blocks]
    pairs += [(b.post_norm, [b.mlp["gate_proj"], b.mlp["up_proj"]]) for b in parts.blocks]
    pairs.append((parts.final_norm, [parts.head]))
    for norm, linears in pairs:
        weight = norm.weight
        assert isinstance(weight, Tensor)  # checked by llama_parts
        scale = weight.detach()
        for linear in linears:
            _set(linear.weight, fold_scale_into_inputs(linear.weight.detach(), scale))
        _set(weight, torch.ones_like(scale))


def _rotate_writer(linear: nn.Linear, q: Tensor) -> None:
    bias = linear.bias.detach() if linear.bias is not None else None
    w, b = rotate_outputs(linear.weight.detach(), bias, q)
    _set(linear.weight, w)
    if b is not None and linear.bias is not None:
        _set(linear.bias, b)


def rotate_residual(parts: LlamaParts, q: Tensor) -> None:
    """The residual stream ``h -> h Q`` (norms folded first: :func:`fold_norms`)."""
    _set(parts.embed.weight, rotate_inputs(parts.embed.weight.detach(), q))
    for b in parts.blocks:
        readers = [b.attn[p] for p in _ATTN[:3]] + [b.mlp["gate_proj"], b.mlp["up_proj"]]
        for linear in readers:
            _set(linear.weight, rotate_inputs(linear.weight.detach(), q))
        _rotate_writer(b.attn["o_proj"], q)
        _rotate_writer(b.mlp["down_proj"], q)
    _set(parts.head.weight, rotate_inputs(parts.head.weight.detach(), q))


def head_rotation(head_dim: int) -> Tensor:
    """The per-head rotation: the normalised Hadamard of order ``head_dim`` (float64)."""
    return hadamard_matrix(head_dim) / math.sqrt(head_dim)


def rotate_heads(parts: LlamaParts, r: Tensor) -> None:
    """Every value head ``V_h -> V_h R``; o_proj's input columns of every head ``-> R``."""
    for b in parts.blocks:
        _rotate_writer(b.attn["v_proj"], head_blocks(r, parts.kv_heads))
        o = b.attn["o_proj"]
        _set(o.weight, rotate_inputs(o.weight.detach(), head_blocks(r, parts.heads)))


def online_factor(width: int) -> Tensor:
    """The orthonormal small factor of :class:`OnlineHadamardLinear` for ``width`` (float64)."""
    m = hadamard_factor(width)
    if m is None:
        hadamard_matrix(width)  # raises the error naming the widths that work
    assert m is not None
    return hadamard_matrix(m) / math.sqrt(m)


def insert_online(model: nn.Module, parts: LlamaParts, which: tuple[str, ...]) -> int:
    """Wrap ``down_proj`` / ``o_proj`` of every block in an online Hadamard (weights ``W T``)."""
    done = 0
    for b in parts.blocks:
        for proj in which:
            linear = b.mlp[proj] if proj in b.mlp else b.attn[proj]
            factor = online_factor(linear.in_features)
            wrapper = OnlineHadamardLinear(linear, factor)
            w = linear.weight.detach()  # W T row by row: the fast transform, in float64
            _set(linear.weight, hadamard_transform(w.double(), factor.to(w.device)).to(w.dtype))
            part = "mlp" if proj in b.mlp else "self_attn"
            replace_module(model, f"{b.name}.{part}.{proj}", wrapper)
            done += 1
    return done
