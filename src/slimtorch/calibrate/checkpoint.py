"""The tensors of a Hugging Face checkpoint's safetensors shards, read one at a time (the offloaded
run, :mod:`slimtorch.calibrate.offload`): a model parameter stored under another name or inside
a fused tensor (Mixtral's original experts, fused / transposed / interleaved / MXFP4 experts) is
read as the part the model's unfused layer holds."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from slimtorch.core.errors import UserInputError
from slimtorch.runtime.moe import checkpoint_parts
from slimtorch.runtime.moe_layouts import take_part


class Checkpoint:
    """The tensors of a Hugging Face directory's safetensors shards, read one at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise UserInputError(
                f"{root} has no *.safetensors weights; offloaded compression reads safetensors"
                " shards (save_pretrained(..., safe_serialization=True))"
            )
        self.where: dict[str, Path] = {}
        shapes: dict[str, list[int]] = {}
        for file in files:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    self.where[key] = file
                    shapes[key] = list(f.get_slice(key).get_shape())
        # a model parameter stored under another name or inside a fused tensor (Mixtral's
        # original experts.{i}.w1, fused experts.gate_up_proj: transposed, interleaved, MXFP4)
        self.parts = checkpoint_parts(shapes, _config(root))
        self.where.update({n: self.where[key] for n, (key, _) in self.parts.items()})

    def get(self, name: str) -> torch.Tensor:
        key, part = self.parts.get(name, (name, None))
        with safe_open(str(self.where[key]), "pt") as f:
            if part is None:
                return f.get_tensor(key)
            if part.step == 1 and not part.transposed and part.scales is None:
                return f.get_slice(key)[part.expert, part.first : part.end]
            expert = f.get_slice(key)[part.expert : part.expert + 1][0]
        scales = None
        if part.scales is not None:
            with safe_open(str(self.where[part.scales]), "pt") as f:
                scales = f.get_slice(part.scales)[part.expert : part.expert + 1][0]
        return take_part(expert, part, scales)


def _config(root: Path) -> Any:
    """``root``'s config.json ({} if none or unreadable: the layout then comes from shapes)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads((root / "config.json").read_text())
    return {}
