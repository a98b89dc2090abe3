"""slimtorch.distill: knowledge distillation as recipe stages.

Importing this package registers ``distill.finetune``, ``distill.teacher`` and ``distill.shrink``.
"""

from slimtorch.calibrate.sentences import SentenceTask, load_sentences
from slimtorch.distill import stage  # noqa: F401  (registers the recipe stages)
from slimtorch.distill.losses import (
    attention_map_loss,
    embedding_loss,
    hidden_state_loss,
    kd_loss,
    soft_target_loss,
)
from slimtorch.distill.student import shrink_layers
from slimtorch.distill.trainer import AttentionPair, DistillOptions, DistillTask, HiddenPair

__all__ = [
    "AttentionPair",
    "DistillOptions",
    "DistillTask",
    "HiddenPair",
    "SentenceTask",
    "attention_map_loss",
    "embedding_loss",
    "hidden_state_loss",
    "kd_loss",
    "load_sentences",
    "shrink_layers",
    "soft_target_loss",
]
