"""The offloaded half of bench/device_check.py (see its docstring): offloaded GPTQ
(``--max-memory``, :func:`slimtorch.workflows.offloaded.compress_large`) on the GPU and on the
CPU from the same checkpoint and calibration text, and ``slimtorch eval --device cuda`` of the
GPU artifact against the same evaluation on the CPU.

The checkpoint is the run's model saved as a Hugging Face directory (safetensors). Calibration
and perplexity text: this repository's README.md and docs/*.md (present on any machine the
checkout reaches), tokenized with ``builtin:austen-lm``'s tokenizer (in the repository: its
2,048 ids fit any model of at least that vocabulary; the dry run's tiny model gets 2,048). The
memory budget is generous (64 GB): the section checks where the offloaded path computes and
what it writes, not the budget's refusal (tests/workflows/test_workflow_offloaded.py does).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_speed import cuda_sync

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = "builtin:austen-lm"
TOKENIZER_VOCAB = 2048
BUDGET = 64 * 10**9


def ensure_zoo() -> None:
    """The bundled tokenizers and evaluators (the ``slimtorch.plugins`` entry point is missing
    where the package is not installed: ``src/`` on the path of a bare GPU machine)."""
    from slimtorch.calibrate.text import TOKENIZERS

    if "austen-lm" not in TOKENIZERS.names():
        importlib.import_module("slimtorch.zoo")


def write_text(path: Path) -> str:
    """The calibration / evaluation text: README.md and docs/*.md, joined."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files if f.is_file())
    path.write_text(text.encode("ascii", "ignore").decode(), encoding="utf-8")
    return str(path)


def save_checkpoint(model: Any, path: Path) -> Path:
    """``model`` as a safetensors Hugging Face directory (vocabulary raised to the tokenizer's
    for a smaller one: the dry run's tiny model, re-initialized with seed 0)."""
    import torch
    from transformers import LlamaForCausalLM

    if int(model.config.vocab_size) < TOKENIZER_VOCAB:
        config = model.config.__class__.from_dict(
            {**model.config.to_dict(), "vocab_size": TOKENIZER_VOCAB}
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def run_offloaded(ckpt: Path, out: Path, text: str, device: str, stage: dict[str, Any]) -> float:
    """Offloaded ``stage`` (GPTQ w4) of ``ckpt`` on ``device`` into ``out``; its seconds."""
    from slimtorch.core.context import Context
    from slimtorch.recipe import load_recipe
    from slimtorch.workflows.offloaded import compress_large

    recipe = load_recipe({"description": "device check: offloaded GPTQ w4", "stages": [stage]})
    ctx = Context(device=device, progress=False)
    cuda_sync()
    start = time.perf_counter()
    compress_large(ckpt, recipe, out, text, BUDGET, out.parent / f".{out.name}.work", ctx,
                   force=True, tokenizer=TOKENIZER)  # fmt: skip
    cuda_sync()
    return time.perf_counter() - start


EVAL_KEYS = ("metric", "value", "baseline_value", "latency_ms", "baseline_latency_ms",
             "tokens_per_s", "baseline_tokens_per_s", "decode_kernel_layers")  # fmt: skip


def run_eval(art: Path, text: str, device: str, full: bool) -> dict[str, Any]:
    """``evaluate_dir`` of ``art`` on ``device`` (``full``: with the original and decoding
    speed; else the artifact's perplexity and latency alone)."""
    from slimtorch.core.context import Context
    from slimtorch.workflows.evaluate import evaluate_dir

    start = time.perf_counter()
    report = evaluate_dir(
        art, text, Context(device=device, progress=False), baseline=full, tokenizer=TOKENIZER,
        llm_suite=(0, 64), decode=full,
    )  # fmt: skip
    cuda_sync()
    return {"seconds": time.perf_counter() - start, **{k: report.get(k) for k in EVAL_KEYS}}


def offloaded_section(
    model: Any, device: str, stage: dict[str, Any], compare: Callable[[Any, Any], Any], work: Path
) -> dict[str, Any]:
    """Offloaded ``stage`` on ``device`` and on the CPU (codes compared by ``compare``, the
    ``gptq`` section's), then the device's artifact evaluated on ``device`` and on the CPU."""
    import slimtorch as st

    ensure_zoo()
    work.mkdir(parents=True, exist_ok=True)
    text = write_text(work / "text.txt")
    ckpt = save_checkpoint(model, work / "ckpt")
    out: dict[str, Any] = {"device": device, "stage": stage, "max_memory": BUDGET}
    out["seconds_device"] = run_offloaded(ckpt, work / "gpu", text, device, stage)
    out["seconds_cpu"] = run_offloaded(ckpt, work / "cpu", text, "cpu", stage)
    same = compare(st.load(work / "gpu"), st.load(work / "cpu"))
    out.update({k: v for k, v in same.items() if k != "layers"})
    gpu = run_eval(work / "gpu", text, device, full=True)
    cpu = run_eval(work / "gpu", text, "cpu", full=False)
    rel = abs(gpu["value"] - cpu["value"]) / abs(cpu["value"]) if cpu["value"] else None
    out["eval"] = {"device": gpu, "cpu": cpu, "perplexity_rel_diff": rel}
    return out
