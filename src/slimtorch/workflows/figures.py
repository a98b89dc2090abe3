"""The figures shared by the compress and evaluate reports.

For a causal LM with a tokenizer, :func:`llm_figures` adds the LLM quality suite: perplexity of
the compressed and the original model and the KL divergence of the compressed model's next-token
distribution from the original's (:mod:`slimtorch.eval.divergence`, as llama.cpp's
``llama-perplexity --kl-divergence`` reports it), on :data:`LLM_WINDOWS` windows of
:data:`LLM_WINDOW_TOKENS` tokens (at most the model's context) from evenly spaced places of the
held-out split of each of :data:`LLM_TEXTS`, under the model's own tokenizer. The top-level keys
pool every window of both texts; ``llm_suite`` holds each text's own figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from slimtorch import api
from slimtorch.calibrate.text import TOKEN_WINDOWS, tokenizer_file
from slimtorch.core.context import Context
from slimtorch.eval.decode import (
    NEW_TOKENS,
    PROMPT_TOKENS,
    cannot_generate,
    decode_tokens_per_s,
    is_causal_lm,
    random_prompt,
)
from slimtorch.eval.divergence import DivergenceStats, compare
from slimtorch.eval.perplexity import model_context

LLM_TEXTS = ("builtin:wikipedia", "builtin:austen")
LLM_WINDOWS = 8  # per text: 2 x 8 x 512 = 8,192 tokens, CPU-sized
LLM_WINDOW_TOKENS = 512
LLM_KEYS = ("perplexity", "kld_mean", "kld_p99", "top1_agreement")


def baseline(measured: dict[str, Any]) -> dict[str, Any]:
    """The original model's figures, as ``baseline_*`` keys of a report."""
    keys = ("value", "latency_ms", "params", "nonzero_params")
    return {f"baseline_{k}": measured.get(k) for k in keys}


def summary(out: Path, measured: dict[str, Any], dense_bytes: int) -> dict[str, Any]:
    """Size on disk against the fp32 size, and the measured figures."""
    on_disk = api.artifact_size(out)
    return {
        "bytes_on_disk": on_disk,
        "dense_bytes": dense_bytes,
        "compression_ratio": dense_bytes / on_disk if on_disk else None,
        **measured,
    }


def vocab_size(model: nn.Module) -> int | None:
    """``config.vocab_size`` of a transformers model, else None."""
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    return value if isinstance(value, int) else None


def llm_figures(
    model: nn.Module,
    base: nn.Module,
    tokenizer: str,
    ctx: Context,
    suite: tuple[int, int] = (LLM_WINDOWS, LLM_WINDOW_TOKENS),
) -> dict[str, Any]:
    """The LLM quality suite of ``model`` against ``base`` (``suite``: windows per text,
    tokens per window): ``perplexity``, ``baseline_perplexity``, ``kld_mean``, ``kld_p99``,
    ``top1_agreement`` over all windows, and ``llm_suite`` per text."""
    n, length = suite[0], min(suite[1], model_context(base))
    path = tokenizer_file(tokenizer)
    pooled, per_text = DivergenceStats(), {}
    for text in LLM_TEXTS:
        windows = TOKEN_WINDOWS.get("heldout")(text, path, n, length)
        stats = compare(model, base, windows, ctx.device)
        pooled.extend(stats)
        per_text[text] = {**stats.summary(), "windows": float(windows.shape[0])}
    figures = pooled.summary()
    return {
        **figures,
        "llm_suite": {
            "texts": per_text,
            "window_tokens": length,
            "windows_per_text": n,
            "tokenizer": tokenizer,
        },
    }


def decode_figures(model: nn.Module, base: nn.Module | None) -> dict[str, Any]:
    """Decoding speed of a causal LM (``model``) and of its original (``base``, if given):
    ``tokens_per_s`` and ``baseline_tokens_per_s`` of greedy decoding, batch 1, KV cache,
    :data:`~slimtorch.eval.decode.NEW_TOKENS` new tokens after a prompt of
    :data:`~slimtorch.eval.decode.PROMPT_TOKENS` token ids drawn from the vocabulary with a
    fixed seed (the same prompt for both). Empty for a model that is not a causal LM; a causal
    LM whose ``generate()`` cannot run gets ``decode_skipped`` with the reason."""
    if not is_causal_lm(model):
        return {}
    vocab = vocab_size(model)
    reason = cannot_generate(model) or (None if vocab else "its config has no vocab_size")
    if reason is not None or vocab is None:
        return {"decode_skipped": reason}
    prompt = random_prompt(vocab, PROMPT_TOKENS)
    figures: dict[str, Any] = {"tokens_per_s": decode_tokens_per_s(model, prompt, NEW_TOKENS)}
    if base is not None and cannot_generate(base) is None:
        figures["baseline_tokens_per_s"] = decode_tokens_per_s(base, prompt, NEW_TOKENS)
    return figures
