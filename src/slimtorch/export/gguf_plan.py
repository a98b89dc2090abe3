"""The tensors of a GGUF file (:mod:`slimtorch.export.gguf`): llama.cpp's names and Q/K row
order, each weight as slimtorch's own codes in GGUF blocks, F16 / F32, requantized by
``gguf.quants.quantize`` or encoded by a k-quant mix (:mod:`slimtorch.export.gguf_mix`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.export.gguf_blocks import BLOCK, NotRepresentable, grid_blocks
from slimtorch.export.gguf_mix import MIXES, KMix, encode_weight
from slimtorch.formats.state import get_state
from slimtorch.models.gguf import _GLOBAL, _LAYER, gguf_module

_HF_LAYER = {v: k for k, v in _LAYER.items()}
_HF_GLOBAL = {v: k for k, v in _GLOBAL.items()}
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_FILE_TYPES = {
    "F32": "ALL_F32",
    "F16": "MOSTLY_F16",
    "BF16": "MOSTLY_BF16",
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0",
    "Q5_1": "MOSTLY_Q5_1",
    "Q8_0": "MOSTLY_Q8_0",
    "Q4_K": "MOSTLY_Q4_K_S",
    "Q5_K": "MOSTLY_Q5_K_S",
    "Q6_K": "MOSTLY_Q6_K",
    "Q4_K_M": "MOSTLY_Q4_K_M",
    "Q4_K_S": "MOSTLY_Q4_K_S",
    "Q5_K_M": "MOSTLY_Q5_K_M",
    "Q5_K_S": "MOSTLY_Q5_K_S",
    "MXFP4": "MOSTLY_MXFP4_MOE",
}


@dataclass
class Planned:
    """One tensor of the file: its data as written, its GGUF type, the float32 values that
    data decodes to, and the model's own values (both in the file's row order)."""

    name: str
    data: np.ndarray
    ggml_type: str
    values: np.ndarray
    reference: np.ndarray
    how: str  # "codes" (slimtorch's codes, kept) | "f16" | "f32" | "requantized" | "encoded"
    scale_change: float = 0.0
    offset_change: float = 0.0


def _get(config: Any, key: str, default: Any = None) -> Any:
    value = getattr(config, key, None)
    return default if value is None else value


def _rope(config: Any) -> tuple[float, dict[str, Any]]:
    """``(rope_theta, rope scaling)`` of a transformers 4 or 5 config."""
    params = dict(_get(config, "rope_parameters", {}) or {})
    scaling = dict(_get(config, "rope_scaling", {}) or {}) or params
    theta = float(_get(config, "rope_theta", params.get("rope_theta", 10000.0)))
    return theta, scaling


def gguf_name(hf: str) -> str:
    """llama.cpp's name of the transformers parameter ``hf`` (UnsupportedModelError if none)."""
    owner, _, kind = hf.rpartition(".")
    if owner in _HF_GLOBAL and kind == "weight":
        return f"{_HF_GLOBAL[owner]}.weight"
    match = _HF_BLOCK.fullmatch(hf)
    if match and match.group(2) in _HF_LAYER:
        return f"blk.{match.group(1)}.{_HF_LAYER[match.group(2)]}.{match.group(3)}"
    raise UnsupportedModelError(
        f"parameter {hf!r} has no place in GGUF's llama architecture; export with --to hf"
    )


