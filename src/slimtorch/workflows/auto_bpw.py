"""``slimtorch auto --max-bpw B`` (or ``--to gguf``): per-tensor GGUF types for an LLM under a
bits-per-weight and/or file-size budget, chosen from a KL-divergence sensitivity scan, written
as a GGUF file that llama.cpp loads.

OUT holds the scan (:mod:`slimtorch.search.bpw_scan`: rerunning the command reuses it, tensor
by tensor), ``plan.json`` (each weight's type, its bytes and predicted KLD) and ``model.gguf``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimtorch.core.errors import UserInputError
from slimtorch.search.bpw import budget_bytes, check_max_bpw, parse_types, plan, summary
from slimtorch.search.profiles import parse_size

log = logging.getLogger(__name__)
PLAN_FILES = ("plan.json", "model.gguf", "auto.json")


@dataclass
class BpwJob:
    """One per-tensor GGUF type search: the model, the budgets and the scan."""

    model: str
    out: str
    max_bpw: str | float | None = None
    max_size: str | None = None
    data: str | None = None  # scan text: builtin:NAME or a .txt (default builtin:wikipedia)
    types: str | None = None  # comma-separated GGUF types (default search.bpw.DEFAULT_TYPES)
    samples: int = 16  # scan windows
    tokens: int = 256  # tokens per window
    imatrix: str | None = None  # llama-imatrix file for the rounding (default: the scan's)
    force: bool = False
    seed: int = 0


def _windows(job: BpwJob, model: torch.nn.Module) -> torch.Tensor:
    from slimtorch.calibrate.text import TOKEN_WINDOWS
    from slimtorch.export.gguf_vocab import find_tokenizer

    tok = find_tokenizer(model, None)
    if tok is None:
        raise UserInputError(f"{job.model} has no tokenizer.json: the scan reads text through it")
    ids = TOKEN_WINDOWS.get("train")(job.data or "builtin:wikipedia", tok, job.samples, job.tokens)
    return torch.as_tensor(ids, dtype=torch.long)


def _check(job: BpwJob) -> tuple[float | None, tuple[str, ...]]:
    max_bpw = None if job.max_bpw is None else check_max_bpw(job.max_bpw)
    if max_bpw is None and job.max_size is None:
        raise UserInputError("give --max-bpw or --max-size for the GGUF type plan")
    if job.samples < 1 or job.tokens < 2:
        raise UserInputError("--scan-samples must be at least 1 and --scan-tokens at least 2")
    return max_bpw, parse_types(job.types)


def auto_bpw(job: BpwJob) -> dict[str, Any]:
    """Scan (or resume the scan), plan under the budgets, write OUT/model.gguf; the report."""
    from slimtorch.core.info import update_info
    from slimtorch.export.gguf import check_model
    from slimtorch.export.gguf_mix import read_imatrix
    from slimtorch.models.registry import load_model
    from slimtorch.search.bpw_scan import SCAN_FILES, scan

    max_bpw, types = _check(job)
    out = Path(job.out)
    if job.force:
        for name in SCAN_FILES + PLAN_FILES:
            (out / name).unlink(missing_ok=True)
    imatrix = read_imatrix(job.imatrix) if job.imatrix else None
    loaded = load_model(job.model)
    model = loaded.model.eval()
    check_model(model)
    update_info(model, architecture=loaded.architecture, source=job.model)
    torch.manual_seed(job.seed)
    ids = _windows(job, model)
    settings = {"model": job.model, "data": job.data, "types": list(types), "draws": 1,
                "imatrix": job.imatrix,
                "samples": int(ids.shape[0]), "tokens": int(ids.shape[1]), "seed": job.seed}  # fmt: skip
    costs, importance, info = scan(model, ids, out, settings, imatrix)
    unique = {id(p): p for p in model.parameters()}.values()
    numel = sum(p.numel() for p in unique)
    fixed = sum(p.numel() * 4 for p in unique if p.dim() < 2)  # norms: F32
    max_bytes = None if job.max_size is None else parse_size(job.max_size, numel * 4)
    budget = (max_bpw, max_bytes, numel, fixed)
    result = _plan_and_write(job, model, costs, importance, budget, (ids[:1, :128],))
    result.update(scan=info, budgets={"max_bpw": max_bpw, "max_bytes": max_bytes},
                  model=job.model, candidate_types=list(types))  # fmt: skip
    (out / "auto.json").write_text(json.dumps(result, indent=1))
    return result


def _plan_and_write(
    job: BpwJob,
    model: torch.nn.Module,
    costs: Any,
    importance: Any,
    budget: tuple[Any, ...],
    inputs: tuple[torch.Tensor, ...],
) -> dict[str, Any]:
    from slimtorch.search.bpw_export import write_plan

    max_bpw, max_bytes, numel, fixed = budget
    out = Path(job.out)
    overhead = 0  # the file's bytes beyond its tensors (metadata, tokenizer), learnt on write
    for _ in range(2):
        limit = None if max_bytes is None else max_bytes - overhead
        assign = plan(costs, budget_bytes(max_bpw, numel, fixed, limit))
        if assign is None:
            smallest = summary(costs, {k: min(v, key=lambda t: v[t][0]) for k, v in costs.items()},
                               numel, fixed)  # fmt: skip
            raise UserInputError(
                f"no plan fits the budget: the smallest types take {smallest['bpw']:.3f} bits per"
                f" weight ({smallest['tensor_bytes'] + overhead:,} bytes); raise --max-bpw /"
                " --max-size or allow smaller types with --gguf-types"
            )
        figures = summary(costs, assign, numel, fixed)
        doc = {**figures, "types": assign}
        gguf = out / "model.gguf"
        previous = out / "plan.json"
        same = previous.is_file() and json.loads(previous.read_text()).get("types") == assign
        if same and gguf.is_file():
            written = json.loads(previous.read_text())["written"]
        else:
            log.info("plan: %.4f bpw, predicted KLD %.4g", figures["bpw"], figures["predicted_kld"])
            tmp_plan = out / "plan.tmp"
            written = write_plan(model, assign, gguf, importance, inputs)
            tmp_plan.write_text(json.dumps({**doc, "written": written}, indent=1))
            tmp_plan.replace(previous)
        overhead = written["bytes"] - written["tensor_bytes"]
        if max_bytes is None or written["bytes"] <= max_bytes:
            break
    else:
        for name in ("model.gguf", "plan.json"):
            (out / name).unlink(missing_ok=True)
        raise UserInputError(f"the planned file exceeds --max-size {job.max_size}; lower it")
    return {**doc, "written": written, "file_bpw": 8 * written["bytes"] / numel}
