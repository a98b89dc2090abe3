"""The hidden (embedding) dimension of a decoder LM: every tensor that reads or writes the residual
stream, found by structure, and cut together (Minitron's embedding-channel pruning).

The dependency graph freezes the residual stream (an RMSNorm reduces over its channels), but
an RMSNorm only couples channels through the mean of their squares: keeping ``H'`` of ``H``
channels is exact for channels that are zero everywhere once every norm's weight is multiplied
by ``sqrt(H / H')`` and its epsilon by ``H / H'`` (``rescale``), and close for channels that are
merely small. One channel ``c`` lives in: column ``c`` of the token embedding and of the output
head (tied or not), entry ``c`` of every RMSNorm weight, column ``c`` of every q/k/v and
gate/up projection, row ``c`` (and bias entry) of every o and down projection.

Supported: Llama-family decoders (Llama, Mistral, Qwen2/Qwen3, SmolLM, ...): an input embedding,
RMSNorms over the hidden size, attention modules :func:`slimtorch.graph.hf_attention.
find_attention` understands and gated MLPs (``gate_proj``/``up_proj``/``down_proj``). Anything
else holding a hidden-sized dim (LayerNorm with a bias, Gemma's ``1 + weight`` norms and scaled
embeddings, a fused projection) is refused with its name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.formats.state import get_state
from slimtorch.graph.hf_attention import find_attention
from slimtorch.graph.surgery import resized_modules

EPS_ATTRS = ("variance_epsilon", "eps")
HIDDEN_ATTRS = ("hidden_size", "embed_dim", "d_model")
_FIX = "prune.hidden supports Llama-family decoders (RMSNorm, q/k/v/o attention, gated MLP)"


@dataclass
class HiddenParts:
    """Where the ``size`` channels of the residual stream live in one model (module names)."""

    size: int
    embed: str
    head: str | None
    tied: bool
    norms: list[str] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)  # Linear inputs (columns)
    writes: list[str] = field(default_factory=list)  # Linear outputs (rows)

    @property
    def modules(self) -> list[str]:
        head = [self.head] if self.head else []
        return [self.embed, *head, *self.norms, *self.reads, *self.writes]


def _name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def _is_rms_norm(module: nn.Module, size: int) -> bool:
    w = module._parameters.get("weight")
    return (
        type(module).__name__.endswith("RMSNorm")
        and "Gemma" not in type(module).__name__
        and isinstance(w, nn.Parameter)
        and tuple(w.shape) == (size,)
        and module._parameters.get("bias") is None
        and any(isinstance(module.__dict__.get(a), float) for a in EPS_ATTRS)
    )


def _embeddings(model: nn.Module) -> tuple[str, nn.Embedding, str | None, bool]:
    get_in = getattr(model, "get_input_embeddings", None)
    embed = get_in() if callable(get_in) else None
    if not isinstance(embed, nn.Embedding):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no input token embedding (get_input_embeddings()): {_FIX}"
        )
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None and not isinstance(head, nn.Linear):
        raise UnsupportedModelError(f"the output head is a {type(head).__name__}: {_FIX}")
    embed_name = _name_of(model, embed)
    head_name = _name_of(model, head) if head is not None else None
    assert embed_name is not None
    tied = head is not None and head.weight is embed.weight
    return embed_name, embed, head_name, tied


def find_hidden(model: nn.Module) -> HiddenParts:
    """The residual-stream channels of ``model``; raises UnsupportedModelError, naming the
    module, when some tensor with a hidden-sized dim is not understood."""
    embed_name, embed, head_name, tied = _embeddings(model)
    size = embed.embedding_dim
    parts = HiddenParts(size, embed_name, head_name, tied)
    known: set[int] = {id(embed.weight)}
    if head_name is not None:
        head = model.get_submodule(head_name)
        known |= {id(p) for p in head.parameters()}
    inside: set[int] = set()  # modules owned by an attention module or an MLP
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        attn = find_attention(module)
        if attn is not None and attn.q.in_features == size and attn.o.out_features == size:
            for lin, role in ((attn.q, "r"), (attn.k, "r"), (attn.v, "r"), (attn.o, "w")):
                sub = _name_of(module, lin)
                (parts.reads if role == "r" else parts.writes).append(f"{name}.{sub}")
            inside |= {id(m) for m in module.modules()}
            known |= {id(p) for p in module.parameters()}
            continue
        mlp = [module._modules.get(n) for n in ("gate_proj", "up_proj", "down_proj")]
        if all(isinstance(m, nn.Linear) for m in mlp):
            parts.reads += [f"{name}.gate_proj", f"{name}.up_proj"]
            parts.writes.append(f"{name}.down_proj")
            inside |= {id(m) for m in module.modules()}
            known |= {id(p) for p in module.parameters()}
            continue
        if _is_rms_norm(module, size):
            parts.norms.append(name)
            known.add(id(module._parameters["weight"]))
    for pname, p in model.named_parameters():
        if id(p) not in known and size in p.shape:
            raise UnsupportedModelError(
                f"{pname} (shape {list(p.shape)}) has a dim of the hidden size {size} that"
                f" prune.hidden does not understand: {_FIX}"
            )
    if not parts.norms or not parts.reads or not parts.writes:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no RMSNorm/attention/MLP found: {_FIX}"
        )
    return parts


def _cut(module: nn.Module, pname: str, axis: int, keep: torch.Tensor) -> None:
    if get_state(module, pname) is not None:
        raise UnsupportedModelError(
            "prune.hidden found a compressed weight (mask or quantization): put it before"
            " unstructured pruning and quantization stages in the recipe"
        )
    old = module._parameters[pname]
    assert old is not None
    new = old.detach().index_select(axis, keep.to(old.device)).clone()
    setattr(module, pname, nn.Parameter(new, requires_grad=old.requires_grad))


def _get(model: nn.Module, name: str, kind: type[nn.Module]) -> Any:
    module = model.get_submodule(name)
    assert isinstance(module, kind), f"{name} is a {type(module).__name__}"
    return module


def _set_ints(module: nn.Module, names: tuple[str, ...], old: int, new: int) -> None:
    for n in names:
        if module.__dict__.get(n) == old:
            setattr(module, n, new)


def prune_hidden(
    model: nn.Module, keep: torch.Tensor, rescale: bool = True, parts: HiddenParts | None = None
) -> list[str]:
    """Keep hidden channels ``keep`` (1-D indices) everywhere; returns the modules changed.

    ``rescale``: multiply every RMSNorm weight by ``sqrt(H / H')`` and its epsilon by ``H / H'``
    so that removing all-zero channels changes nothing. ``model.config`` (when present) gets
    the new ``hidden_size`` (its ``head_dim`` and ``rms_norm_eps`` kept consistent)."""
    parts = parts or find_hidden(model)
    size = parts.size
    keep = torch.as_tensor(keep, dtype=torch.int64).flatten()
    if keep.numel() == 0 or keep.unique().numel() != keep.numel():
        raise ConfigError("prune.hidden: keep at least one hidden channel, each once")
    if int(keep.min()) < 0 or int(keep.max()) >= size:
        raise ConfigError(f"prune.hidden: kept channels must lie in [0, {size})")
    keep = torch.sort(keep).values
    new = int(keep.numel())
    factor = size / new
    embed = _get(model, parts.embed, nn.Embedding)
    _cut(embed, "weight", 1, keep)
    embed.embedding_dim = new
    if parts.head is not None:
        head = _get(model, parts.head, nn.Linear)
        if parts.tied:
            head.weight = embed.weight
        else:
            _cut(head, "weight", 1, keep)
        head.in_features = new
    for name in parts.norms:
        norm = _get(model, name, nn.Module)
        _cut(norm, "weight", 0, keep)
        if rescale:
            with torch.no_grad():
                norm.weight.mul_(math.sqrt(factor))
            for attr in EPS_ATTRS:
                if isinstance(norm.__dict__.get(attr), float):
                    setattr(norm, attr, norm.__dict__[attr] * factor)
        _set_ints(norm, ("hidden_size", "normalized_shape"), size, new)
    for name in parts.reads:
        lin = _get(model, name, nn.Linear)
        _cut(lin, "weight", 1, keep)
        lin.in_features = new
    for name in parts.writes:
        lin = _get(model, name, nn.Linear)
        _cut(lin, "weight", 0, keep)
        if lin.bias is not None:
            _cut(lin, "bias", 0, keep)
        lin.out_features = new
    for module in model.modules():
        _set_ints(module, HIDDEN_ATTRS, size, new)
    _update_config(model, size, new, factor if rescale else 1.0)
    changed = sorted({*parts.modules, *_owners(parts)})
    resized_modules(model).update(changed)
    return changed


def _owners(parts: HiddenParts) -> list[str]:
    """The modules that own the cut Linears (their ``hidden_size`` attributes changed too)."""
    return [n.rpartition(".")[0] for n in parts.reads + parts.writes if "." in n]


def _update_config(model: nn.Module, old: int, new: int, eps_factor: float) -> None:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "hidden_size", None) != old:
        return
    heads = getattr(config, "num_attention_heads", None)
    if getattr(config, "head_dim", None) is None and isinstance(heads, int):
        config.head_dim = old // heads  # the head size no longer follows hidden / heads
    config.hidden_size = new
    eps = getattr(config, "rms_norm_eps", None)
    if isinstance(eps, float):
        config.rms_norm_eps = eps * eps_factor


def hidden_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` highest-scoring hidden channels, ascending."""
    if not 0 < keep <= scores.numel():
        raise ConfigError(f"prune.hidden: cannot keep {keep} of {scores.numel()} channels")
    return torch.sort(torch.topk(scores, keep, sorted=False).indices).values
