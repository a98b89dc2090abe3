"""Recipe stages for mergekit's newer methods: ``merge.della``, ``merge.model_stock``,
``merge.nuslerp``, ``merge.multislerp``, ``merge.karcher``, ``merge.sce``, ``merge.arcee_fusion``.

As in :mod:`slimtorch.merge.stages.merge`: the model being compressed is the base (for
``nuslerp``/``multislerp`` too, which then interpolate the deltas; ``karcher`` averages it with
the others), ``models`` lists the other checkpoints, ``targets``/``ignore`` pick the modules.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import nn

from slimtorch.core.config import StageConfig
from slimtorch.core.methods import Run, register_method
from slimtorch.merge.mergekit import MergeConfig, MergeInput
from slimtorch.merge.stages.merge import SELF, _ManyModels, _run


class DellaMerge(_ManyModels):
    """DELLA: keep each task-vector entry with a probability that rises with its magnitude rank
    (``density - epsilon`` .. ``density + epsilon``), rescale, then TIES (or a sum)."""

    density: float = Field(default=0.5, gt=0, lt=1)
    epsilon: float = Field(default=0.15, ge=0, lt=1)
    consensus: bool = Field(default=True, description="TIES sign election (false: della_linear)")
    normalize: bool | None = Field(default=None, description="default: true with consensus")
    rescale: bool = True
    scale: float = 1.0
    seed: int | None = Field(default=None, description="default: the run's seed")

    @model_validator(mode="after")
    def _epsilon_fits(self) -> DellaMerge:
        if not (self.density - self.epsilon > 0 and self.density + self.epsilon < 1):
            raise ValueError(
                f"density {self.density} +/- epsilon {self.epsilon} must stay inside (0, 1)"
            )
        return self


class ModelStockMerge(StageConfig):
    """Model Stock: the fine-tunes' average pulled toward the model by their deltas' angle."""

    models: list[str] = Field(min_length=2, description="two or more fine-tunes of the model")
    filter_wise: bool = Field(default=False, description="one ratio per row, not per tensor")


class NuslerpMerge(_ManyModels):
    """NuSLERP of two fine-tunes' deltas from the model, ``t = w_1 / (w_0 + w_1)``."""

    row_wise: bool = False
    flatten: bool = Field(default=True, description="one angle per tensor (false: per row/column)")


class MultislerpMerge(_ManyModels):
    """Multi-SLERP: barycentric spherical interpolation of the fine-tunes' deltas."""

    normalize_weights: bool = True


class KarcherMerge(StageConfig):
    """Karcher mean of the model and ``models`` on the hypersphere, times their mean norm."""

    models: list[str] = Field(min_length=1)
    max_iter: int = Field(default=10, ge=1)
    tol: float = Field(default=1e-5, gt=0)


class SceMerge(StageConfig):
    """SCE: top-variance elements, mean-square weights, sign election, weighted mean."""

    models: list[str] = Field(min_length=1)
    select_topk: float = Field(default=1.0, gt=0, le=1)


class ArceeFusionMerge(StageConfig):
    """Arcee Fusion: take a fine-tune's changes only where they stand out (KL x |delta|)."""

    model: str


def _cfg(method: str, inputs: list[MergeInput], **fields: object) -> MergeConfig:
    inputs = [MergeInput(model=SELF), *inputs]
    return MergeConfig(method=method, inputs=inputs, base_model=SELF, **fields)  # type: ignore[arg-type]


def _plain(models: list[str]) -> list[MergeInput]:
    return [MergeInput(model=m) for m in models]


@register_method("merge.della", DellaMerge, "DELLA: magnitude-ranked random drop of task vectors",
                 example={"models": ["builtin:lenet"]})  # fmt: skip
def merge_della(model: nn.Module, config: DellaMerge, run: Run) -> None:
    inputs = [
        i.model_copy(update={"epsilon": config.epsilon}) for i in config.others(config.density)
    ]
    normalize = config.consensus if config.normalize is None else config.normalize
    cfg = _cfg("della" if config.consensus else "della_linear", inputs, normalize=normalize,
               rescale="l1" if config.rescale else None, scale=config.scale)  # fmt: skip
    _run(model, cfg, config, run.ctx.seed if config.seed is None else config.seed)


@register_method("merge.model_stock", ModelStockMerge, "Model Stock: angle-weighted average",
                 example={"models": ["builtin:lenet", "builtin:lenet"]})  # fmt: skip
def merge_model_stock(model: nn.Module, config: ModelStockMerge, run: Run) -> None:
    cfg = _cfg("model_stock", _plain(config.models), options={"filter_wise": config.filter_wise})
    _run(model, cfg, config, run.ctx.seed)


@register_method("merge.nuslerp", NuslerpMerge, "NuSLERP of two fine-tunes' deltas",
                 example={"models": ["builtin:lenet", "builtin:lenet"]})  # fmt: skip
def merge_nuslerp(model: nn.Module, config: NuslerpMerge, run: Run) -> None:
    if len(config.models) != 2:
        raise ValueError(f"merge.nuslerp merges exactly two `models`, got {len(config.models)}")
    opts = {"nuslerp_row_wise": config.row_wise, "nuslerp_flatten": config.flatten}
    _run(model, _cfg("nuslerp", config.others(), options=opts), config, run.ctx.seed)


@register_method("merge.multislerp", MultislerpMerge, "Multi-SLERP of fine-tunes' deltas",
                 example={"models": ["builtin:lenet"]})  # fmt: skip
def merge_multislerp(model: nn.Module, config: MultislerpMerge, run: Run) -> None:
    opts = {"normalize_weights": config.normalize_weights}
    _run(model, _cfg("multislerp", config.others(), options=opts), config, run.ctx.seed)


@register_method("merge.karcher", KarcherMerge, "Karcher mean on the hypersphere",
                 example={"models": ["builtin:lenet"]})  # fmt: skip
def merge_karcher(model: nn.Module, config: KarcherMerge, run: Run) -> None:
    opts = {"max_iter": config.max_iter, "tol": config.tol}
    _run(model, _cfg("karcher", _plain(config.models), options=opts), config, run.ctx.seed)


@register_method("merge.sce", SceMerge, "SCE: select, calculate, erase",
                 example={"models": ["builtin:lenet"]})  # fmt: skip
def merge_sce(model: nn.Module, config: SceMerge, run: Run) -> None:
    opts = {"select_topk": config.select_topk}
    _run(model, _cfg("sce", _plain(config.models), options=opts), config, run.ctx.seed)


@register_method("merge.arcee_fusion", ArceeFusionMerge, "Arcee Fusion: keep outstanding changes",
                 example={"model": "builtin:lenet"})  # fmt: skip
def merge_arcee_fusion(model: nn.Module, config: ArceeFusionMerge, run: Run) -> None:
    _run(model, _cfg("arcee_fusion", _plain([config.model])), config, run.ctx.seed)
