"""Serving a prune.reorder-ed model narrower: the widths recorded in its ModelInfo."""

from __future__ import annotations

import pytest
from torch import nn

import slimtorch as st
from slimtorch.artifact.widths import available_widths, narrow, width_key
from slimtorch.core.errors import ArtifactError, UserInputError
from slimtorch.core.info import model_info, update_info
from slimtorch.testing.models import example_input, tiny_resnet, with_example_input


def _ordered() -> nn.Module:
    model = with_example_input(tiny_resnet())
    return st.compress(model, {"stages": [{"method": "prune.reorder"}]}).model


def test_width_key() -> None:
    assert [width_key(w) for w in (0.5, 1.0, 0.25, 1 / 3)] == ["0.5", "1", "0.25", "0.333333"]


def test_narrow_records_the_width_and_drops_the_ordering() -> None:
    ordered = _ordered()
    assert available_widths(ordered) and not available_widths(tiny_resnet())
    half = narrow(ordered, 0.5)
    info = model_info(half)
    assert info.width == 0.5 and info.widths is None and not available_widths(half)
    assert model_info(ordered).widths  # the original keeps its ordering
    assert half(example_input(ordered)).shape == ordered(example_input(ordered)).shape


def test_narrow_errors() -> None:
    with pytest.raises(UserInputError, match=r"prune\.reorder"):
        narrow(tiny_resnet(), 0.5)
    ordered = _ordered()
    with pytest.raises(UserInputError, match=r"width must be in \(0, 1\]"):
        narrow(ordered, 0.0)
    update_info(ordered, width_stats={"0.5": {"bn.running_mean": [0.0]}})
    with pytest.raises(ArtifactError, match=r"statistics recorded for width 0\.5 do not fit"):
        narrow(ordered, 0.5)
