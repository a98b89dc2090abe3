"""Checks of a written ExecuTorch file: outputs against PyTorch, codes found byte for byte.

Pure functions over tensors and bytes (no ExecuTorch import).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from slimtorch.export.executorch_plan import Carried


def flat_outputs(outputs: Any) -> list[Tensor]:
    """Every tensor of a model's outputs, in order."""
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [t for v in outputs.values() for t in flat_outputs(v)]
    if isinstance(outputs, (list, tuple)):
        return [t for v in outputs for t in flat_outputs(v)]
    if hasattr(outputs, "to_tuple"):  # transformers ModelOutput
        return flat_outputs(outputs.to_tuple())
    return []


def compare(got: Sequence[Tensor], reference: Any) -> dict[str, Any]:
    """Max |difference| over all outputs, the largest |reference| value, and for 2-D float
    outputs the share of rows whose argmax agrees (``top1_agreement``)."""
    refs = flat_outputs(reference)
    if len(refs) != len(got):
        raise ValueError(f"the file returned {len(got)} outputs, PyTorch {len(refs)}")
    diff, peak, agree, rows = 0.0, 0.0, 0, 0
    for g, r in zip(got, refs, strict=True):
        g, r = g.detach().float(), r.detach().float()
        if g.shape != r.shape:
            raise ValueError(f"output shape {list(g.shape)} differs from PyTorch's {list(r.shape)}")
        if r.numel():
            diff = max(diff, float((g - r).abs().max()))
            peak = max(peak, float(r.abs().max()))
        if r.dim() == 2 and r.shape[1] > 1:
            agree += int((g.argmax(1) == r.argmax(1)).sum())
            rows += r.shape[0]
    result: dict[str, Any] = {"max_abs_diff": diff, "max_abs_ref": peak}
    result["relative_diff"] = diff / peak if peak > 0 else diff
    if rows:
        result["top1_agreement"] = agree / rows
    return result


def stored_bytes(c: Carried, codes: Tensor) -> tuple[bytes, bytes]:
    """The bytes XNNPACK stores for a carried weight: its codes (``codes``: the lowered
    module's, parameter shape) and its scales. Conv2d weights are stored channels-last
    ``[out, kh, kw, in]``; 4-bit codes as ``code + 8`` nibbles, the even column in the low
    half; per-group scales as bfloat16."""
    if c.layout == "qb4w":
        u = (codes.to(torch.int16) + 8).to(torch.uint8)
        if u.shape[1] % 2:
            u = torch.nn.functional.pad(u, (0, 1))
        packed = (u[:, 1::2] << 4) | u[:, 0::2]
        return packed.contiguous().numpy().tobytes(), c.scale.to(torch.bfloat16).view(
            torch.int16
        ).numpy().tobytes()
    if codes.dim() == 4:
        codes = codes.permute(0, 2, 3, 1)
    return codes.contiguous().numpy().tobytes(), c.scale.float().numpy().tobytes()


def codes_in_file(data: bytes, carried: list[Carried], twin: nn.Module) -> dict[str, Any]:
    """How many carried weights' codes (and scales) occur byte for byte in the file ``data``."""
    missing = []
    for c in carried:
        weight = twin.get_submodule(f"{c.module}.weight")
        codes, scale = weight.get_buffer("codes"), weight.get_buffer("scale")
        lowered = Carried(c.module, c.layout, c.codes, scale, c.group)
        code_bytes, scale_bytes = stored_bytes(lowered, codes)
        if code_bytes not in data or scale_bytes not in data:
            missing.append(c.module)
    return {"found": len(carried) - len(missing), "of": len(carried), "missing": missing}
