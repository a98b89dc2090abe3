"""Decoding speed and greedy text of a causal LM: tokens per second of the model's own
``generate`` (greedy, KV cache, a fixed count of new tokens), and the greedy continuation of a
prompt under its tokenizer."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import UserInputError
from slimtorch.eval.latency import synchronize

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
PROMPT_TOKENS = 64
NEW_TOKENS = 128
WARMUP_TOKENS = 8


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers causal LM (class name ending in ForCausalLM or
    LMHeadModel)."""
    return type(model).__name__.endswith(CAUSAL_SUFFIXES)


def cannot_generate(model: nn.Module) -> str | None:
    """Why ``model.generate`` cannot decode, or None when it can."""
    if not is_causal_lm(model):
        return f"{type(model).__name__} is not a causal LM"
    if not callable(getattr(model, "generate", None)):
        return f"{type(model).__name__} has no generate()"
    if getattr(model, "generation_config", None) is None:
        return f"{type(model).__name__} has no generation_config"
    return None


def random_prompt(vocab_size: int, tokens: int = PROMPT_TOKENS, seed: int = 0) -> torch.Tensor:
    """A deterministic ``(1, tokens)`` prompt of token ids drawn uniformly from ``vocab_size``
    with a generator seeded ``seed`` (the global RNG is untouched)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, tokens), generator=generator)


def _greedy(
    model: nn.Module, ids: torch.Tensor, new_tokens: int, exact: bool, cache: Any = None
) -> torch.Tensor:
    """The new tokens of ``model.generate`` run greedily with the KV cache (``cache``: a
    transformers ``Cache`` to fill, default: the model's own): at most ``new_tokens``, exactly
    that many when ``exact`` (the end-of-sequence token is ignored)."""
    config: Any = model.generation_config
    more = {} if cache is None else {"cache": cache}
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    out: torch.Tensor = model.generate(  # type: ignore[operator]
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        use_cache=True,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens if exact else None,
        pad_token_id=pad if pad is not None else 0,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        **more,
    )
    return out[:, ids.shape[1] :]


def _seconds(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    _greedy(model, ids, new_tokens, exact=True)
    synchronize(ids.device)  # a CUDA device runs ahead of the clock
    return time.perf_counter() - start


def decode_tokens_per_s(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    new_tokens: int = NEW_TOKENS,
    warmup: int = 1,
    repeats: int = 3,
) -> float:
    """Median tokens per second of greedy decoding with the KV cache (batch of ``prompt_ids``)
    of ``new_tokens`` tokens after the prompt, over ``repeats`` runs after ``warmup`` runs (of
    :data:`WARMUP_TOKENS` tokens at most). The prompt's prefill is left out, as llama.cpp's
    "eval" rate does: each run also times a generation of one token (prefill + first token),
    and the rate is ``(new_tokens - 1) / (full run - one-token run)``."""
    reason = cannot_generate(model)
    if reason is not None:
        raise UserInputError(f"cannot measure decoding speed: {reason}")
    if new_tokens < 2:
        raise UserInputError(f"decoding speed needs at least 2 new tokens, not {new_tokens}")
    model.eval()
    device = next(model.parameters()).device
    ids = prompt_ids.to(device)
    rates = []
    with torch.inference_mode():
        for _ in range(warmup):  # short: it only has to touch every weight and kernel once
            _greedy(model, ids, min(new_tokens, WARMUP_TOKENS), exact=True)
        for _ in range(repeats):
            first = _seconds(model, ids, 1)
            full = _seconds(model, ids, new_tokens)
            rates.append(ids.shape[0] * (new_tokens - 1) / max(full - first, 1e-9))
    return float(statistics.median(rates))


def load_tokenizer(path: str | Path) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def generate_text(
    model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, kv: Any = None
) -> dict[str, Any]:
    """The greedy continuation of ``prompt`` (``tokenizer``: a ``tokenizers.Tokenizer``) with
    the KV cache, stopping at the end-of-sequence token: ``text`` (the continuation alone),
    ``new_tokens``, ``seconds`` and ``tokens_per_s``. ``kv`` (a
    :class:`~slimtorch.runtime.kv_cache.KVQuantConfig`) decodes with the quantized KV cache
    and adds ``kv_cache``: its settings and bytes per token against the float cache's."""
    reason = cannot_generate(model)
    if reason is not None:
        raise UserInputError(f"cannot generate text: {reason}")
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.encode(prompt).ids], dtype=torch.long, device=device)
    if ids.shape[1] == 0:
        raise UserInputError("the prompt is empty after tokenization: give some text")
    cache = None
    if kv is not None:
        from slimtorch.runtime.kv_cache import QuantizedKVCache

        cache = QuantizedKVCache(getattr(model, "config", None), kv)
    with torch.inference_mode():
        start = time.perf_counter()
        out = _greedy(model, ids, max_new_tokens, exact=False, cache=cache)
        synchronize(ids.device)
        seconds = time.perf_counter() - start
    new = out[0].tolist()
    result = {
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "new_tokens": len(new),
        "seconds": seconds,
        "tokens_per_s": len(new) / seconds if seconds > 0 else None,
    }
    if cache is not None:
        from slimtorch.runtime.kv_cache import describe

        dtype = next(model.parameters()).dtype
        result["kv_cache"] = describe(cache, getattr(model, "config", None), dtype)
    return result
