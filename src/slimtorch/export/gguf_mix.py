"""llama.cpp's per-tensor type mixes (``Q4_K_M`` ...), its fallback for rows that a 256-wide
super-block does not divide, and the importance matrix (imatrix) files that weight the rounding.

Mixes (llama.cpp's ``llama_tensor_get_type`` for Llama-family models, no experts, re-stated):

- the output head (``output.weight``, or ``token_embd.weight`` when the head is tied to it):
  ``Q6_K`` (``Q8_0`` when its rows are not a multiple of 256);
- ``attn_v`` and ``ffn_down``: ``Q6_K`` in the layers llama.cpp's ``use_more_bits`` picks (the
  first and last eighth, and every third layer between) for ``Q4_K_M`` / ``Q5_K_M``;
  ``Q5_K`` in the first 4 ``attn_v`` / the first eighth of ``ffn_down`` for ``Q4_K_S``;
- every other 2-D weight: the mix's base type (``Q4_K`` for ``Q4_K_M`` / ``Q4_K_S``, ``Q5_K``
  for ``Q5_K_M`` / ``Q5_K_S``); a single type name (``Q4_K``, ``Q5_K``, ``Q6_K``) is that type
  for every weight (llama-quantize ``--pure``);
- then the fallback: a weight whose rows (input features) are not a multiple of 256 takes
  ``Q5_0`` instead of ``Q4_K``, ``Q5_1`` instead of ``Q5_K``, ``Q8_0`` instead of ``Q6_K``
  (llama.cpp's ``tensor_type_fallback``; ``F16`` when not even 32 divides them). On
  SmolLM2-135M (576-wide rows) this is every weight but ``ffn_down`` (1536-wide rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slimtorch.core.errors import UserInputError

MIXES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q4_K", "Q5_K", "Q6_K")
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# presets whose artifacts leave weights float for the exporter to encode by a mix
PRESET_MIXES = {"gguf-q4_k_m-gptq": "Q4_K_M"}
_BASE = {"Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K"}
_LAYER = re.compile(r"blk\.(\d+)\.")


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in ``*_M`` mixes."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def mix_type(mix: str, name: str, layers: int, head: bool) -> str:
    """The GGUF type ``mix`` gives the tensor ``name`` (before the row-length fallback);
    ``head``: this tensor is the output head (``output.weight``, or a tied ``token_embd``)."""
    if mix not in _BASE:
        return mix
    base = _BASE[mix]
    if head:
        return "Q6_K"
    match = _LAYER.match(name)
    layer = int(match.group(1)) if match else -1
    kind = name.split(".")[2] if match else ""
    if kind in ("attn_v", "ffn_down") and mix in ("Q4_K_M", "Q5_K_M"):
        return "Q6_K" if use_more_bits(layer, layers) else base
    if kind == "attn_v" and mix == "Q4_K_S" and layer < 4:
        return "Q5_K"
    if kind == "ffn_down" and mix == "Q4_K_S" and layer < layers // 8:
        return "Q5_K"
    return base


def fallback(ggml_type: str, cols: int) -> str:
    """``ggml_type``, or llama.cpp's fallback when ``cols`` does not fit its block."""
    if ggml_type in FALLBACK and cols % 256:
        ggml_type = FALLBACK[ggml_type]
    return "F16" if cols % 32 else ggml_type


def check_mix(mix: str) -> str:
    name = mix.upper()
    if name not in MIXES:
        raise UserInputError(f"{mix!r} is not a k-quant mix; use one of {', '.join(MIXES)}")
    return name


def read_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """Per-input importance of each weight, by llama.cpp tensor name (``blk.0.ffn_down.weight``),
    from llama.cpp's ``llama-imatrix`` GGUF file (``<name>.in_sum2`` / ``<name>.counts``: the
    mean squared activation) or a safetensors file of ``{name: [in_features] float32}``."""
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"imatrix file {file} does not exist; give llama-imatrix's .gguf")
    if file.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return {k: np.asarray(v, dtype=np.float32).reshape(-1) for k, v in load_file(file).items()}
    from slimtorch.models.gguf import gguf_module

    try:
        reader = gguf_module().GGUFReader(str(file))
    except (ValueError, OSError) as exc:
        raise UserInputError(
            f"{file} is not a GGUF imatrix file ({exc}); write one with llama-imatrix -o"
            " FILE.gguf, or give a .safetensors file of per-input importances"
        ) from None
    sums, counts = {}, {}
    for t in reader.tensors:
        data = np.asarray(t.data, dtype=np.float32).reshape(-1)
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = data
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = data
    if not sums:
        raise UserInputError(f"{file} holds no .in_sum2 tensors: it is not an imatrix file")
    return {k: v / max(float(counts.get(k, np.ones(1))[0]), 1.0) for k, v in sums.items()}