def permute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of Q/K rows (half-split -> interleaved rotary);
    rows of packed blocks permute the same way as rows of values."""
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _requantize(values: np.ndarray, ggml_type: str) -> tuple[np.ndarray, np.ndarray]:
    """``values`` quantized by ``gguf.quants.quantize`` and what they decode to."""
    gguf = gguf_module()
    qtype = gguf.GGMLQuantizationType[ggml_type]
    data = gguf.quants.quantize(values, qtype)
    decoded = np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)
    return data, decoded.reshape(values.shape)


class _Refused(Exception):
    """A quantized weight with no exact GGUF block type (collected, then reported together)."""


def _plan_weight(
    hf: str,
    owner: str,
    module: nn.Module,
    weight: torch.Tensor,
    requantize: str | None,
    kmix: KMix | None = None,
) -> Planned:
    name = gguf_name(hf)
    reference = weight.detach().to(torch.float32).cpu().numpy()
    state = get_state(module, "weight")
    if state is not None and state.quant is not None:
        try:
            blocks = grid_blocks(state.quant, state.mask, tuple(weight.shape))
        except NotRepresentable as exc:
            q = state.quant
            if kmix is not None:  # a k-quant mix: the grid's values, encoded by the mix
                ggml_type, data, decoded = encode_weight(name, reference, kmix)
                return Planned(name, data, ggml_type, decoded, reference, "requantized")
            if requantize is None:
                group = f" {q.group_size}" if q.granularity == "per_group" else ""
                raise _Refused(
                    f"{owner} ({type(module).__name__}, {q.bits}-bit {q.scheme}"
                    f" {q.granularity.replace('_', '-')}{group}): {exc}"
                ) from None
            if requantize not in ("F32", "F16", "BF16") and weight.shape[-1] % BLOCK:
                raise UnsupportedModelError(
                    f"{owner} has {weight.shape[-1]} input features, not a multiple of 32: it"
                    f" cannot be requantized to {requantize}; use --requantize F16"
                ) from None
            data, decoded = _requantize(reference, requantize)
            return Planned(name, data, requantize, decoded, reference, "requantized")
        return Planned(
            name,
            blocks.data,
            blocks.ggml_type,
            blocks.values,
            reference,
            "codes",
            blocks.scale_change,
            blocks.offset_change,
        )
    if weight.dim() >= 2 and kmix is not None:  # a float weight, encoded by the mix
        ggml_type, data, decoded = encode_weight(name, reference, kmix)
        return Planned(name, data, ggml_type, decoded, reference, "encoded")
    if weight.dim() >= 2:
        half = reference.astype(np.float16)
        return Planned(name, half, "F16", half.astype(np.float32), reference, "f16")
    return Planned(name, reference.copy(), "F32", reference.copy(), reference, "f32")


def _kmix(model: nn.Module, config: Any, mix: str, importance: dict[str, Any] | None) -> KMix:
    embed = model.get_input_embeddings()  # type: ignore[operator]
    head = model.get_output_embeddings()  # type: ignore[operator]
    tied = head is None or head.weight is embed.weight
    name = "token_embd.weight" if tied else "output.weight"
    return KMix(mix, int(config.num_hidden_layers), name, dict(importance or {}))


def plan_tensors(
    model: nn.Module,
    config: Any,
    requantize: str | None,
    importance: dict[str, Any] | None = None,
) -> list[Planned]:
    """Every tensor of the GGUF file, in llama.cpp's order and layout; ``requantize`` a k-quant
    mix (:data:`MIXES`): every weight without exact codes encoded by the mix, rounding weighted
    by ``importance`` (per-input, by GGUF name: :func:`read_imatrix`)."""
    kmix = _kmix(model, config, requantize, importance) if requantize in MIXES else None
    heads = int(config.num_attention_heads)
    kv = int(_get(config, "num_key_value_heads", heads))
    modules = dict(model.named_modules())
    embed = model.get_input_embeddings()  # type: ignore[operator]
    planned: list[Planned] = []
    seen: set[int] = set()
    refused: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}
    for hf, param in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = hf.rpartition(".")
        module = modules[owner]
        if param.data_ptr() in seen and param.numel():  # the tied LM head: token_embd only
            continue
        seen.add(param.data_ptr())
        if leaf == "weight" and module is embed and get_state(module, "weight") is None:
            head = model.get_output_embeddings()  # type: ignore[operator]
            if head is not None and head.weight is param and get_state(head, "weight"):
                module = head  # a tied pair whose state the LM head holds
        try:
            item = _plan_weight(hf, names[id(module)], module, param, requantize, kmix)
        except _Refused as exc:
            refused.append(str(exc))
            continue
        if ".self_attn.q_proj." in hf or ".self_attn.k_proj." in hf:
            n = heads if ".q_proj." in hf else kv
            item.data = permute_rows(item.data, n)
            item.values = permute_rows(item.values, n)
            item.reference = permute_rows(item.reference, n)
        planned.append(item)
    if refused:
        more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
        raise UnsupportedModelError(
            f"{len(refused)} quantized weights have no exact GGUF block type: "
            + "; ".join(refused[:3])
            + f"{more}. GGUF stores groups of 32 columns (or whole rows / multiples of 32) at"
            " 2-5 bits (Q4_0, Q4_1, Q5_0, Q5_1) and symmetric 6-8 bits (Q8_0). Re-compress with"
            " a GGUF preset (gguf-q4_0-gptq, gguf-q4_1-gptq, gguf-q8_0-rtn), or pass"
            " --requantize TYPE (Q8_0, Q5_1, Q4_0, F16, ...) to quantize their values again"
        )
    return planned
