"""One tensor of the merges beyond task arithmetic: DELLA, Model Stock, NuSLERP, Multi-SLERP,
Karcher, SCE, Arcee Fusion and passthrough, from a resolved :class:`MergeConfig`.

:func:`merge_extra` receives the tensors of one name in ``config.inputs`` order, already in the
merge dtype, and returns what mergekit 0.1.5's kernel returns for them (before ``out_dtype``).
"""

from __future__ import annotations

import torch

from slimtorch.merge import methods as M
from slimtorch.merge import selective as S
from slimtorch.merge import spherical as P
from slimtorch.merge.mergekit import MergeConfig

EXTRA_METHODS = frozenset(
    {"della", "della_linear", "model_stock", "nuslerp", "multislerp", "karcher", "sce",
     "arcee_fusion", "passthrough"}
)  # fmt: skip
_DELLA = {"della": M.DELLA, "della_linear": M.DELLA_LINEAR}


def _della(config: MergeConfig, name: str, xs: list[torch.Tensor], seed: int) -> torch.Tensor:
    bi = config.base_index
    assert bi is not None  # parse_config requires a base for DELLA
    rest = [inp for i, inp in enumerate(config.inputs) if i != bi]
    others = [x for i, x in enumerate(xs) if i != bi]
    options = M.TaskMergeOptions(
        sparsify="della",
        consensus=_DELLA[config.method].consensus,
        normalize=config.normalize,
        rescale=config.rescale,
        lam=config.scale,
    )
    gen = M.tensor_generator(seed, name)
    weights, dens = [i.weight for i in rest], [i.density for i in rest]
    return M.task_merge(xs[bi], others, weights, dens, options, gen, [i.epsilon for i in rest])


def merge_extra(config: MergeConfig, name: str, xs: list[torch.Tensor], seed: int) -> torch.Tensor:
    """Merge the same-named tensors ``xs`` (``config.inputs`` order) with ``config.method``."""
    method, opts, bi = config.method, config.options, config.base_index
    if method in _DELLA:
        return _della(config, name, xs, seed)
    if method == "karcher":  # every input counts, the base included (mergekit ignores it)
        return P.karcher(xs, None, int(opts.get("max_iter", 10)), float(opts.get("tol", 1e-5)))
    if method == "passthrough":
        scale = config.inputs[0].scale
        return xs[0] if scale is None else xs[0] * scale
    base = xs[bi] if bi is not None else None
    others = [x for i, x in enumerate(xs) if i != bi]
    weights = [inp.weight for i, inp in enumerate(config.inputs) if i != bi]
    if method == "nuslerp":
        row, flat = (
            bool(opts.get("nuslerp_row_wise", False)),
            bool(opts.get("nuslerp_flatten", True)),
        )
        return P.nuslerp(others, weights, base, row, flat)
    if method == "multislerp":
        norm, eps = bool(opts.get("normalize_weights", True)), float(opts.get("eps", 1e-8))
        return P.multislerp(others, weights, base, norm, eps)
    if base is None:
        raise ValueError(f"{method} needs a base model")
    if method == "model_stock":
        return S.model_stock(base, others, bool(opts.get("filter_wise", False)))
    if method == "sce":
        return S.sce(base, others, float(opts.get("select_topk", 1.0)))
    if method == "arcee_fusion":
        return S.arcee_fusion(base, others[0], M.tensor_generator(seed, name))
    raise ValueError(f"unknown merge method {method!r}")


def kernel_dtype(config: MergeConfig, dtype: torch.dtype) -> torch.dtype:
    """The dtype the method returns for inputs of ``dtype`` (arcee_fusion's mask is float32)."""
    if config.method == "arcee_fusion":
        return torch.promote_types(dtype, torch.float32)
    return dtype