@dataclass
class KMix:
    """A k-quant mix as the exporter applies it: the mix name, the model's layer count, the GGUF
    name of the output head (``output.weight``, or ``token_embd.weight`` when tied) and the
    per-input importance of each weight by GGUF name (empty: llama.cpp's defaults)."""

    mix: str
    layers: int
    head: str
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    # per-tensor GGUF types by GGUF name (``slimtorch auto --max-bpw``'s plan), over the mix
    types: dict[str, str] = field(default_factory=dict)


def encode_weight(name: str, values: np.ndarray, kmix: KMix) -> tuple[str, np.ndarray, np.ndarray]:
    """``(GGUF type, block bytes, decoded float32 values)`` of the weight ``name`` under
    ``kmix`` (its per-tensor type when ``kmix.types`` names it; its importance row when the
    imatrix has one)."""
    cols = values.shape[-1]
    wanted = kmix.types.get(name) or mix_type(kmix.mix, name, kmix.layers, name == kmix.head)
    ggml_type = fallback(wanted, cols)
    return encode_typed(name, values, ggml_type, kmix.importance.get(name))


def encode_typed(
    name: str, values: np.ndarray, ggml_type: str, importance: np.ndarray | None = None
) -> tuple[str, np.ndarray, np.ndarray]:
    """``(GGUF type, block bytes, decoded float32 values)`` of the weight ``name`` as
    ``ggml_type`` (:data:`PLAN_TYPES` or F16), rounding weighted by ``importance`` (per input)
    where the encoder takes one: slimtorch's k-quant / Q4_0 / Q5_0 / Q8_0 encoders; Q4_1 / Q5_1
    by the gguf package's reference rounding."""
    from slimtorch.export.gguf_kquants import ENCODED_TYPES, encode
    from slimtorch.models.gguf import gguf_module

    cols = values.shape[-1]
    if ggml_type == "F16":
        half = values.astype(np.float16)
        return "F16", half, half.astype(np.float32)
    if importance is not None and importance.shape[0] != cols:
        raise UserInputError(
            f"the imatrix has {importance.shape[0]} entries for {name}, which has {cols} inputs:"
            " it was computed on another model"
        )
    if ggml_type in ENCODED_TYPES:
        enc = encode(values, ggml_type, importance)
        return ggml_type, enc.data, enc.values
    if ggml_type == "Q4_0":
        data, decoded = encode_q4_0(values, importance)
        return ggml_type, data, decoded
    gguf = gguf_module()  # Q4_1 / Q5_1: llama.cpp's reference rounding
    qtype = gguf.GGMLQuantizationType[ggml_type]
    data = gguf.quants.quantize(values, qtype)
    decoded = np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)
    return ggml_type, data, decoded.reshape(values.shape)


# the types a per-tensor plan may give a weight, and their (block size, block bytes)
PLAN_TYPES = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}


def encode_q4_0(values: np.ndarray, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 blocks of ``values`` ``[rows, cols]`` (``x = d * (q - 8)``, ``q`` in 0..15, fp16
    ``d`` per 32) and what they decode to; the scale chosen by the importance-weighted fit of
    :func:`~slimtorch.export.gguf_kquants.fit_symmetric` (llama.cpp's max-abs rule without)."""
    from slimtorch.export.gguf_blocks import pack
    from slimtorch.export.gguf_kquants import fit_symmetric

    rows, cols = values.shape
    x = np.ascontiguousarray(values, dtype=np.float64).reshape(-1, 32)
    if importance is None:
        big = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]
        scale = big / -8
    else:
        qw = np.tile(np.maximum(np.asarray(importance, np.float64), 0).reshape(-1, 32), (rows, 1))
        scale = fit_symmetric(x, qw * np.sqrt((x * x).mean(axis=1, keepdims=True) + x * x), 8)
    d = np.asarray(scale, dtype=np.float32).astype(np.float16)
    d32 = d.astype(np.float64)[:, None]
    k = np.where(d32 != 0, np.clip(np.rint(x / np.where(d32 != 0, d32, 1.0)), -8, 7), 0)
    data = pack("Q4_0", (k + 8).astype(np.uint8).reshape(rows, cols), d.reshape(rows, -1), None)
    return data, (d32 * k).astype(np.float32).reshape(rows, cols)
