"""Layer handler for Hugging Face attention modules: prune whole attention heads.

An attention module is found by its structure, not by its class: query/key/value projections
(``q_proj/k_proj/v_proj``, ``query/key/value`` or ``q_lin/k_lin/v_lin``, on the module or one
level down, e.g. ``BertAttention.self.query``) and an output projection on the module
(``o_proj``, ``out_proj``, ``dense``, ``out_lin`` or ``output.dense``), all ``nn.Linear``, with
a head size the module records (``head_dim``, ``attention_head_size``, ``head_size``, or a head
count ``num_heads``/``num_attention_heads``/``n_heads``). This matches BertAttention (and
RoBERTa, ViT, ...), LlamaAttention, Qwen2/Mistral/Qwen3 (same layout), OPTAttention and
DistilBERT; BertSelfAttention alone does not match (its output projection lives beside it).

The one prunable dim is ``"heads"``: one channel is one key/value head together with the
``num_heads // num_kv_heads`` query heads that read it (grouped-query attention), so for
multi-head attention it is simply one head. The hidden size is not exposed (``dims()`` has no
``"in"``/``"out"``): the dependency graph keeps it. Pruning slices q/k/v rows and output
columns and sets the head-count attributes the forward reads (``num_heads``,
``num_attention_heads``, ``num_key_value_heads``, ``all_head_size``, ... on the instance);
``head_dim`` and ``num_key_value_groups`` do not change. The shared ``config`` object is never
touched: transformers 5 forwards read only ``config._attn_implementation`` from it at run time.

Registration is per class and needs a model to look at: :func:`register_attention_handlers`
registers :data:`ATTENTION` for every class of ``model`` that matches the structure.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.formats.state import get_state

log = logging.getLogger(__name__)

QKV_NAMES: tuple[tuple[str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("q_lin", "k_lin", "v_lin"),
)
OUT_NAMES: tuple[str, ...] = ("o_proj", "out_proj", "dense", "out_lin", "output.dense")
HEAD_DIM_ATTRS: tuple[str, ...] = ("head_dim", "attention_head_size", "head_size")
NUM_HEADS_ATTRS: tuple[str, ...] = ("num_heads", "num_attention_heads", "n_heads", "n_head")
NUM_KV_ATTRS: tuple[str, ...] = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
WIDTH_ATTRS: tuple[str, ...] = ("all_head_size", "inner_dim")


@dataclass(frozen=True)
class AttentionParts:
    """The pieces of one attention module. ``core`` holds q/k/v and the head attributes."""

    core: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    head_dim: int
    num_heads: int  # query heads
    num_kv: int  # key/value heads (== num_heads without grouped-query attention)

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv


def _at(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        found = module._modules.get(part)
        if found is None:
            return None
        module = found
    return module


def _int_attr(module: nn.Module, names: Iterable[str]) -> int | None:
    for name in names:
        value = module.__dict__.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _qkv(module: nn.Module) -> tuple[nn.Module, nn.Linear, nn.Linear, nn.Linear] | None:
    for core in (module, *module.children()):
        for names in QKV_NAMES:
            q, k, v = (core._modules.get(n) for n in names)
            if isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(v, nn.Linear):
                return core, q, k, v
    return None


def _out(module: nn.Module, width: int) -> tuple[nn.Linear, nn.Module] | None:
    """The output projection (input ``width``) and the module that owns it."""
    for path in OUT_NAMES:
        o = _at(module, path)
        if isinstance(o, nn.Linear) and o.in_features == width:
            owner = _at(module, path.rpartition(".")[0]) if "." in path else module
            return o, owner if owner is not None else module
    return None


def _extra_params_ok(module: nn.Module, parts: AttentionParts, o_owner: nn.Module) -> bool:
    """Parameters besides q/k/v/o must not depend on the heads: per-head-dim norms (Qwen3's
    q_norm) or modules after the output projection (BERT's output.LayerNorm) are fine."""
    linears = {id(m) for m in (parts.q, parts.k, parts.v, parts.o)}
    after_o = {id(p) for p in o_owner.parameters()} if o_owner is not module else set()
    for sub in module.modules():
        if id(sub) in linears:
            continue
        for p in sub.parameters(recurse=False):
            if id(p) not in after_o and p.numel() != parts.head_dim:
                return False
    return True


def find_attention(module: nn.Module) -> AttentionParts | None:
    """The attention pieces of ``module``, or None when it is not a supported attention module."""
    qkv = _qkv(module)
    if qkv is None:
        return None
    core, q, k, v = qkv
    out = _out(module, q.out_features)
    if out is None:
        return None
    o, o_owner = out
    head_dim = _int_attr(core, HEAD_DIM_ATTRS)
    if head_dim is None:
        heads = _int_attr(core, NUM_HEADS_ATTRS)
        if heads is None or q.out_features % heads:
            return None
        head_dim = q.out_features // heads
    if q.out_features % head_dim or k.out_features % head_dim or v.out_features != k.out_features:
        return None
    num_heads, num_kv = q.out_features // head_dim, k.out_features // head_dim
    if num_kv == 0 or num_heads % num_kv:
        return None
    groups = _int_attr(core, ("num_key_value_groups",))
    if groups is not None and groups != num_heads // num_kv:
        return None
    parts = AttentionParts(core, q, k, v, o, head_dim, num_heads, num_kv)
    return parts if _extra_params_ok(module, parts, o_owner) else None


def head_index(keep: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of heads ``keep`` in a projection whose heads are ``width`` rows each."""
    offsets = torch.arange(width, dtype=torch.int64, device=keep.device)
    return (keep.to(torch.int64)[:, None] * width + offsets).reshape(-1)


def check_keep(keep: torch.Tensor, size: int) -> torch.Tensor:
    """``keep`` as int64 indices into ``size`` heads: 1-D, unique, in range, not empty."""
    if keep.dim() != 1 or keep.dtype.is_floating_point or keep.dtype == torch.bool:
        raise ConfigError(f"keep must be a 1-D integer tensor of head indices, got {keep}")
    if keep.numel() == 0:
        raise ConfigError(
            "cannot remove every head of an attention layer; keep at least one (lower the ratio)"
        )
    keep = keep.to(torch.int64)
    if int(keep.min()) < 0 or int(keep.max()) >= size or keep.unique().numel() != keep.numel():
        raise ConfigError(f"keep must hold unique head indices in [0, {size}), got {keep.tolist()}")
    return keep


def _parts(module: nn.Module) -> AttentionParts:
    parts = find_attention(module)
    if parts is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} is not an attention module slimtorch can prune (it needs"
            " q/k/v and output nn.Linear projections and a head size); register a handler for it"
            " with slimtorch.graph.handlers.register_handler"
        )
    return parts


def _views(parts: AttentionParts, grad: bool) -> list[tuple[torch.Tensor | None, int]]:
    nkv, qw = parts.num_kv, parts.groups * parts.head_dim
    shapes: list[tuple[torch.Tensor, tuple[int, ...], int]] = []
    for lin, width in ((parts.q, qw), (parts.k, parts.head_dim), (parts.v, parts.head_dim)):
        shapes.append((lin.weight, (nkv, width, lin.in_features), 0))
        if lin.bias is not None:
            shapes.append((lin.bias, (nkv, width), 0))
    shapes.append((parts.o.weight, (parts.o.out_features, nkv, qw), 1))
    out: list[tuple[torch.Tensor | None, int]] = []
    for p, shape, axis in shapes:
        t = p.grad if grad else p
        out.append((None if t is None else t.detach().reshape(shape), axis))
    return out


def _refuse_states(parts: AttentionParts) -> None:
    for lin in (parts.q, parts.k, parts.v, parts.o):
        for name in ("weight", "bias"):
            if get_state(lin, name) is not None:
                raise UnsupportedModelError(
                    f"the {name} of an attention projection ({type(parts.core).__name__}) carries"
                    " a slimtorch compression state (mask or quantization); put structured"
                    " pruning before unstructured pruning and quantization stages in the recipe"
                )


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    w = lin.weight.detach()
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    lin.weight = nn.Parameter(w.clone(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None and rows is not None:
        b = lin.bias.detach().index_select(0, rows.to(w.device)).clone()
        lin.bias = nn.Parameter(b, requires_grad=lin.bias.requires_grad)
    lin.out_features, lin.in_features = w.shape[0], w.shape[1]


def _set_counts(modules: Iterable[nn.Module], parts: AttentionParts, kept: int) -> None:
    """Update the head counts the forward reads, where they hold the old value."""
    new = {
        NUM_HEADS_ATTRS: (parts.num_heads, kept * parts.groups),
        NUM_KV_ATTRS: (parts.num_kv, kept),
        WIDTH_ATTRS: (parts.num_heads * parts.head_dim, kept * parts.groups * parts.head_dim),
    }
    for module in modules:
        for names, (old, value) in new.items():
            for name in names:
                if module.__dict__.get(name) == old:
                    setattr(module, name, value)


class AttentionHandler:
    """:class:`slimtorch.graph.handlers.LayerHandler` for Hugging Face attention modules."""

    layout: Literal["first", "last"] = "last"

    def dims(self, module: nn.Module) -> dict[str, int]:
        return {"heads": _parts(module).num_kv}

    def coupled(self, module: nn.Module) -> bool:
        return False

    def tiles(self, module: nn.Module, dim: str) -> int:
        return 1

    def blocks(self, module: nn.Module, dim: str) -> int:
        return 1

    def weights(self, module: nn.Module, dim: str) -> list[tuple[torch.Tensor, int]]:
        _check_dim(dim)
        return [(t, axis) for t, axis in _views(_parts(module), grad=False) if t is not None]

    def grads(self, module: nn.Module, dim: str) -> list[tuple[torch.Tensor | None, int]]:
        _check_dim(dim)
        return _views(_parts(module), grad=True)

    def prune(self, module: nn.Module, dim: str, keep: torch.Tensor) -> nn.Module | None:
        _check_dim(dim)
        parts = _parts(module)
        keep = check_keep(keep, parts.num_kv)
        _refuse_states(parts)
        q_rows = head_index(keep, parts.groups * parts.head_dim)
        kv_rows = head_index(keep, parts.head_dim)
        _slice_linear(parts.q, q_rows, None)
        _slice_linear(parts.k, kv_rows, None)
        _slice_linear(parts.v, kv_rows, None)
        _slice_linear(parts.o, None, q_rows)
        _set_counts({parts.core, module}, parts, keep.numel())
        return None


def _check_dim(dim: str) -> None:
    if dim != "heads":
        raise ConfigError(f"attention modules have one prunable dim, 'heads'; got {dim!r}")


ATTENTION = AttentionHandler()


def register_attention_handlers(model: nn.Module) -> list[str]:
    """Register :data:`ATTENTION` for every class in ``model`` that is an attention module and
    has no handler yet; returns the class names registered (idempotent)."""
    from slimtorch.graph.handlers import handler_for, register_handler

    done: list[str] = []
    for module in model.modules():
        if handler_for(module) is None and find_attention(module) is not None:
            register_handler(type(module), ATTENTION)
            done.append(type(module).__name__)
            log.debug("registered the attention handler for %s", type(module).__name__)
    return done
