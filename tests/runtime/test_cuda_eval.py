"""``--device`` for measuring: ``slimtorch eval``, ``generate`` and the latency of ``compress``.

The CPU tests check the placement logic (``meta`` stands in for another device: shapes flow
through a Linear there, a CPU input would not); the ``cuda`` tests (skipped without a GPU)
measure a GPTQ artifact on the GPU against the same measurements on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from slimtorch.core.context import Context
from slimtorch.eval.latency import measure_latency_ms, model_device, to_device
from slimtorch.workflows.generate import on_device

HAS_CUDA = torch.cuda.is_available()
META = torch.device("meta")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (CI has none)")


def test_latency_feeds_the_inputs_on_the_model_device() -> None:
    net = nn.Sequential(nn.Linear(8, 4), nn.ReLU()).to(META)
    with pytest.raises((RuntimeError, NotImplementedError)):
        net(torch.randn(2, 8))  # what the CPU inputs of example_inputs_for did on a GPU model
    assert measure_latency_ms(net, (torch.randn(2, 8),), warmup=1, repeats=2) >= 0.0
    assert model_device(net) == META and model_device(nn.ReLU()) == torch.device("cpu")
    buffered = nn.BatchNorm1d(3, affine=False).to(META)  # no parameters: its buffers say
    assert model_device(buffered) == META


def test_to_device_walks_nested_inputs() -> None:
    x = torch.ones(2)
    moved = to_device(({"ids": x, "n": 3}, [x, None], "text"), META)
    assert moved[0]["ids"].device == META and moved[0]["n"] == 3
    assert moved[1][0].device == META and moved[1][1] is None and moved[2] == "text"
    assert to_device((x,), torch.device("cpu"))[0] is x  # on the CPU: the same tensor


def test_on_device_leaves_the_cpu_default_untouched() -> None:
    net = nn.Linear(2, 2)
    weight = net.weight
    assert on_device(net, Context(progress=False)) is net and net.weight is weight


# ---------------------------------------------------------------------------- on a GPU


def _artifact(tmp_path: Path) -> tuple[Path, str]:
    """A tiny Llama checkpoint compressed offloaded with GPTQ w4 (on the CPU); the text file
    to measure perplexity on (this repository's README: present on any machine)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtorch.recipe import load_recipe
    from slimtorch.workflows.offloaded import compress_large

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    recipe = load_recipe({"stages": [{"method": "quantize.gptq", "bits": 4, "group_size": 32,
                                      "calibration": {"samples": 4, "batch_size": 2}}]})  # fmt: skip
    compress_large(tmp_path / "ckpt", recipe, tmp_path / "art", None, 10**10, tmp_path / "w",
                   Context(progress=False), tokenizer="builtin:austen-lm")  # fmt: skip
    text = tmp_path / "readme.txt"
    text.write_text((Path(__file__).resolve().parents[2] / "README.md").read_text())
    return tmp_path / "art", str(text)


@pytest.mark.cuda
@needs_cuda
def test_eval_on_cuda_matches_the_cpu(tmp_path: Path) -> None:
    """``eval --device cuda``: the artifact and its original run on the GPU (no device
    mismatch anywhere: latency, perplexity, decoding on the int4 kernel), and perplexity
    agrees with the CPU's within float32 rounding (stated bound: 1e-3 relative)."""
    from slimtorch.workflows.evaluate import evaluate_dir

    art, text = _artifact(tmp_path)
    kw: dict[str, Any] = {"data": text, "tokenizer": "builtin:austen-lm", "llm_suite": (0, 64)}
    gpu = evaluate_dir(art, ctx=Context(device="cuda", progress=False), **kw)
    cpu = evaluate_dir(art, ctx=Context(progress=False), **kw)
    assert gpu["metric"] == cpu["metric"] == "perplexity"
    assert gpu["value"] == pytest.approx(cpu["value"], rel=1e-3)
    assert gpu["baseline_value"] == pytest.approx(cpu["baseline_value"], rel=1e-3)
    assert gpu["latency_ms"] > 0 and gpu["tokens_per_s"] > 0 and gpu["baseline_tokens_per_s"] > 0
    assert gpu["decode_kernel_layers"] == cpu["decode_kernel_layers"] > 0


@pytest.mark.cuda
@needs_cuda
def test_generate_and_compress_measure_on_cuda(tmp_path: Path) -> None:
    """``generate --device cuda`` decodes on the GPU; ``compress --device cuda`` measures the
    original's and the reloaded artifact's latency there (they were left on the CPU before,
    beside inputs on the GPU)."""
    from slimtorch.workflows.compress import CompressOptions, compress_to_dir
    from slimtorch.workflows.generate import generate_dir

    art, text = _artifact(tmp_path)
    ctx = Context(device="cuda", progress=False)
    out = generate_dir(art, "It is a truth", 8, tokenizer="builtin:austen-lm", ctx=ctx)
    assert 0 < out["new_tokens"] <= 8 and out["tokens_per_s"] > 0
    rtn = tmp_path / "rtn.yaml"
    rtn.write_text("stages:\n  - method: quantize.rtn\n    bits: 4\n    group_size: 32\n")
    options = CompressOptions(data=text, tokenizer="builtin:austen-lm", llm_windows=0)
    report = compress_to_dir(str(tmp_path / "ckpt"), str(rtn), tmp_path / "rtn", options, ctx)
    assert report["latency_ms"] > 0 and report["baseline_latency_ms"] > 0
