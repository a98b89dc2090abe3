"""``slimtorch demo``: the whole pipeline on the bundled LeNet-5 and Fashion-MNIST."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from slimtorch.calibrate.tasks import make_task
from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.models.registry import builtin_info
from slimtorch.workflows.compress import CompressOptions, compress_to_dir

MODEL = "builtin:lenet5-fashion"
DATA = "builtin:fashion-mnist"


def has_training_data(model: str, data: str) -> bool:
    """Whether the training task of the builtin ``model`` finds ``data`` (one batch is drawn);
    False when the dataset is not installed (its loader raises a UserInputError)."""
    task_name = builtin_info(model.removeprefix("builtin:")).task
    if task_name is None:
        return False
    try:
        next(iter(make_task(task_name, data).train_batches(Context(progress=False), 1, 1)))
    except UserInputError:
        return False
    return True


def demo(
    out: str | None = None, recipe: str = "sparse90-int8", ctx: Context | None = None
) -> dict[str, Any]:
    """Compress the bundled LeNet-5 (Fashion-MNIST) and report before/after.

    Without the Debian Fashion-MNIST package there is no training data: the demo then uses the
    `int8` preset and the test subset shipped with slimtorch.
    """
    data: str | None = DATA
    note = None
    if not has_training_data(MODEL, DATA):
        recipe, data = "int8", None
        note = (
            "Fashion-MNIST training data not installed (Debian package dataset-fashion-mnist);"
            " using the int8 preset and the shipped 2,000-image test subset"
        )
    with tempfile.TemporaryDirectory(prefix="slimtorch-demo-") as tmp:
        target = Path(out) if out else Path(tmp) / "lenet5-fashion"
        options = CompressOptions(data=data, force=out is not None)
        report = compress_to_dir(MODEL, recipe, target, options, ctx)
    report["note"] = note
    if not out:
        report["out"] = None
    return report
