"""Which group size a per-group grid uses: ``group_size: auto`` and the check of explicit sizes.

``auto`` is the largest of 128, 64 and 32 that divides the input features of every targeted
layer, chosen once per model, so that one grid (one compressed-tensors config group, one
tinygemm tile) describes every layer. ``quantize.rtn`` chooses it from all its targeted layers;
the layer-wise methods (GPTQ, AWQ) from the targeted layers of the first block (decoder blocks
share their shapes) and keep it for every block. When none of the three divides every layer,
``auto`` is 32 and the layers it does not divide get a ragged last group (warned, naming them).
An explicit size that does not divide a layer keeps working (ragged last group in the artifact)
with a warning naming the layers and the fix; ``export --to compressed-tensors`` refuses them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel
from torch import nn

from slimtorch.quantize.primitives import QuantSpec

log = logging.getLogger(__name__)

AUTO_GROUP_SIZES = (128, 64, 32)
C = TypeVar("C", bound=BaseModel)
GroupSize = int | Literal["auto"]  # sizes are checked by each config (>= 1, or >= 8)
AUTO_RULE = (
    "input columns per group (per_group only), or 'auto': the largest of 128, 64, 32 that"
    " divides the input features of every targeted layer, chosen once per model"
)


def auto_group_size(in_features: Mapping[str, int]) -> int:
    """The largest of :data:`AUTO_GROUP_SIZES` dividing every value of ``in_features`` (layer
    name -> input features), else the smallest of them."""
    for size in AUTO_GROUP_SIZES:
        if all(n % size == 0 for n in in_features.values()):
            return size
    return AUTO_GROUP_SIZES[-1]


def ragged(in_features: Mapping[str, int], size: int) -> dict[str, int]:
    """The layers whose input features ``size`` does not divide (their last group is ragged);
    a layer narrower than ``size`` is one whole group and is not ragged."""
    return {n: f for n, f in in_features.items() if f > size and f % size}


def warn_ragged(stage: str, in_features: Mapping[str, int], size: int, auto: bool) -> None:
    """Warn, naming the layers and the fix, when ``size`` leaves some layer a ragged group."""
    bad = ragged(in_features, size)
    if not bad:
        return
    named = ", ".join(f"{n} ({f})" for n, f in list(bad.items())[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    fix = (
        "no size of 32 or more divides them all; give an explicit group_size that does"
        if auto
        else "use group_size: auto (the largest of 128, 64, 32 dividing every targeted layer)"
        " or a size that divides them"
    )
    log.warning(
        "%s: group size %d does not divide the input features of %s%s: their last group is"
        " ragged (stored fine in a slimtorch artifact, refused by export --to"
        " compressed-tensors); %s",
        stage, size, named, more, fix,
    )  # fmt: skip


def resolve_group_size(stage: str, requested: int | str, in_features: Mapping[str, int]) -> int:
    """The group size to use for layers ``in_features``: ``requested``, or the ``auto`` choice;
    warns about ragged layers either way."""
    auto = requested == "auto"
    size = auto_group_size(in_features) if auto else int(requested)
    if auto:
        log.info("%s: group_size auto -> %d", stage, size)
    warn_ragged(stage, in_features, size, auto)
    return size


def fix_group_size(
    config: C, stage: str, layers: Mapping[str, tuple[nn.Module, str]], first: bool
) -> C:
    """``config`` with its group size resolved against ``layers`` (a block's weight matrices,
    name -> (module, parameter)): chosen (``auto``) or checked at the first block; the returned
    config keeps that size for the other blocks."""
    options: Any = config
    if getattr(options, "granularity", "per_group") != "per_group" or not first:
        return config
    features = {
        n: int(getattr(m, p).reshape(getattr(m, p).shape[0], -1).shape[1])
        for n, (m, p) in layers.items()
    }
    size = resolve_group_size(stage, options.group_size, features)
    return config.model_copy(update={"group_size": size})


def resolved_spec(config: Any, **extra: Any) -> QuantSpec:
    """The grid of a layer-wise config (``bits``, ``symmetric``, ``granularity``,
    ``group_size``), after :func:`fix_group_size` has replaced ``auto``; ``extra`` are further
    :class:`QuantSpec` fields (``observer``, ``full_range``)."""
    per_group = config.granularity == "per_group"
    assert not per_group or config.group_size != "auto", "resolve group_size: auto first"
    return QuantSpec(
        bits=config.bits,
        signed=config.symmetric,
        symmetric=config.symmetric,
        granularity=config.granularity,
        group_size=int(config.group_size) if per_group else None,
        **extra,
    )
