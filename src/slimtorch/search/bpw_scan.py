"""The sensitivity scan of ``slimtorch auto --max-bpw``: the KL divergence to the base that each
GGUF type would add to each weight of an LLM, cached in OUT and resumed tensor by tensor.

The KL divergence of the quantized model's next-token distribution from the base's is, to
second order in the weight change ``dW``, ``1/2 sum F * dW^2`` with ``F`` the Fisher
information of the base's own distribution (its diagonal here). ``F`` is estimated on the scan
windows with labels drawn from the base itself (each position's token sampled from its
softmax): the square of the gradient of the summed log-likelihood of the drawn tokens is an
unbiased estimate of the summed per-position Fisher diagonal (the cross terms of independent
draws vanish in expectation). One forward and backward pass per window and draw, then every
(weight, type) pair costs only its encode: the encode the exporter runs, with the same
importance, so ``dW`` is the file's. The same forward passes record the importance of each
input (its mean square: llama.cpp's imatrix) that weights the rounding.

Files in OUT: ``scan.json`` (the settings; a changed setting starts the scan over, a changed type list or
imatrix only the encodes),
``fisher.safetensors`` (bfloat16), ``importance.safetensors``, ``scan.jsonl`` (one line per
weight: shape and ``{type: [bytes, predicted KLD]}``, appended as each finishes).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.export.gguf_mix import encode_typed
from slimtorch.export.gguf_plan import gguf_name
from slimtorch.search.bpw import tensor_bytes, type_options

log = logging.getLogger(__name__)
SCAN_FILES = ("scan.json", "fisher.safetensors", "importance.safetensors", "scan.jsonl")


def planned_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The 2-D weights of the file by GGUF name (a tied head once, as ``token_embd``)."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for hf, param in model.named_parameters():
        if param.dim() == 2 and id(param) not in seen:
            seen.add(id(param))
            out[gguf_name(hf)] = param
    return out


def _input_key(model: nn.Module, name: str, module: nn.Module) -> str | None:
    head = model.get_output_embeddings()  # type: ignore[operator]
    if module is head:
        embed = model.get_input_embeddings()  # type: ignore[operator]
        return "token_embd.weight" if head.weight is embed.weight else "output.weight"
    try:
        return gguf_name(f"{name}.weight")
    except UnsupportedModelError:  # a Linear with no place in the file
        return None


def fisher_and_importance(
    model: nn.Module, ids: torch.Tensor, draws: int = 1, seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """``(Fisher diagonal summed over positions, mean squared input per column, positions)``
    of ``model`` (a causal LM returning ``.logits``) over the windows ``ids`` ``[n, T]``."""
    weights = planned_weights(model)
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in weights.items()}
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        key = _input_key(model, name, module) if isinstance(module, nn.Linear) else None
        if key is not None:

            def record(_m: Any, inputs: tuple[torch.Tensor, ...], _o: Any, key: str = key) -> None:
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + (x * x).sum(0)

            handles.append(module.register_forward_hook(record))
    gen = torch.Generator().manual_seed(seed)
    needs = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in {id(w) for w in weights.values()})
    positions = 0
    try:
        for row in ids:
            logits = model(row[None], use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            for draw in range(draws):
                drawn = torch.multinomial(logp.detach().exp(), 1, generator=gen)
                model.zero_grad(set_to_none=True)
                (-logp.gather(1, drawn).sum()).backward(retain_graph=draw + 1 < draws)
                for k, p in weights.items():
                    if p.grad is not None:
                        fisher[k] += p.grad.float() ** 2 / draws
            positions += row.numel()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(needs[id(p)])
    importance = {k: (v / max(positions, 1)).float() for k, v in sums.items()}
    return fisher, importance, positions


def tensor_costs(
    name: str,
    weight: np.ndarray,
    fisher: np.ndarray,
    types: Sequence[str],
    importance: np.ndarray | None,
) -> dict[str, tuple[int, float]]:
    """``{type: (bytes, predicted KLD)}`` of one weight ``[rows, cols]``; ``fisher`` its
    per-position Fisher diagonal (already divided by the positions)."""
    out: dict[str, tuple[int, float]] = {}
    for t in type_options(weight.shape, types):
        _, _, values = encode_typed(name, weight.astype(np.float32), t, importance)
        diff = values.astype(np.float64) - weight
        out[t] = (tensor_bytes(t, weight.shape), float(0.5 * (fisher * diff * diff).sum()))
    return out


ENCODE_KEYS = ("types", "imatrix")  # settings of the encodes only: the Fisher pass stays valid


def _stale(out: Path, settings: Mapping[str, Any]) -> tuple[str, ...]:
    """The scan files in OUT that ``settings`` make stale (all of them when a setting of the
    Fisher pass changed; only the encodes when the types or the imatrix did)."""
    path = out / "scan.json"
    old = json.loads(path.read_text()) if path.is_file() else None
    if old == dict(settings):
        return ()
    fisher = {k: v for k, v in settings.items() if k not in ENCODE_KEYS}
    if old is not None and {k: v for k, v in old.items() if k not in ENCODE_KEYS} == fisher:
        return ("scan.jsonl",)
    return SCAN_FILES


def _read_lines(path: Path) -> dict[str, dict[str, tuple[int, float]]]:
    done: dict[str, dict[str, tuple[int, float]]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: scanned again
                continue
            done[row["name"]] = {k: (int(b), float(d)) for k, (b, d) in row["costs"].items()}
    return done


def scan(
    model: nn.Module,
    ids: torch.Tensor,
    out: Path,
    settings: Mapping[str, Any],
    importance: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, dict[str, tuple[int, float]]], dict[str, np.ndarray], dict[str, Any]]:
    """``(costs, importance used, info)``: the predicted KLD and bytes of every type of
    ``settings["types"]`` for every 2-D weight of ``model``, read from OUT where a scan with the
    same ``settings`` left them, computed (and appended) otherwise. ``importance`` (an imatrix
    by GGUF name) replaces the scan's own for the rounding."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"fisher_cached": True, "tensors_cached": 0, "scan_seconds": 0.0}
    for name in _stale(out, settings):
        (out / name).unlink(missing_ok=True)
    start = time.perf_counter()
    if not (out / "fisher.safetensors").is_file():
        info["fisher_cached"] = False
        log.info("scan: Fisher and importance over %d windows of %d", *ids.shape)
        fisher, own, positions = fisher_and_importance(model, ids, settings.get("draws", 1))
        save_file({k: v.contiguous() for k, v in own.items()}, str(out / "importance.safetensors"))
        scaled = {k: (v / positions).to(torch.bfloat16) for k, v in fisher.items()}
        tmp = out / "fisher.tmp"
        save_file(scaled, str(tmp))
        tmp.replace(out / "fisher.safetensors")
    (out / "scan.json").write_text(json.dumps(dict(settings), indent=1))
    fisher_t = load_file(str(out / "fisher.safetensors"))
    used = {k: v.numpy() for k, v in load_file(str(out / "importance.safetensors")).items()}
    if importance is not None:
        used = {k: np.asarray(v, dtype=np.float32) for k, v in importance.items()}
    costs = _read_lines(out / "scan.jsonl")
    info["tensors_cached"] = len(costs)
    with open(out / "scan.jsonl", "a") as lines:
        for name, param in planned_weights(model).items():
            if name in costs:
                continue
            w = param.detach().float().cpu().numpy().astype(np.float64)
            f = fisher_t[name].float().numpy().astype(np.float64)
            costs[name] = tensor_costs(name, w, f, settings["types"], used.get(name))
            row = {"name": name, "shape": list(w.shape), "costs": costs[name]}
            lines.write(json.dumps(row) + "\n")
            lines.flush()
    info["scan_seconds"] = round(time.perf_counter() - start, 1)
    return costs, used, info
