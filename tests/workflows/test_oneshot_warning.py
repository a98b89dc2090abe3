"""The warning before a recipe whose recovery training is skipped runs one-shot unevaluated."""

from __future__ import annotations

import logging

import pytest

from slimtorch.recipe import load_recipe
from slimtorch.workflows.oneshot import unrecovered_warning, warn_unrecovered


@pytest.mark.parametrize(
    ("preset", "lossy", "skipped"),
    [
        ("sparse90-int8", "prune.magnitude", "train.finetune"),
        ("deep-compression", "prune.magnitude, share.kmeans", "prune.gradual, share.finetune"),
        ("structured-50", "prune.structured", "train.finetune"),
    ],
)
def test_destructive_presets_warn_without_data_and_evaluator(preset, lossy, skipped) -> None:
    message = unrecovered_warning(load_recipe(preset), None, None)
    assert message is not None and f"recipe {preset!r} applies {lossy} and" in message
    assert f"by training ({skipped}), which is skipped without --data" in message
    assert "data=loader, loss_fn=" in message
    assert unrecovered_warning(load_recipe(preset), "builtin:fashion-mnist", None) is None
    assert unrecovered_warning(load_recipe(preset), None, "fashion-mnist") is None


@pytest.mark.parametrize("preset", ["int8", "kmeans4", "dynamic-int8", "wanda-50"])
def test_one_shot_recipes_do_not_warn(preset) -> None:
    assert unrecovered_warning(load_recipe(preset), None, None) is None


def test_warn_logs_it(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="slimtorch.workflows.oneshot"):
        assert warn_unrecovered(load_recipe("int8"), None, None) is None
        assert caplog.text == ""
        message = warn_unrecovered(load_recipe("sparse90-int8"), None, None)
    assert message is not None and message in caplog.text
