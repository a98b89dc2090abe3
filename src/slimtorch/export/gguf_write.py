"""Writing a GGUF file (:mod:`slimtorch.export.gguf`): the ``general.*`` / ``llama.*`` /
``tokenizer.ggml.*`` metadata and the planned tensors, with ``gguf.GGUFWriter``."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.core.info import model_info
from slimtorch.export.gguf_plan import _FILE_TYPES, Planned, _get, _rope
from slimtorch.models.gguf import gguf_module

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION: the block layouts written here


def _file_type(planned: list[Planned]) -> str:
    counts = Counter(p.ggml_type for p in planned if p.name.startswith("blk.") and p.data.ndim == 2)
    return counts.most_common(1)[0][0] if counts else "F32"


def _write_metadata(
    writer: Any,
    config: Any,
    name: str,
    planned: list[Planned],
    tok: dict[str, Any] | None,
    mix: str | None = None,
) -> str:
    gguf = gguf_module()
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = int(_get(config, "head_dim", hidden // heads))
    theta, scaling = _rope(config)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(_get(config, "num_key_value_heads", heads)))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    file_type = mix or _file_type(planned)
    writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[file_type]]))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(head_dim)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if tok is not None:
        writer.add_tokenizer_model(tok["model"])
        writer.add_tokenizer_pre(tok["pre"])
        writer.add_token_list(tok["tokens"])
        writer.add_token_types(tok["token_type"])
        if tok["merges"]:
            writer.add_token_merges(tok["merges"])
        for key, add in (
            ("bos_token_id", writer.add_bos_token_id),
            ("eos_token_id", writer.add_eos_token_id),
            ("unknown_token_id", writer.add_unk_token_id),
            ("padding_token_id", writer.add_pad_token_id),
            ("add_bos_token", writer.add_add_bos_token),
            ("add_eos_token", writer.add_add_eos_token),
            ("add_space_prefix", writer.add_add_space_prefix),
            ("chat_template", writer.add_chat_template),
        ):
            if key in tok:
                add(tok[key])
    writer.add_quantization_version(QUANTIZATION_VERSION)
    return file_type


def _llama3_factors(config: Any, scaling: dict[str, Any]) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` tensor for a ``llama3`` rope scaling (its converter's loop)."""
    import math

    theta, _ = _rope(config)
    heads = int(config.num_attention_heads)
    dim = int(_get(config, "head_dim", int(config.hidden_size) // heads))
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(scaling.get("factor", 8.0))
    low, high = (
        float(scaling.get("low_freq_factor", 1.0)),
        float(scaling.get("high_freq_factor", 4.0)),
    )
    orig = float(scaling.get("original_max_position_embeddings", 8192))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _write(
    path: Path,
    model: nn.Module,
    config: Any,
    planned: list[Planned],
    tok: Any,
    mix: str | None = None,
) -> str:
    gguf = gguf_module()
    writer = gguf.GGUFWriter(str(path), "llama")
    try:
        name = str(model_info(model).source or type(model).__name__)
        file_type = _write_metadata(writer, config, name, planned, tok, mix)
        _, scaling = _rope(config)
        if scaling.get("rope_type", scaling.get("type")) == "llama3":
            factors = _llama3_factors(config, scaling)
            planned.append(Planned("rope_freqs.weight", factors, "F32", factors, factors, "f32"))
        for p in planned:
            raw = None if p.ggml_type in ("F32", "F16") else gguf.GGMLQuantizationType[p.ggml_type]
            writer.add_tensor(p.name, p.data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        raise
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return file_type
