"""Checks every exporter makes before it writes anything."""

from __future__ import annotations

from torch import nn

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.runtime.act_quant import ActQuantLinear
from slimtorch.runtime.hadamard import OnlineHadamardLinear
from slimtorch.runtime.lora_lowbit import LoRALinear

RUNTIME_ONLY: tuple[type[nn.Module], ...] = (OnlineHadamardLinear, ActQuantLinear, LoRALinear)


def refuse_runtime_modules(model: nn.Module) -> None:
    """:class:`UnsupportedModelError` naming the first slimtorch-only runtime module of
    ``model`` (an online Hadamard transform, simulated activation quantization, a LoRA adapter
    kept beside a low-bit weight): no other runtime computes them, so a file written without
    them would compute something else."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            raise UnsupportedModelError(
                f"{name} keeps a LoRA adapter beside its low-bit weight (quantize.lora), which"
                " exporters cannot carry; save it with slimtorch.save, or run quantize.lora with"
                " merge: true to fold the adapter into the stored weights before exporting"
            )
        if isinstance(module, RUNTIME_ONLY):
            raise UnsupportedModelError(
                f"{name} is a slimtorch-only runtime module (online Hadamard / simulated"
                " activation quantization); save it with slimtorch.save, or compress with"
                " quantize.rotate online_hadamard: false and without quantize.activations to"
                " export"
            )
