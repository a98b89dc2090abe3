"""Write a per-tensor GGUF type plan (``slimtorch auto --max-bpw``) as a verified GGUF file.

The same steps as :func:`slimtorch.export.gguf.export_gguf` (llama.cpp's names and Q/K row
order, tokenizer metadata, read back with ``gguf.GGUFReader`` bit-exactly, llama.cpp's logits
compared when llama-cpp-python is installed, the file moved into place only when it passed),
with each weight encoded as the plan's type (:func:`slimtorch.export.gguf_mix.encode_typed`).
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.core.errors import UnsupportedModelError, UserInputError
from slimtorch.export.gguf import MAX_KLD, MIN_TOP1, check_model
from slimtorch.export.gguf_mix import encode_typed
from slimtorch.export.gguf_plan import plan_tensors
from slimtorch.export.gguf_verify import _as_written, _example_ids, llama_cpp_check, verify_file
from slimtorch.export.gguf_vocab import find_tokenizer, tokenizer_metadata
from slimtorch.export.gguf_write import _write
from slimtorch.formats.atomic import fsync_dir, temp_sibling


def write_plan(
    model: nn.Module,
    types: Mapping[str, str],
    out: Path,
    importance: Mapping[str, np.ndarray] | None = None,
    inputs: Sequence[Any] = (),
) -> dict[str, Any]:
    """Write ``model`` with the GGUF type ``types[name]`` for each 2-D weight (by GGUF name;
    F16 for one it does not name) to ``out``, verified; a JSON-able report."""
    config = check_model(model)
    tok_path = find_tokenizer(model, None)
    if tok_path is None:
        raise UserInputError(
            "a GGUF file holds the tokenizer, and this model has none: load it from a directory"
            " with tokenizer.json (or a builtin with a registered tokenizer)"
        )
    tok = tokenizer_metadata(tok_path, int(config.vocab_size))
    planned = plan_tensors(model, config, None)
    imp = dict(importance or {})
    for p in planned:
        if p.name in types and p.reference.ndim == 2:
            p.ggml_type, p.data, p.values = encode_typed(
                p.name, p.reference, types[p.name], imp.get(p.name)
            )
            p.how = "encoded"
    if not inputs:  # 128 seeded random ids (ids 1, 2, ... are a tokenizer's control tokens)
        gen = torch.Generator().manual_seed(0)
        inputs = (torch.randint(0, int(config.vocab_size), (1, 128), generator=gen),)
    ids = _example_ids(inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    try:
        file_type = _write(tmp, model, config, planned, tok, None)
        verify_file(tmp, planned)
        runtime: dict[str, Any] | str = "llama-cpp-python not installed"
        if importlib.util.find_spec("llama_cpp") is not None:
            runtime = llama_cpp_check(tmp, _as_written(model, config, planned), ids)
            if runtime["top1_agreement"] < MIN_TOP1 or runtime["kld_mean"] > MAX_KLD:
                raise UnsupportedModelError(
                    f"llama.cpp computes other logits from the planned GGUF file than the"
                    f" decoded weights (top-1 {runtime['top1_agreement']:.3f}, KLD"
                    f" {runtime['kld_mean']:.3g}); report this"
                )
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    tensor_bytes = sum(int(p.data.nbytes) for p in planned)
    return {
        "out": str(out),
        "bytes": out.stat().st_size,
        "tensor_bytes": tensor_bytes,
        "file_type": file_type,
        "tensors": dict(sorted(Counter(p.ggml_type for p in planned).items())),
        "llama_cpp": runtime,
    }
