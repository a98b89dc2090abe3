"""Greedy text and decoding speed of a saved causal LM (``slimtorch generate DIR``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from slimtorch import api
from slimtorch.calibrate.text import missing_tokenizer, tokenizer_file
from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.core.info import model_info
from slimtorch.eval.decode import cannot_generate, generate_text, load_tokenizer
from slimtorch.models.registry import load_model
from slimtorch.runtime.kv_quant import KVQuantConfig


def on_device(model: nn.Module, ctx: Context) -> nn.Module:
    """``model`` moved to ``ctx.device`` (``--device``) for measuring or decoding; on the CPU
    (the default, where artifacts load) it is returned untouched."""
    if ctx.device == "cpu":
        return model
    return model.to(ctx.torch_device)


def kv_config(
    bits: int | None, group: int | None = None, window: int | None = None
) -> KVQuantConfig | None:
    """The quantized KV cache's settings (``--kv-bits``, ``--kv-group``, ``--kv-window``; the
    last two default to 32 and 128), or None without ``bits``; a group or window without bits
    is an error."""
    if bits is None:
        if group is not None or window is not None:
            raise UserInputError("--kv-group / --kv-window need --kv-bits (8, 4 or 2)")
        return None
    return KVQuantConfig(bits, 32 if group is None else group, 128 if window is None else window)


def generate_dir(
    path: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    tokenizer: str | None = None,
    model: str | None = None,
    trust_factory: bool = False,
    kernels: bool = False,
    kv: tuple[int | None, int | None, int | None] = (None, None, None),
    ctx: Context | None = None,
) -> dict[str, Any]:
    """The greedy continuation of ``prompt`` by the causal LM saved at ``path`` (KV cache, at
    most ``max_new_tokens`` tokens, stopping at the end-of-sequence token), tokenized with
    ``tokenizer`` (a ``tokenizer.json``, a directory holding one, or ``builtin:NAME``; default:
    the one the artifact records). ``model``/``trust_factory`` as for ``slimtorch eval``;
    ``kernels`` runs 2-4-bit weight-only layers on torch's int4 CPU kernel and 8-bit ones on
    its int8 kernel. ``kv`` = ``(bits, group, window)`` decodes with the quantized KV cache
    (:func:`kv_config`). Returns ``prompt``, ``text`` (the continuation), ``new_tokens``,
    ``seconds``, ``tokens_per_s``, ``tokenizer`` and with ``kv`` ``kv_cache`` (settings, bytes
    per token against the float cache's). The model runs on ``ctx.device`` (default: the CPU);
    ``kernels`` there picks each layer's kernel for that device (torch's CUDA int4 kernel on a
    GPU of compute capability 8.0 or newer, the dequantized product where none applies)."""
    if max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    quant = kv_config(*kv)
    path = api.require_dir(path)
    given = load_model(model).model if model is not None else None
    loaded = api.load(path, kernels=kernels, model=given, trust_factory=trust_factory)
    loaded = on_device(loaded, ctx or Context(progress=False))
    reason = cannot_generate(loaded)
    if reason is not None:
        raise UserInputError(f"cannot generate text with {path}: {reason}")
    spec = tokenizer or model_info(loaded).tokenizer
    if spec is None:
        raise missing_tokenizer(str(path))
    tok = load_tokenizer(tokenizer_file(spec))
    result = generate_text(loaded, tok, prompt, max_new_tokens, kv=quant)
    return {"dir": str(path), "prompt": prompt, **result, "tokenizer": spec}
