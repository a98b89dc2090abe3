"""Measure an artifact and, when its source is known, the original model beside it, on the
context's device (``--device``): both models are moved there after loading, and every
measurement (latency, quality, the LLM suite, decoding) feeds its inputs there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimtorch import api
from slimtorch.artifact.kernels import use_kernels
from slimtorch.calibrate.text import model_tokenizer, tokenizer_file
from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.core.info import model_info, update_info
from slimtorch.eval.decode import cannot_generate
from slimtorch.eval.kv_quality import kv_suite
from slimtorch.eval.perplexity import model_context
from slimtorch.models.registry import LoadedModel, load_model, untrusted_factory_message
from slimtorch.runtime.kv_quant import KVQuantConfig
from slimtorch.workflows.figures import (
    LLM_TEXTS,
    LLM_WINDOW_TOKENS,
    LLM_WINDOWS,
    decode_figures,
    llm_figures,
    summary,
)
from slimtorch.workflows.figures import baseline as baseline_figures
from slimtorch.workflows.generate import kv_config, on_device


def names_code(spec: str) -> bool:
    """Whether the model spec ``spec`` is a ``package.module:factory`` (loading it runs code)."""
    return not spec.startswith("builtin:") and ":" in spec and not Path(spec).exists()


def _original(source: str, model: str | None, trust_factory: bool) -> LoadedModel:
    """The original model: the one the user names, else the source the artifact records (a
    source that names Python code is imported only when the user trusts the artifact)."""
    if model is not None:
        return load_model(model)
    if names_code(source) and not trust_factory:
        raise UserInputError(untrusted_factory_message(source))
    return load_model(source)


def _kv_figures(
    model: Any, tokenizer: str | None, kv: KVQuantConfig, suite: tuple[int, int]
) -> dict[str, Any]:
    """The quantized KV cache's figures (:func:`slimtorch.eval.kv_quality.kv_suite`)."""
    reason = cannot_generate(model)
    if reason is not None:
        raise UserInputError(f"--kv-bits needs a causal LM: {reason}")
    if tokenizer is None:
        raise UserInputError("--kv-bits needs the model's tokenizer: give --tokenizer")
    path = tokenizer_file(tokenizer)
    length = min(suite[1], model_context(model))
    return kv_suite(model, path, kv, (suite[0], length), LLM_TEXTS)


def evaluate_dir(
    path: str | Path,
    data: str | None = None,
    ctx: Context | None = None,
    latency_batch: int = 1,
    baseline: bool = True,
    width: float | None = None,
    model: str | None = None,
    trust_factory: bool = False,
    tokenizer: str | None = None,
    llm_suite: tuple[int, int] = (LLM_WINDOWS, LLM_WINDOW_TOKENS),
    decode: bool = True,
    kernels: bool = True,
    kv: tuple[int | None, int | None, int | None] = (None, None, None),
) -> dict[str, Any]:
    """Measure an artifact and, when its source is known, the original model beside it.
    ``width`` serves a ``prune.reorder``-ed artifact on that fraction of its channels.
    ``model`` (a model spec) gives the architecture of an artifact of a Python factory, and
    the original to compare with; ``trust_factory`` lets the artifact's recorded factory run.
    ``tokenizer`` (a causal LM's ``tokenizer.json`` or ``builtin:NAME``) replaces the one the
    artifact records; with a tokenizer and the original, a causal LM also gets the LLM quality
    suite (:func:`slimtorch.workflows.figures.llm_figures`; ``llm_suite``: windows per text and
    tokens per window, 0 windows to skip it). ``decode`` adds a causal LM's decoding speed,
    ``tokens_per_s`` and ``baseline_tokens_per_s``
    (:func:`slimtorch.workflows.figures.decode_figures`), measured as the artifact is served:
    with ``kernels`` (default) on a second copy whose weight-only quantized layers run on
    torch's int4 / int8 CPU kernels (``decode_kernel_layers`` counts them; quality figures
    always come from the exactly dequantized model). ``kv`` = ``(bits, group, window)`` adds
    ``kv_cache``: a causal LM's quality with the quantized KV cache against its float cache on
    the LLM suite's windows and bytes per token
    (:func:`slimtorch.eval.kv_quality.kv_suite`)."""
    ctx = ctx or Context()
    quant = kv_config(*kv)
    if quant is not None and llm_suite[0] < 1:
        raise UserInputError("--kv-bits scores the LLM suite's windows: give --llm-windows >= 1")
    path = api.require_dir(path)
    given = load_model(model).model if model is not None else None
    loaded = on_device(api.load(path, width=width, model=given, trust_factory=trust_factory), ctx)
    info = model_info(loaded)
    if tokenizer is not None:
        tokenizer_file(tokenizer)  # a bad --tokenizer fails before anything is measured
        update_info(loaded, tokenizer=tokenizer)
    measured = api.evaluate(loaded, data=data, ctx=ctx, latency_batch=latency_batch)
    report = summary(path, measured, int(info.dense_bytes or 0))
    report["source"] = info.source
    if width is not None:
        report["width"] = width
    original = None
    if baseline and info.source:
        original = _original(info.source, model, trust_factory)
        original.model = on_device(original.model, ctx)
        update_info(
            original.model,
            architecture=original.architecture,
            evaluator=info.evaluator,
            data=info.data,
            input=info.input,
            tokenizer=info.tokenizer,
        )
        base = api.evaluate(original.model, data=data, ctx=ctx, latency_batch=latency_batch)
        report.update(baseline_figures(base))
        tok = info.tokenizer or model_tokenizer(info.source, original.tokenizer)
        if original.task == "causal-lm" and tok is not None and llm_suite[0] > 0:
            report.update(llm_figures(loaded, original.model, tok, ctx, llm_suite))
    if quant is not None:
        report["kv_cache"] = _kv_figures(loaded, info.tokenizer or tokenizer, quant, llm_suite)
    if decode:
        served = loaded
        if kernels:
            served = api.load(path, width=width, model=given, trust_factory=trust_factory)
            report["decode_kernel_layers"] = len(use_kernels(served))  # swapped on the CPU
            served = on_device(served, ctx)
        report.update(decode_figures(served, original.model if original is not None else None))
    return report
