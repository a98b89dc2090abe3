"""Shared pieces of the LLM peer benchmark (bench/bench_llm_peers.py): the methods, the one
calibration tensor every implementation is fed, the one perplexity function every result is
scored with, and the JSON line each runner prints.

Every runner (``peer_ours``, ``peer_papers``, ``peer_gptqmodel``, ``peer_llmcompressor``) runs
in its own process as ``python bench/peer_X.py METHOD --calib FILE [...]``, loads
``builtin:austen-lm`` fresh, times only its compression call, scores the result with
:func:`perplexity` (slimtorch's GPTQ-protocol evaluator on the held-out Austen ids) and prints
one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import harness

WINDOW = 256
HELDOUT = "builtin:austen"


@dataclass(frozen=True)
class Method:
    """One row of the table: a GPTQ bit width, or a pruning method at a sparsity / N:M."""

    key: str
    kind: str  # "gptq" | "sparsegpt" | "wanda"
    label: str
    bits: int = 0
    sparsity: float = 0.0
    n: int = 0
    m: int = 0


GROUP = 128  # GPTQ: input columns per group
DAMP = 0.01  # fraction of mean diag(H) added before the Cholesky factorisation
BLOCK = 128  # lazy-update block of columns (GPTQ, SparseGPT)

METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method("gptq-w4", "gptq", f"GPTQ w4 g{GROUP}", bits=4),
        Method("gptq-w3", "gptq", f"GPTQ w3 g{GROUP}", bits=3),
        Method("sparsegpt-50", "sparsegpt", "SparseGPT 50%", sparsity=0.5),
        Method("sparsegpt-2of4", "sparsegpt", "SparseGPT 2:4", sparsity=0.5, n=2, m=4),
        Method("wanda-50", "wanda", "Wanda 50%", sparsity=0.5),
        Method("wanda-2of4", "wanda", "Wanda 2:4", sparsity=0.5, n=2, m=4),
    )
}


def load_builtin() -> nn.Module:
    """A fresh ``builtin:austen-lm`` (LlamaForCausalLM, eval mode, float32)."""
    from slimtorch.models.registry import load_model

    return load_model("builtin:austen-lm").model


def weights_dir() -> Path:
    """The builtin's Hugging Face directory (config.json, model.safetensors, tokenizer.json)."""
    from slimtorch.zoo.austen_lm import WEIGHTS_DIR

    return Path(WEIGHTS_DIR)


def make_calibration(samples: int, seed: int, batch_size: int = 8) -> torch.Tensor:
    """``[samples, 256]`` int64: exactly the windows ``quantize.gptq`` draws in bench_llm.py
    (``CausalLMTask.train_batches`` with ``Context(seed)``, batches of ``batch_size``)."""
    from slimtorch.calibrate.lm import CausalLMTask
    from slimtorch.core.context import Context
    from slimtorch.zoo.tasks import LM_DATA as DEFAULT_DATA
    from slimtorch.zoo.tasks import lm_train_ids as train_ids

    task = CausalLMTask(train_ids(DEFAULT_DATA), window=WINDOW)
    steps = -(-samples // batch_size)
    batches = [b[0] for b in task.train_batches(Context(seed=seed), steps, batch_size)]
    return torch.cat(batches)[:samples].contiguous()


def save_ids(ids: torch.Tensor, path: Path) -> None:
    save_file({"input_ids": ids.contiguous()}, str(path))


def load_ids(path: Path, dim: int) -> torch.Tensor:
    ids = load_file(str(path))["input_ids"]
    if ids.dim() != dim or ids.dtype != torch.int64:
        raise ValueError(f"{path}: expected {dim}-D int64 input_ids, got {ids.dtype} {ids.shape}")
    return ids


def heldout_ids() -> torch.Tensor:
    """The held-out Austen ids ``evaluate_perplexity`` scores (builtin tokenizer)."""
    from slimtorch.zoo.austen_lm import builtin_tokenizer_path, encoded_split

    return encoded_split(HELDOUT, "heldout", str(builtin_tokenizer_path()))


def perplexity(model: nn.Module, ids: torch.Tensor) -> float:
    """slimtorch's GPTQ-protocol perplexity of the held-out ``ids`` (non-overlapping
    256-token windows, ``slimtorch.eval.perplexity.perplexity_of_ids``)."""
    from slimtorch.eval.perplexity import perplexity_of_ids

    nll, _ = perplexity_of_ids(model, ids, WINDOW)
    return math.exp(nll)


def sparsity_of_blocks(model: nn.Module) -> float:
    """Fraction of exact zeros over the Linear weights of the decoder blocks."""
    zeros = total = 0
    for name, module in model.named_modules():
        if ".layers." in f".{name}" and hasattr(module, "weight") and "proj" in name:
            weight = module.weight
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                zeros += int((weight == 0).sum())
                total += weight.numel()
    return zeros / max(total, 1)


def _lm_head(model: nn.Module) -> torch.Tensor:
    weight: Any = model.get_output_embeddings().weight  # type: ignore[operator]
    return weight.detach().clone()


def runner_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("method", choices=sorted(METHODS))
    parser.add_argument("--calib", type=Path, required=True, help="calibration ids [n, L]")
    parser.add_argument("--heldout", type=Path, required=True, help="held-out ids [N]")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--peers-dir", type=Path, default=Path("/tmp/peers"))
    parser.add_argument("--profile", type=Path, default=None, help="cProfile the call to FILE")
    return parser.parse_args()


def run_one(
    impl: str,
    description: str,
    compress: Callable[[nn.Module, torch.Tensor, Method, argparse.Namespace], nn.Module],
    load: Callable[[], nn.Module] = load_builtin,
    finish: Callable[[nn.Module], nn.Module] | None = None,
) -> None:
    """The runner's main: load, time ``compress`` alone, score, print ``RESULT {json}``.
    ``finish`` (untimed) turns the compressed model into the one to score (save + reload)."""
    args = runner_args(description)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    method = METHODS[args.method]
    calib = load_ids(args.calib, 2)
    heldout = load_ids(args.heldout, 1)
    model = load()
    head = _lm_head(model)
    if head.is_meta:  # gptqmodel loads lazily: compare with the builtin's head
        head = _lm_head(load_builtin())
    profiler = None
    if args.profile is not None:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    with harness.stopwatch() as t:
        compressed = compress(model, calib, method, args)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(str(args.profile))
    if finish is not None:
        compressed = finish(compressed)
    row: dict[str, Any] = {
        "implementation": impl,
        "method": method.label,
        "key": method.key,
        "perplexity": perplexity(compressed, heldout),
        "seconds": round(t.seconds, 2),
        "block_sparsity": round(sparsity_of_blocks(compressed), 4),
        "lm_head_unchanged": bool(torch.equal(head, _lm_head(compressed))),
        "threads": torch.get_num_threads(),
        "samples": int(calib.shape[0]),
        "settings": asdict(method),
        "pid": os.getpid(),
    }
    print("RESULT " + json.dumps(row), flush=True)
