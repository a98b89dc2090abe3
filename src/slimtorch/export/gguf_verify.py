"""Checking a GGUF file (:mod:`slimtorch.export.gguf`) before it is moved into place: read
back with ``gguf.GGUFReader`` (bit-exact), and run by llama.cpp against the model's logits."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.core.errors import UnsupportedModelError, UserInputError
from slimtorch.export.gguf_mix import MIXES
from slimtorch.export.gguf_plan import Planned, _get, gguf_name
from slimtorch.models.gguf import gguf_module


def verify_file(path: Path, planned: list[Planned]) -> dict[str, Any]:
    """Read ``path`` back with ``gguf.GGUFReader``: every tensor must decode to exactly the
    values intended; returns the largest difference from the model's weights per GGUF type."""
    gguf = gguf_module()
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    if (
        set(tensors) != {p.name for p in planned}
        or reader.fields["general.architecture"].contents() != "llama"
    ):
        raise UnsupportedModelError(f"{path} does not hold the tensors written; report this bug")
    diff: dict[str, float] = {}
    for p in planned:
        t = tensors[p.name]
        if t.tensor_type.name != p.ggml_type:
            raise UnsupportedModelError(
                f"{p.name} reads back as {t.tensor_type.name}, not {p.ggml_type}"
            )
        got = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        got = got.reshape(p.values.shape)
        if not np.array_equal(got, p.values):
            raise UnsupportedModelError(
                f"{p.name} ({p.ggml_type}) decodes to other values than written (up to"
                f" {float(np.abs(got - p.values).max()):.3g}); report this bug"
            )
        key = f"{p.ggml_type} ({p.how})"
        change = float(np.abs(got - p.reference).max()) if got.size else 0.0
        diff[key] = max(diff.get(key, 0.0), change)
    return diff


def llama_cpp_check(path: Path, model: nn.Module, ids: Sequence[int]) -> dict[str, Any]:
    """Load ``path`` in llama.cpp (llama-cpp-python) and compare its logits on ``ids`` with
    ``model``'s: top-1 agreement, max / mean abs difference, mean KL divergence (model || llama.cpp)."""
    from llama_cpp import Llama

    ids = [int(i) for i in ids]
    llm = Llama(
        model_path=str(path),
        logits_all=True,
        n_ctx=max(len(ids), 32),
        n_batch=max(len(ids), 32),
        n_threads=1,
        verbose=False,
    )
    try:
        llm.eval(ids)
        got = torch.tensor(np.asarray(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        close = getattr(llm, "close", None)
        if callable(close):
            close()
    with torch.inference_mode():
        want = model.eval()(torch.tensor([ids]), use_cache=False).logits[0].to(torch.float32)
    logp, logq = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
    kld = (logp.exp() * (logp - logq)).sum(-1)
    return {
        "tokens": len(ids),
        "top1_agreement": float((want.argmax(-1) == got.argmax(-1)).float().mean()),
        "max_abs_logit_diff": float((want - got).abs().max()),
        "mean_abs_logit_diff": float((want - got).abs().mean()),
        "kld_mean": float(kld.mean()),
        "kld_max": float(kld.max()),
        "logit_scale": float(want.abs().max()),
    }


def _example_ids(inputs: Sequence[Any]) -> list[int]:
    first = inputs[0] if inputs else None
    if not isinstance(first, torch.Tensor) or first.dtype not in (torch.int64, torch.int32):
        raise UserInputError("--to gguf checks the file on token ids: give inputs=(ids,)")
    return [int(i) for i in first.reshape(-1, first.shape[-1])[0].tolist()]


def _as_written(model: nn.Module, config: Any, planned: list[Planned]) -> nn.Module:
    """``model``, or a copy computing with the values the file holds where weights were
    quantized again (``requantized`` / ``encoded``): what llama.cpp's logits should match."""
    changed = {p.name: p for p in planned if p.how in ("requantized", "encoded")}
    if not changed:
        return model
    import copy

    from slimtorch.models.gguf import unpermute

    heads = int(config.num_attention_heads)
    kv = int(_get(config, "num_key_value_heads", heads))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for hf, param in twin.named_parameters(remove_duplicate=False):
            p = changed.get(gguf_name(hf))
            if p is None:
                continue
            values = torch.from_numpy(np.ascontiguousarray(p.values))
            if ".self_attn.q_proj." in hf or ".self_attn.k_proj." in hf:
                values = unpermute(values, heads if ".q_proj." in hf else kv)
            param.copy_(values.reshape(param.shape).to(param.dtype))
    return twin


def _fallbacks(planned: list[Planned], mix: str | None) -> dict[str, int]:
    """How many weights of a k-quant mix took llama.cpp's fallback type (rows not a multiple
    of 256), by ``"wanted->written"``."""
    if mix not in MIXES:
        return {}
    from slimtorch.export.gguf_mix import mix_type

    out: Counter[str] = Counter()
    layers = max((int(p.name.split(".")[1]) + 1 for p in planned if p.name.startswith("blk.")),
                 default=0)  # fmt: skip
    head = (
        "output.weight" if any(p.name == "output.weight" for p in planned) else "token_embd.weight"
    )
    for p in planned:
        if p.how in ("encoded", "requantized") and p.data.ndim == 2:
            wanted = mix_type(mix, p.name, layers, p.name == head)
            if wanted != p.ggml_type:
                out[f"{wanted}->{p.ggml_type}"] += 1
    return dict(sorted(out.items()))
