"""AWQ (Lin et al. 2024): activation-aware per-input-channel scales and weight clipping.

A linear ``y = x W^T`` is unchanged by ``y = (x / s) (W * s)^T``; quantizing ``W * s`` instead of
``W`` protects the input channels with large activations. :func:`awq_search_scales` picks
``s = mean|x|^a / mean|W_norm|^(1-a)`` (or ``mean|x|^a`` without duo scaling) over a grid of
``a`` in ``[0, 1)``, minimising ``||x W^T - x (Q(W * s) / s)^T||^2`` summed over the linears
sharing the input (``a = 0`` is plain round-to-nearest, so the search never does worse on its
calibration data). :func:`awq_clip` then shrinks each group's range ``[-m, m]`` by factors in
``(1 - max_shrink, 1]`` to minimise the same output error group by group.
:func:`apply_awq_scales` folds ``1 / s`` into the op producing the input (a LayerNorm/RMSNorm
weight and bias, or a previous Linear's output rows) and ``s`` into the linears' input columns.

The output error is computed from the Gram matrix ``x^T x`` when there are more tokens than input
features (exact and cheaper), else directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from slimtorch.core.errors import ConfigError, UnsupportedModelError, UserInputError
from slimtorch.formats.state import get_state
from slimtorch.quantize.observers import observe
from slimtorch.quantize.primitives import QuantSpec, block_size, fake_quantize_blocks, to_blocks

log = logging.getLogger(__name__)

BlockFn = Callable[[list[Tensor]], Tensor]
_ROW_CHUNK = 256


def fake_quant_matrix(m: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize-dequantize the matrix ``m`` ``[out, in]`` with ``spec`` (its observer)."""
    blocks = to_blocks(m, spec)
    lo, hi = observe(blocks, spec)
    q = fake_quantize_blocks(blocks, lo, hi, spec)
    return q.reshape(m.shape[0], -1)[:, : m.shape[1]]


def _check_inputs(weights: Sequence[Tensor], x: Tensor) -> Tensor:
    """``x`` as float32 ``[n, in]``; clear errors for empty, mismatched or non-finite inputs."""
    if not weights:
        raise UserInputError("no weights given; pass the linears that read this input")
    x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    if x2.shape[0] == 0:
        raise UserInputError("no calibration tokens for this linear; give calibration data")
    if not bool(torch.isfinite(x2).all()):
        raise UnsupportedModelError("calibration inputs hold NaN or Inf; check the model/data")
    for w in weights:
        if w.dim() != 2 or w.shape[1] != x2.shape[1]:
            raise UserInputError(
                f"weight of shape {tuple(w.shape)} does not read inputs of width {x2.shape[1]};"
                " pass matrices [out, in] whose in matches x's last dimension"
            )
        if not bool(torch.isfinite(w).all()):
            raise UnsupportedModelError("a weight holds NaN or Inf; fix the model first")
    return x2


def output_error(d: Tensor, x: Tensor, gram: Tensor | None) -> Tensor:
    """``||x d^T||^2`` for a weight difference ``d`` ``[out, in]`` (via ``gram = x^T x`` if given)."""
    if gram is not None:
        return ((d @ gram) * d).sum()
    return (x @ d.t()).pow(2).sum()


def _weight_absmean(weights: Sequence[Tensor], spec: QuantSpec) -> Tensor:
    """Mean over output rows of ``|W|`` normalised by its group's max ``|W|``, per input column."""
    rows = []
    for w in weights:
        blocks = to_blocks(w.abs(), spec)
        norm = blocks / blocks.amax(dim=-1, keepdim=True).clamp_min(1e-12)
        rows.append(norm.reshape(w.shape[0], -1)[:, : w.shape[1]])
    return torch.cat(rows).mean(dim=0)


