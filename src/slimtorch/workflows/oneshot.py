"""A warning before a recipe runs one-shot what it is meant to recover from by training.

``sparse90-int8``, ``deep-compression``, ``structured-50`` (and ``nm24``) prune or share weights
and then recover the accuracy with optional training stages, which are skipped without
``--data``. One-shot they can destroy a model (an OCR model's exact match went from 21/22 to
0/22 under sparse90-int8); for a builtin the compress report shows the quality drop, but for a
model slimtorch has no evaluator for nothing did. :func:`unrecovered_warning` says so before
the run, naming the skipped stages and ``--data`` (or the Python API's ``data=`` loader for a
model without a slimtorch task).
"""

from __future__ import annotations

import logging

from slimtorch.recipe import Recipe

log = logging.getLogger(__name__)

_LOSSY_PREFIXES = ("prune.", "share.")  # stages whose one-shot damage the training recovers


def unrecovered_warning(rec: Recipe, data: str | None, evaluator: str | None) -> str | None:
    """The warning for ``rec`` run without ``data`` on a model without an ``evaluator``: its
    recovery (optional training) stages are skipped after a pruning/sharing stage; else None."""
    if data is not None or evaluator is not None:
        return None
    skipped = [s.spec.name for s in rec.stages if s.optional and s.spec.needs_data]
    lossy = [s.spec.name for s in rec.stages if s.spec.name.startswith(_LOSSY_PREFIXES)]
    lossy = [name for name in lossy if name not in skipped]
    if not skipped or not lossy:
        return None
    return (
        f"recipe {rec.name!r} applies {', '.join(dict.fromkeys(lossy))} and recovers the"
        f" accuracy by training ({', '.join(dict.fromkeys(skipped))}), which is skipped without"
        " --data: one-shot it can destroy the model's accuracy, and slimtorch has no evaluator"
        " for this model to show it. Pass --data with training data (Python:"
        " slimtorch.compress(model, recipe, data=loader, loss_fn=...)), add a distill.data_free"
        " stage after the pruning (recovery without data, for models taking one float input),"
        " or use a one-shot recipe"
        " (int8, int4, dynamic-int8, kmeans8) and check the result on your own data"
    )


def warn_unrecovered(rec: Recipe, data: str | None, evaluator: str | None) -> str | None:
    """Log :func:`unrecovered_warning` (when there is one) and return it."""
    message = unrecovered_warning(rec, data, evaluator)
    if message is not None:
        log.warning("%s", message)
    return message
