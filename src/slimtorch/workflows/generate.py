"""Greedy text and decoding speed of a saved causal LM (``slimtorch generate DIR``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimtorch import api
from slimtorch.calibrate.text import missing_tokenizer, tokenizer_file
from slimtorch.core.errors import UserInputError
from slimtorch.core.info import model_info
from slimtorch.eval.decode import cannot_generate, generate_text, load_tokenizer
from slimtorch.models.registry import load_model


def generate_dir(
    path: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    tokenizer: str | None = None,
    model: str | None = None,
    trust_factory: bool = False,
    kernels: bool = False,
) -> dict[str, Any]:
    """The greedy continuation of ``prompt`` by the causal LM saved at ``path`` (KV cache, at
    most ``max_new_tokens`` tokens, stopping at the end-of-sequence token), tokenized with
    ``tokenizer`` (a ``tokenizer.json``, a directory holding one, or ``builtin:NAME``; default:
    the one the artifact records). ``model``/``trust_factory`` as for ``slimtorch eval``;
    ``kernels`` runs 2-4-bit weight-only layers on torch's int4 CPU kernel and 8-bit ones on
    its int8 kernel. Returns ``prompt``,
    ``text`` (the continuation), ``new_tokens``, ``seconds``, ``tokens_per_s``, ``tokenizer``."""
    if max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    path = api.require_dir(path)
    given = load_model(model).model if model is not None else None
    loaded = api.load(path, kernels=kernels, model=given, trust_factory=trust_factory)
    reason = cannot_generate(loaded)
    if reason is not None:
        raise UserInputError(f"cannot generate text with {path}: {reason}")
    spec = tokenizer or model_info(loaded).tokenizer
    if spec is None:
        raise missing_tokenizer(str(path))
    result = generate_text(loaded, load_tokenizer(tokenizer_file(spec)), prompt, max_new_tokens)
    return {"dir": str(path), "prompt": prompt, **result, "tokenizer": spec}
