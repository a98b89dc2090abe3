"""Recipe stages ``merge.linear``, ``merge.slerp``, ``merge.task_arithmetic``, ``merge.ties``,
``merge.dare``: merge the model being compressed with other models of the same architecture.

The model being compressed is the base of slerp, task arithmetic, TIES and DARE, and the first
model of a linear merge; ``models`` lists the others (``builtin:NAME`` or paths, as
``slimtorch merge`` takes them). Only the tensors of modules selected by ``targets``/``ignore``
change. Pruning masks already on a weight are kept (the merged weight is masked again); quantized
weights are refused: merge before quantizing.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError
from slimtorch.core.methods import Run, register_method
from slimtorch.core.targets import Targets
from slimtorch.formats.state import apply_state, get_state
from slimtorch.merge.mergekit import MergeConfig, MergeInput
from slimtorch.merge.stream import TensorSource, check_compatible, merge_tensor, open_source

log = logging.getLogger(__name__)
SELF = "<model being compressed>"


class _ManyModels(StageConfig):
    models: list[str] = Field(min_length=1, description="other models: builtin:NAME or paths")
    weights: list[float] | None = Field(
        default=None, description="one weight per entry of `models` (default 1.0 each)"
    )

    @model_validator(mode="after")
    def _weights_match(self) -> _ManyModels:
        if self.weights is not None and len(self.weights) != len(self.models):
            raise ValueError(
                f"`weights` has {len(self.weights)} values for {len(self.models)} `models`;"
                " give one weight per model"
            )
        return self

    def others(self, density: float = 1.0) -> list[MergeInput]:
        weights = self.weights or [1.0] * len(self.models)
        return [
            MergeInput(model=m, weight=w, density=density)
            for m, w in zip(self.models, weights, strict=True)
        ]


class LinearMerge(_ManyModels):
    """Weighted average: ``(base_weight * model + sum(w_i * m_i)) / sum(weights)``."""

    base_weight: float = 1.0
    normalize: bool = True


class SlerpMerge(StageConfig):
    """Spherical interpolation from the model (t=0) to ``model`` (t=1), per tensor."""

    model: str
    t: float = Field(default=0.5, ge=0, le=1)


class TaskArithmeticMerge(_ManyModels):
    """``model + scale * sum(w_i * (m_i - model))``."""

    normalize: bool = False
    scale: float = 1.0


class TiesMerge(_ManyModels):
    """TIES: trim each task vector to its top ``density``, elect signs, disjoint mean."""

    density: float = Field(default=0.5, gt=0, le=1)
    normalize: bool = True
    scale: float = 1.0


class DareMerge(_ManyModels):
    """DARE: keep each task-vector entry with probability ``density``, rescale, sum (or TIES)."""

    density: float = Field(default=0.5, gt=0, le=1)
    consensus: bool = Field(default=False, description="TIES sign election (mergekit dare_ties)")
    rescale: Literal["density", "l1", "none"] = "density"
    normalize: bool = False
    scale: float = 1.0
    seed: int | None = Field(default=None, description="default: the run's seed")


def _selected(model: nn.Module, config: StageConfig) -> dict[str, tuple[nn.Module, str]]:
    targets = Targets.of(config.targets, config.ignore)
    found: dict[str, tuple[nn.Module, str]] = {}
    for mname, module in model.named_modules():
        if not targets.selects(mname, module):
            continue
        own = list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        )
        for pname, _ in own:
            found[f"{mname}.{pname}" if mname else pname] = (module, pname)
    if not found:
        raise targets.no_match_error(model)
    return found


def merge_into(model: nn.Module, config: MergeConfig, seed: int, only: StageConfig) -> int:
    """Merge ``config``'s inputs (``SELF`` is ``model``) into ``model`` in place; tensor count."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    infos = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    own = TensorSource(SELF, "model", infos, sd.__getitem__)
    sources: list[TensorSource] = []
    try:
        for inp in config.inputs:
            sources.append(own if inp.model == SELF else open_source(inp.model))
        check_compatible(sources, own)
        count = 0
        for name, (module, pname) in _selected(model, only).items():
            state = get_state(module, pname)
            if state is not None and state.quant is not None:
                raise ConfigError(
                    f"{name} is already quantized; put merge stages before quantization stages"
                )
            tensors = [s.read(name) for s in sources]
            merged = merge_tensor(config, name, tensors, seed)
            with torch.no_grad():
                getattr(module, pname).copy_(merged)
            if state is not None and state.mask is not None:
                apply_state(module, pname, state)
            count += all(t.is_floating_point() for t in tensors)
    finally:
        for src in sources:
            if src is not own:
                src.close()
    return count


def _run(model: nn.Module, config: MergeConfig, stage: StageConfig, seed: int) -> None:
    count = merge_into(model, config, seed, stage)
    log.info("merge.%s: merged %d tensors", config.method, count)


@register_method(
    "merge.linear",
    LinearMerge,
    "weighted average with other models",
    example={"models": ["builtin:lenet"]},
)
def merge_linear(model: nn.Module, config: LinearMerge, run: Run) -> None:
    inputs = [MergeInput(model=SELF, weight=config.base_weight), *config.others()]
    cfg = MergeConfig(method="linear", inputs=inputs, normalize=config.normalize)
    _run(model, cfg, config, run.ctx.seed)


@register_method(
    "merge.slerp",
    SlerpMerge,
    "spherical interpolation toward another model",
    example={"model": "builtin:lenet"},
)
def merge_slerp(model: nn.Module, config: SlerpMerge, run: Run) -> None:
    inputs = [MergeInput(model=SELF), MergeInput(model=config.model)]
    cfg = MergeConfig(method="slerp", inputs=inputs, base_model=SELF, t=config.t)
    _run(model, cfg, config, run.ctx.seed)


def _task(method: str, config: _ManyModels, density: float, **options: object) -> MergeConfig:
    inputs = [MergeInput(model=SELF), *config.others(density)]
    return MergeConfig(method=method, inputs=inputs, base_model=SELF, **options)  # type: ignore[arg-type]


@register_method(
    "merge.task_arithmetic",
    TaskArithmeticMerge,
    "add weighted task vectors",
    example={"models": ["builtin:lenet"]},
)
def merge_task_arithmetic(model: nn.Module, config: TaskArithmeticMerge, run: Run) -> None:
    cfg = _task("task_arithmetic", config, 1.0, normalize=config.normalize, scale=config.scale)
    _run(model, cfg, config, run.ctx.seed)


@register_method(
    "merge.ties",
    TiesMerge,
    "TIES: trim, elect sign, disjoint merge",
    example={"models": ["builtin:lenet"]},
)
def merge_ties(model: nn.Module, config: TiesMerge, run: Run) -> None:
    cfg = _task("ties", config, config.density, normalize=config.normalize, scale=config.scale)
    _run(model, cfg, config, run.ctx.seed)


@register_method(
    "merge.dare",
    DareMerge,
    "DARE: random drop and rescale of task vectors",
    example={"models": ["builtin:lenet"]},
)
def merge_dare(model: nn.Module, config: DareMerge, run: Run) -> None:
    cfg = _task(
        "dare_ties" if config.consensus else "dare_linear",
        config,
        config.density,
        normalize=config.normalize,
        scale=config.scale,
        rescale=None if config.rescale == "none" else config.rescale,
    )
    _run(model, cfg, config, run.ctx.seed if config.seed is None else config.seed)