def _candidate_scales(x_mean: Tensor, w_mean: Tensor | None, ratio: float) -> Tensor:
    s = x_mean.pow(ratio)
    if w_mean is not None:
        s = s / (w_mean.pow(1 - ratio) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def awq_search_scales(
    weights: Tensor | Sequence[Tensor],
    x: Tensor,
    spec: QuantSpec,
    *,
    grid: int = 20,
    duo_scaling: bool = True,
    block: BlockFn | None = None,
    rows: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """Per-input-channel scales ``[in]`` for the linears ``weights`` reading ``x`` ``[..., in]``.

    ``block``, if given, maps the list of (fake-quantized) weights to an output tensor (e.g. the
    attention module run with them); its squared error against the float weights replaces the
    linears' own output error. ``rows``, if given, holds per weight the inputs its output
    error is measured on (None: ``x``; no rows: it adds nothing): the experts of a
    mixture-of-experts layer share one scale, from all tokens ``x``, but each computes on the
    tokens routed to it.
    """
    ws = [weights] if isinstance(weights, Tensor) else list(weights)
    if grid < 1:
        raise ConfigError(f"grid={grid}; use at least 1 candidate (AWQ uses 20)")
    x2 = _check_inputs(ws, x)
    if rows is not None and len(rows) != len(ws):
        raise UserInputError(f"{len(rows)} row sets for {len(ws)} weights; give one per weight")
    ws = [w.detach().to(torch.float32) for w in ws]
    x_mean = x2.abs().mean(dim=0)
    w_mean = _weight_absmean(ws, spec) if duo_scaling else None
    seen = _loss_inputs(ws, x2, rows)
    ref = block(ws).detach() if block is not None else None
    best, best_loss, best_ratio = torch.ones_like(x_mean), float("inf"), 0.0
    for i in range(grid):
        s = _candidate_scales(x_mean, w_mean, i / grid)
        effs = [fake_quant_matrix(w * s, spec) / s for w in ws]
        if ref is not None and block is not None:
            loss = float((block(effs).detach() - ref).float().pow(2).sum())
        else:
            loss = sum(
                float(output_error(e - w, *xg)) for e, w, xg in zip(effs, ws, seen, strict=True)
            )
        if loss < best_loss:
            best, best_loss, best_ratio = s, loss, i / grid
    log.debug("awq scales: ratio %.2f, loss %.4g", best_ratio, best_loss)
    return best


def _loss_inputs(
    ws: Sequence[Tensor], x: Tensor, rows: Sequence[Tensor | None] | None
) -> list[tuple[Tensor, Tensor | None]]:
    """Per weight, the inputs of its output error and their Gram matrix ``x^T x`` (None when
    there are fewer rows than columns: then the error is computed directly); shared rows once."""
    done: dict[int, tuple[Tensor, Tensor | None]] = {}
    out = []
    for i, w in enumerate(ws):
        r = x if rows is None or rows[i] is None else rows[i]
        assert r is not None
        if id(r) not in done:
            r2 = x if r is x else _check_inputs([w], r) if r.numel() else x[:0]
            done[id(r)] = (r2, r2.t() @ r2 if r2.shape[0] > r2.shape[1] else None)
        out.append(done[id(r)])
    return out


def _clip_errors(d: Tensor, xg: Tensor, gram: Tensor | None) -> Tensor:
    """Per ``(row, group)`` output error of the difference blocks ``d`` ``[rows, G, gs]``."""
    if gram is not None:  # gram [G, gs, gs]
        return (torch.einsum("ogi,gij->ogj", d, gram) * d).sum(dim=-1)
    return torch.einsum("ngi,ogi->ogn", xg, d).pow(2).sum(dim=-1)  # xg [n, G, gs]


def awq_clip(
    weight: Tensor,
    x: Tensor,
    spec: QuantSpec,
    *,
    grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int | None = None,
) -> Tensor:
    """Per ``(out, group)`` clip value ``m`` ``[out, groups]``: quantize ``clamp(W, -m, m)``.

    Candidates are ``max|W_group| * (1 - i / grid)`` for ``i < max_shrink * grid`` (``i = 0``: no
    clipping); each group keeps the one with the least output error on ``x``. Weights whose
    granularity is not per group / per channel get one group per row.
    """
    if grid < 1 or not 0 <= max_shrink < 1:
        raise ConfigError(
            f"grid={grid}, max_shrink={max_shrink}; use grid >= 1 and 0 <= max_shrink < 1"
        )
    x2 = _check_inputs([weight], x)
    if n_sample_tokens is not None and x2.shape[0] > n_sample_tokens:
        x2 = x2[:: x2.shape[0] // n_sample_tokens][:n_sample_tokens]
    w = weight.detach().to(torch.float32)
    row_spec = (
        spec
        if spec.granularity != "per_tensor"
        else QuantSpec(spec.bits, spec.signed, spec.symmetric, "per_channel")
    )
    blocks = to_blocks(w, row_spec)  # [out, G, gs]
    xg = to_blocks(x2, row_spec).transpose(0, 1).contiguous()  # [G, n, gs]
    gs = blocks.shape[-1]
    gram = xg.transpose(1, 2) @ xg if x2.shape[0] > gs else None
    xg = xg.transpose(0, 1)  # [n, G, gs]
    org_max = blocks.abs().amax(dim=-1)
    best = org_max.clone()
    for start in range(0, w.shape[0], _ROW_CHUNK):
        wb, mb = blocks[start : start + _ROW_CHUNK], org_max[start : start + _ROW_CHUNK]
        best_err, cur = torch.full_like(mb, float("inf")), mb.clone()
        for i in range(max(1, int(max_shrink * grid))):
            m = (mb * (1 - i / grid)).unsqueeze(-1)
            clipped = torch.maximum(torch.minimum(wb, m), -m)
            q = fake_quantize_blocks(clipped, clipped.amin(-1), clipped.amax(-1), row_spec)
            err = _clip_errors(q - wb, xg, gram)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            cur = torch.where(better, m.squeeze(-1), cur)
        best[start : start + _ROW_CHUNK] = cur
    return best


def apply_awq_clip(weight: Tensor, max_val: Tensor, spec: QuantSpec) -> Tensor:
    """``weight`` ``[out, in]`` clamped to ``[-max_val, max_val]`` group by group (a new tensor)."""
    out, inp = weight.shape
    gs = block_size(spec, inp) if spec.granularity == "per_group" else inp
    if tuple(max_val.shape) != (out, -(-inp // gs)):
        raise UserInputError(
            f"max_val has shape {tuple(max_val.shape)}, expected {(out, -(-inp // gs))};"
            " pass the awq_clip result for this weight and spec"
        )
    m = max_val.to(weight.dtype).repeat_interleave(gs, dim=1)[:, :inp]
    return torch.maximum(torch.minimum(weight, m), -m)


# --- folding the scales into the model ------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2): a linear map whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D"


def input_matrix(module: nn.Module) -> Tensor:
    """The weight of a Linear or HF Conv1D as a ``[out, in]`` matrix (a view)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise UnsupportedModelError(
            f"{type(module).__name__} has no 2-D weight; AWQ/SmoothQuant scale Linear or"
            " Conv1D layers only"
        )
    return w.t() if _is_conv1d(module) else w


def _check_foldable(module: nn.Module, scales: Tensor) -> None:
    for name in ("weight", "bias"):
        state = get_state(module, name)
        if state is not None and state.quant is not None:
            raise UserInputError(
                f"{type(module).__name__}.{name} is already quantized; run AWQ/SmoothQuant"
                " scaling before any quantization stage"
            )
    if scales.dim() != 1 or not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
        raise UserInputError("scales must be a 1-D tensor of finite positive values")


def _fold_into_norm(norm: nn.Module, s: Tensor) -> None:
    """Divide a norm's weight (and bias) by ``s``; check the norm's output really scales by 1/s."""
    w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if not isinstance(w, Tensor) or w.shape != s.shape:
        raise UnsupportedModelError(
            f"{type(norm).__name__} has no per-channel weight of size {s.numel()} to fold the"
            " scales into (e.g. LayerNorm(elementwise_affine=False)); skip this input group"
        )
    saved = [t.detach().clone() for t in (w, b) if isinstance(t, Tensor)]
    z = torch.randn(8, s.numel(), generator=torch.Generator().manual_seed(0))
    z = z.to(device=w.device, dtype=w.dtype)
    before = norm(z).float()
    for t in (w, b):
        if isinstance(t, Tensor):
            t.copy_((t.float() / s).to(t.dtype))
    after = norm(z).float() * s
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2
    if float((after - before).norm()) > tol * float(before.norm()) + 1e-12:
        for t, old in zip((x for x in (w, b) if isinstance(x, Tensor)), saved, strict=True):
            t.copy_(old)
        raise UnsupportedModelError(
            f"{type(norm).__name__}'s output does not scale with its weight (it may compute"
            " with 1 + weight, as Gemma's RMSNorm does); the scales cannot be folded into it -"
            " skip this input group"
        )


def _fold_into_prev(prev: nn.Module, s: Tensor) -> None:
    w = getattr(prev, "weight", None)
    if isinstance(w, Tensor) and w.dim() == 2:
        m = input_matrix(prev)  # [out, in] view of the producer; its outputs are our inputs
        if m.shape[0] != s.numel():
            raise UserInputError(
                f"previous layer has {m.shape[0]} outputs but there are {s.numel()} scales"
            )
        m.copy_((m.float() / s[:, None]).to(m.dtype))
        bias = getattr(prev, "bias", None)
        if isinstance(bias, Tensor):
            bias.copy_((bias.float() / s).to(bias.dtype))
    elif (isinstance(w, Tensor) and w.dim() == 1) or "norm" in type(prev).__name__.lower():
        _fold_into_norm(prev, s)
    else:
        raise UnsupportedModelError(
            f"cannot fold scales into {type(prev).__name__}: it must be a norm with a weight,"
            " a Linear or a Conv1D (AWQ's scaled activations are not supported); skip it"
        )


@torch.no_grad()
def apply_awq_scales(prev: nn.Module, linears: Sequence[nn.Module], scales: Tensor) -> None:
    """Fold ``1 / scales`` into ``prev`` and ``scales`` into the input columns of ``linears``.

    ``prev`` produces the linears' common input: a LayerNorm/RMSNorm (weight and bias divided),
    or a Linear/Conv1D (output rows and bias divided). Before quantization the network computes
    the same function, provided ``prev``'s output feeds nothing but ``linears``.
    """
    if not linears:
        raise UserInputError("no linears given; pass every layer that reads prev's output")
    s = scales.detach().to(torch.float32)
    for mod in (prev, *linears):
        _check_foldable(mod, s)
    for lin in linears:
        if input_matrix(lin).shape[1] != s.numel():
            raise UserInputError(
                f"{type(lin).__name__} reads {input_matrix(lin).shape[1]} inputs but there are"
                f" {s.numel()} scales; pass the linears that share prev's output"
            )
    s = s.to(input_matrix(linears[0]).device)
    _fold_into_prev(prev, s)
    for lin in linears:
        m = input_matrix(lin)
        m.copy_((m.float() * s[None, :]).to(m.dtype))
