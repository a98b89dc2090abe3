"""Recipe stage ``quantize.lora``: low-rank adapters trained on a frozen quantized base
(QLoRA-style recovery), kept beside it or merged back into its grid.

    - method: quantize.gptq
      bits: 3
      group_size: 64
    - method: quantize.lora
      rank: 16
      loss: distill                 # KL to the model before the recipe; `task`: the task's loss
      merge: false                  # true: fold into the weights, re-quantized on their grid
      train: {steps: 100, lr: 2.0e-4, batch_size: 4}

The adapters wrap the quantized Linears of the repeated blocks (every quantized targeted Linear
in a model without blocks; on a model not quantized yet, every targeted Linear: plain LoRA);
everything else is frozen. Kept adapters are stored in ``dtype``
(float16) beside the base's codes (runtime module ``LoRALinear``); merged ones cost no bytes.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from slimtorch.calibrate.lm import logits_of
from slimtorch.calibrate.sequential import find_blocks
from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.config import StageConfig
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.core.methods import Run, Task, register_method
from slimtorch.core.targets import Targets
from slimtorch.formats.state import get_state
from slimtorch.quantize.lora import distill_loss, merge_into_grid, wrap_linears
from slimtorch.runtime.lora_lowbit import DTYPES

log = logging.getLogger(__name__)
METHOD = "quantize.lora"


class LoRAConfig(StageConfig):
    """Low-rank adapters (``scale * up @ down``) trained beside frozen quantized Linears."""

    rank: int = Field(default=16, ge=1, description="adapter rank")
    alpha: float = Field(default=16.0, gt=0, description="adapter scale = alpha / rank")
    loss: Literal["distill", "task"] = Field(
        default="distill",
        description="distill: KL to the model before the recipe; task: the task's loss",
    )
    temperature: float = Field(default=1.0, gt=0)
    merge: bool = Field(default=False, description="fold the adapters into the weights' grids")
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    train: TrainOptions = Field(
        default_factory=lambda: TrainOptions(steps=100, lr=2e-4, batch_size=4)
    )


class _Distill:
    """The task's batches, the loss: KL of ``model``'s next-token distribution to ``teacher``'s."""

    def __init__(self, task: Task, teacher: nn.Module, temperature: float) -> None:
        self.name = f"{task.name}-distill"
        self.task, self.teacher, self.temperature = task, teacher, temperature

    def train_batches(self, ctx: Context, steps: int, batch_size: int) -> Any:
        return self.task.train_batches(ctx, steps, batch_size)

    def forward(self, model: nn.Module, batch: Any) -> Any:
        return self.task.forward(model, batch)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        student = logits_of(self.task.forward(model, batch))
        with torch.no_grad():
            teacher = logits_of(self.task.forward(self.teacher, batch))
        return distill_loss(student, teacher, self.temperature)


def adapter_targets(model: nn.Module, config: StageConfig) -> list[str]:
    """The targeted Linears to adapt, inside the repeated blocks when the model has them (the
    LM head and embeddings stay as they are): those carrying a quantization grid, else (a model
    not quantized yet: plain LoRA on a frozen full-precision base) every one."""
    blocks = find_blocks(model).container
    sel = Targets.of(config.targets, config.ignore)
    found: dict[str, bool] = {}
    # nn.MultiheadAttention reads out_proj.weight itself (F.multi_head_attention_forward), so a
    # wrapper there would never run: those projections keep no adapter
    inside_mha = {
        f"{name}.out_proj" if name else "out_proj"
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not sel.selects(name, module):
            continue
        if name in inside_mha:
            continue
        if blocks and not name.startswith(f"{blocks}."):
            continue
        state = get_state(module, "weight")
        found[name] = state is not None and state.quant is not None
    quantized = [n for n, q in found.items() if q]
    if found and not quantized:
        log.warning("%s: no quantized Linear; adapters on the full-precision base", METHOD)
    return quantized or list(found)


def _task(config: LoRAConfig, run: Run) -> Task:
    task = run.require_task(METHOD)
    if config.loss == "task":
        return task
    if run.original is None:
        raise ConfigError(
            f"{METHOD} loss: distill learns from the model before the recipe, which this run does"
            " not have; use loss: task, or run it through slimtorch.compress"
        )
    return _Distill(task, run.original.eval(), config.temperature)


@register_method(
    METHOD,
    LoRAConfig,
    "low-rank adapters trained on a frozen quantized base (QLoRA-style recovery, distilled from"
    " the model before the recipe), kept as float16 modules or merged into the grid",
    needs_data=True,
)
def lora(model: nn.Module, config: LoRAConfig, run: Run) -> None:
    names = adapter_targets(model, config)
    if not names:
        raise ConfigError(
            f"{METHOD} adapts Linear layers and found none among its targets (targets:"
            f" {config.targets}, ignore: {config.ignore}); target the model's Linear layers"
        )
    task = _task(config, run)
    wrappers = wrap_linears(model, names, config.rank, config.alpha / config.rank)
    adapters = {id(p) for w in wrappers for p in (w.down.weight, w.up.weight)}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in adapters]
    for p in frozen:
        p.requires_grad_(False)
    try:
        losses = train(model, task, run.ctx, config.train)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    log.info("%s: %d adapters, loss %.4g -> %.4g", METHOD, len(names), losses[0], losses[-1])
    for w in wrappers:
        w.down.to(DTYPES[config.dtype])
        w.up.to(DTYPES[config.dtype])
    if config.merge:
        for name in names:
            merge_into_grid(model, name)
