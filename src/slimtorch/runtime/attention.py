"""Multi-head attention with fewer heads than ``embed_dim / head_dim``: what head pruning leaves.

``nn.MultiheadAttention`` requires ``num_heads * head_dim == embed_dim``, so it cannot drop a
head. :class:`PrunedMultiheadAttention` computes the same attention with separate ``q_proj``,
``k_proj``, ``v_proj`` (``Linear(*, num_heads * head_dim)``) and ``out_proj``
(``Linear(num_heads * head_dim, embed_dim)``), with the forward signature and returns of
``nn.MultiheadAttention``. Its projections are plain ``nn.Linear``, so later stages (unstructured
pruning, quantization) find them. Importing this module registers the structured-pruning handlers
of both classes (dim ``heads``; the embedding dim is not prunable here).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtorch.core.errors import ArtifactError, UnsupportedModelError, UserInputError
from slimtorch.graph.handlers import register_handler
from slimtorch.graph.slots import Layout, Slot, SlotHandler, check_keep, num, refuse_compressed

_KEYS = ("embed_dim", "num_heads", "head_dim", "kdim", "vdim", "bias", "out_bias")
_FLAGS = ("add_bias_kv", "add_zero_attn", "batch_first")


class PrunedMultiheadAttention(nn.Module):
    """Attention over ``num_heads`` heads of ``head_dim``; ``embed_dim`` in and out."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        e, h, hd = int(cfg["embed_dim"]), int(cfg["num_heads"]), int(cfg["head_dim"])
        self.embed_dim, self.num_heads, self.head_dim = e, h, hd
        self.kdim, self.vdim = int(cfg.get("kdim", e)), int(cfg.get("vdim", e))
        self.dropout = float(cfg.get("dropout", 0.0))
        self.add_zero_attn = bool(cfg.get("add_zero_attn", False))
        self.batch_first = bool(cfg.get("batch_first", False))
        bias = bool(cfg.get("bias", True))
        self.q_proj = nn.Linear(e, h * hd, bias=bias)
        self.k_proj = nn.Linear(self.kdim, h * hd, bias=bias)
        self.v_proj = nn.Linear(self.vdim, h * hd, bias=bias)
        self.out_proj = nn.Linear(h * hd, e, bias=bool(cfg.get("out_bias", bias)))
        self.bias_k: nn.Parameter | None = None
        self.bias_v: nn.Parameter | None = None
        if cfg.get("add_bias_kv", False):
            self.bias_k = nn.Parameter(torch.zeros(1, 1, h * hd))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, h * hd))

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {k: getattr(self, k) for k in ("embed_dim", "num_heads", "head_dim")}
        cfg.update(kdim=self.kdim, vdim=self.vdim, dropout=self.dropout)
        cfg.update(bias=self.q_proj.bias is not None, out_bias=self.out_proj.bias is not None)
        cfg.update(add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn)
        cfg["batch_first"] = self.batch_first
        return cfg

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> PrunedMultiheadAttention:
        try:
            return cls(dict(cfg))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"bad PrunedMultiheadAttention config {cfg!r} ({exc}); it needs"
                f" {', '.join(_KEYS + _FLAGS)} - re-save the artifact"
            ) from None

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> PrunedMultiheadAttention:
        """The same attention as ``mha`` (all heads), same dtype, device and training mode."""
        e, h = mha.embed_dim, mha.num_heads
        cfg = {"embed_dim": e, "num_heads": h, "head_dim": e // h, "kdim": mha.kdim}
        cfg.update(vdim=mha.vdim, dropout=mha.dropout, batch_first=mha.batch_first)
        cfg.update(bias=mha.in_proj_bias is not None, out_bias=mha.out_proj.bias is not None)
        cfg.update(add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn)
        ref = mha.out_proj.weight
        new = cls(cfg).to(device=ref.device, dtype=ref.dtype).train(mha.training)
        with torch.no_grad():
            for dst, src in _mha_pairs(mha, new):
                dst.copy_(src.detach())
                dst.requires_grad_(src.requires_grad)
        return new

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, _ = query.shape
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, length, h, hd).transpose(1, 2)
        k, v = self.k_proj(key), self.v_proj(value)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(length, k.shape[1], dtype=torch.bool, device=q.device).triu(1)
        mask = _merge_masks(attn_mask, key_padding_mask, (n, h, length, k.shape[1]), q.dtype)
        extra: list[Tensor] = []
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, -1)], 1)
            v = torch.cat([v, self.bias_v.expand(n, 1, -1)], 1)
            extra.append(k)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, 1, h * hd)], 1)
            v = torch.cat([v, v.new_zeros(n, 1, h * hd)], 1)
            extra.append(k)
        if mask is not None and extra:
            mask = F.pad(mask, (0, len(extra)))
        k = k.view(n, -1, h, hd).transpose(1, 2)
        v = v.view(n, -1, h, hd).transpose(1, 2)
        scores = (q * hd**-0.5) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        attn = scores.softmax(-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = self.out_proj((attn @ v).transpose(1, 2).reshape(n, length, h * hd))
        weights = (attn.mean(1) if average_attn_weights else attn) if need_weights else None
        if not batched:
            return out.squeeze(0), weights.squeeze(0) if weights is not None else None
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _mha_pairs(mha: nn.MultiheadAttention, new: PrunedMultiheadAttention) -> list[Any]:
    """``(new parameter, the slice of mha's parameter it copies)`` pairs."""
    if mha.in_proj_weight is not None:
        ws = list(mha.in_proj_weight.chunk(3))
    else:
        ws = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
    bs = list(mha.in_proj_bias.chunk(3)) if mha.in_proj_bias is not None else [None] * 3
    pairs: list[tuple[Tensor, Any]] = []
    for lin, w, b in zip((new.q_proj, new.k_proj, new.v_proj), ws, bs, strict=True):
        pairs += [(lin.weight, w)] + ([(lin.bias, b)] if b is not None else [])
    pairs += list(zip(new.out_proj.parameters(), mha.out_proj.parameters(), strict=True))
    if new.bias_k is not None and new.bias_v is not None:
        pairs += [(new.bias_k, mha.bias_k), (new.bias_v, mha.bias_v)]
    return pairs


def _merge_masks(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, shape: tuple[int, ...], dtype: Any
) -> Tensor | None:
    """One additive float mask broadcastable to ``(N, H, L, S)`` (True in a bool mask = -inf)."""
    n, h, length, s = shape
    mask: Tensor | None = None
    for m, view in ((attn_mask, None), (key_padding_mask, (n, 1, 1, s))):
        if m is None:
            continue
        if not m.dtype.is_floating_point:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(
                m.bool(), float("-inf")
            )
        m = m.to(dtype)
        if view is not None:
            m = m.view(view)
        elif m.dim() == 3:
            if m.shape != (n * h, length, s):
                raise UserInputError(
                    f"3-D attn_mask must have shape (batch * num_heads, L, S) ="
                    f" {(n * h, length, s)} for this pruned attention ({h} heads), got"
                    f" {tuple(m.shape)}; drop the pruned heads' rows or pass a 2-D mask"
                )
            m = m.view(n, h, length, s)
        mask = m if mask is None else mask + m
    return mask


class PrunedMHAHandler(SlotHandler):
    """Dim ``heads`` of a PrunedMultiheadAttention: pruned in place."""

    layout: Layout = "last"

    def dims(self, module: nn.Module) -> dict[str, int]:
        return {"heads": num(module, "num_heads")}

    def slots(self, module: nn.Module, dim: str) -> list[Slot]:
        hd = num(module, "head_dim")
        out = [Slot(f"{p}_proj.{t}", 0, inner=hd) for p in "qkv" for t in ("weight", "bias")]
        out.append(Slot("out_proj.weight", 1, inner=hd))
        return [*out, Slot("bias_k", 2, inner=hd), Slot("bias_v", 2, inner=hd)]

    def prune(self, module: nn.Module, dim: str, keep: Tensor) -> nn.Module | None:
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            if not isinstance(module.get_submodule(name), nn.Linear):
                raise UnsupportedModelError(
                    f"PrunedMultiheadAttention.{name} is no longer an nn.Linear; prune heads"
                    " before stages that replace layers (quantization, low rank)"
                )
        return super().prune(module, dim, keep)

    def resize(self, module: nn.Module, dim: str, n: int) -> None:
        setattr(module, "num_heads", n)  # noqa: B010
        width = n * num(module, "head_dim")
        for proj in ("q_proj", "k_proj", "v_proj"):
            setattr(module.get_submodule(proj), "out_features", width)  # noqa: B010
        setattr(module.get_submodule("out_proj"), "in_features", width)  # noqa: B010


class MHAHandler(SlotHandler):
    """Dim ``heads`` of ``nn.MultiheadAttention``; pruning returns a PrunedMultiheadAttention."""

    layout: Layout = "last"

    def dims(self, module: nn.Module) -> dict[str, int]:
        return {"heads": num(module, "num_heads")}

    def slots(self, module: nn.Module, dim: str) -> list[Slot]:
        hd = num(module, "head_dim")
        names = ("in_proj_weight", "in_proj_bias")
        out = [Slot(n, 0, outer=3, inner=hd) for n in names]
        out += [Slot(f"{p}_proj_weight", 0, inner=hd) for p in "qkv"]
        out.append(Slot("out_proj.weight", 1, inner=hd))
        return [*out, Slot("bias_k", 2, inner=hd), Slot("bias_v", 2, inner=hd)]

    def prune(self, module: nn.Module, dim: str, keep: Tensor) -> nn.Module | None:
        check_keep(keep, self.size(module, dim), f"MultiheadAttention dim {dim!r}")
        refuse_compressed(module, [s.name for s, _ in self.present(module, dim)])
        new = PrunedMultiheadAttention.from_mha(module)  # type: ignore[arg-type]
        PrunedMHAHandler().prune(new, dim, keep)
        return new


register_handler("MultiheadAttention", MHAHandler())
register_handler(PrunedMultiheadAttention, PrunedMHAHandler())
