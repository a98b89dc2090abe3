"""concat_artifacts: several block artifacts become one, identical to writing them together."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimtorch.core.errors import ArtifactError
from slimtorch.formats.artifact import read_artifact, write_artifact
from slimtorch.formats.concat import concat_artifacts
from slimtorch.formats.state import QuantState, WeightState


def _state(w: torch.Tensor) -> WeightState:
    scale = w.abs().amax(1, keepdim=True) / 7
    codes = torch.clamp(torch.round(w / scale), -8, 7).to(torch.int8)
    quant = QuantState(
        scheme="affine",
        bits=4,
        signed=True,
        granularity="per_channel",
        codes=codes,
        scale=scale,
        zero_point=torch.zeros_like(scale, dtype=torch.int32),
    )
    return WeightState(quant=quant)


def test_joined_artifact_equals_one_written_at_once(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    a = {"a.weight": torch.randn(8, 16, generator=gen), "a.bias": torch.randn(8, generator=gen)}
    b = {"b.weight": torch.randn(4, 8, generator=gen)}
    states = {"a.weight": _state(a["a.weight"])}
    write_artifact(tmp_path / "pa", a, states, {})
    write_artifact(tmp_path / "pb", b, {}, {})
    write_artifact(tmp_path / "whole", {**a, **b}, states, {"metadata": {"k": 1}})
    joined = concat_artifacts(
        [tmp_path / "pa", tmp_path / "pb"], tmp_path / "j", {"metadata": {"k": 1}}
    )
    assert joined["tensors"].keys() == {"a.weight", "a.bias", "b.weight"}
    got, want = read_artifact(tmp_path / "j"), read_artifact(tmp_path / "whole")
    for name, t in want.tensors.items():
        assert torch.equal(got.tensors[name], t)
    assert torch.equal(got.states["a.weight"].quant.codes, want.states["a.weight"].quant.codes)
    with pytest.raises(ArtifactError, match="earlier source"):
        concat_artifacts([tmp_path / "pa", tmp_path / "pa"], tmp_path / "k", {})
    assert not (tmp_path / "k").exists()
