"""slimtorch.distill: knowledge distillation as recipe stages.

The maths is in ``losses``, ``trainer`` and ``student``; the recipe stages ``distill.finetune``,
``distill.teacher``, ``distill.shrink`` and ``distill.data_free`` are in :mod:`slimtorch.distill.stages` (found by
discovery, see :mod:`slimtorch.core.methods`), whose configs are importable from here.
"""

from slimtorch.calibrate.sentences import SentenceTask, load_sentences
from slimtorch.distill.losses import (
    attention_map_loss,
    embedding_loss,
    hidden_state_loss,
    kd_loss,
    soft_target_loss,
)
from slimtorch.distill.stages import (
    DataFreeConfig,
    DistillFinetuneConfig,
    DistillTeacherConfig,
    ShrinkConfig,
)
from slimtorch.distill.student import shrink_layers
from slimtorch.distill.trainer import AttentionPair, DistillOptions, DistillTask, HiddenPair

__all__ = [
    "AttentionPair",
    "DataFreeConfig",
    "DistillFinetuneConfig",
    "DistillOptions",
    "DistillTask",
    "DistillTeacherConfig",
    "HiddenPair",
    "SentenceTask",
    "ShrinkConfig",
    "attention_map_loss",
    "embedding_loss",
    "hidden_state_loss",
    "kd_loss",
    "load_sentences",
    "shrink_layers",
    "soft_target_loss",
]
