"""What every exporter refuses before it writes: slimtorch-only runtime modules."""

from __future__ import annotations

import pytest
from torch import nn

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.export.checks import refuse_runtime_modules
from slimtorch.runtime.lora_lowbit import LoRALinear


def test_a_kept_lora_adapter_is_refused_with_the_merge_fix() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    refuse_runtime_modules(model)  # plain layers pass
    model[2] = LoRALinear(model[2], rank=2)
    with pytest.raises(UnsupportedModelError, match=r"^2 keeps a LoRA adapter.*merge: true"):
        refuse_runtime_modules(model)
