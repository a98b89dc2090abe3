"""Every exporter refuses slimtorch-only runtime modules (online Hadamard transforms, simulated
activation quantization) up front, naming the module, and writes nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

import slimtorch as st
from slimtorch.core.context import Context
from slimtorch.core.errors import UnsupportedModelError
from slimtorch.export import export
from slimtorch.runtime import OnlineHadamardLinear
from slimtorch.testing.models import tiny_llama

TARGETS = [
    ("hf", "hf"),
    ("compressed-tensors", "ct"),
    pytest.param(
        "gguf",
        "m.gguf",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("gguf") is None, reason="needs the gguf package"
        ),
    ),
]


def _rotated() -> Any:
    stage = {"method": "quantize.rotate", "online_hadamard": True}
    model = st.compress(tiny_llama(std=0.2, seed=1), [stage], ctx=Context(progress=False)).model
    assert any(isinstance(m, OnlineHadamardLinear) for m in model.modules())
    return model.eval()


@pytest.mark.parametrize(("to", "out"), TARGETS)
def test_online_hadamard_is_refused(to: str, out: str, tmp_path: Path) -> None:
    model = _rotated()
    first = next(n for n, m in model.named_modules() if isinstance(m, OnlineHadamardLinear))
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedModelError, match="slimtorch-only runtime module") as exc:
        export(model, to, tmp_path / out, inputs=(ids,))
    assert str(exc.value).startswith(f"{first} is a slimtorch-only runtime module")
    assert "online_hadamard: false" in str(exc.value) and "slimtorch.save" in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_simulated_activation_quantization_is_refused(tmp_path: Path) -> None:
    stage = {"method": "quantize.activations", "bits": 8}
    model = st.compress(tiny_llama(std=0.2, seed=1), [stage], ctx=Context(progress=False)).model
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedModelError, match="is a slimtorch-only runtime module"):
        export(model.eval(), "hf", tmp_path / "hf", inputs=(ids,))
    assert list(tmp_path.iterdir()) == []
