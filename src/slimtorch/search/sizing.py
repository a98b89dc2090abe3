"""Build the :class:`~slimtorch.search.space.SizeModel` of a model: every searched layer's weight
is compressed with every choice of the grid by the same pure functions the recipe methods use
(magnitude mask, round-to-nearest per channel, k-means codebook) and encoded by the artifact
writer's :func:`~slimtorch.formats.encoding.encode_tensor`, so a prediction is the artifact size
up to the manifest's few bytes of difference (and fine-tuning, which moves weights a little).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import TargetError
from slimtorch.formats.coded import PART_OVERHEAD
from slimtorch.formats.encoding import encode_tensor
from slimtorch.formats.quant_parts import parts_bytes
from slimtorch.formats.state import WeightState, codebook_state, effective_weight
from slimtorch.graph.weights import WeightRef, select_weights
from slimtorch.prune.criteria import magnitude_mask
from slimtorch.quantize.affine import quantize_weight
from slimtorch.quantize.stages.rtn import RTNConfig
from slimtorch.search.space import Choice, SizeModel, choice_key, rtn_options
from slimtorch.share.kmeans import assign, kmeans_1d

log = logging.getLogger(__name__)
KMEANS_SAMPLE = 1 << 17  # k-means for the size table fits at most this many values


def layer_refs(
    model: nn.Module, targets: Sequence[str] | None = None
) -> dict[str, list[WeightRef]]:
    """Searchable layers (module name -> its weights), in model order."""
    refs = select_weights(model, list(targets) if targets else None, [])
    out: dict[str, list[WeightRef]] = {}
    for ref in refs:
        out.setdefault(ref.module_name, []).append(ref)
    if not out:
        raise TargetError("no compressible layer found; pass targets naming Linear/Conv layers")
    return out


def _codebook(w: torch.Tensor, mask: torch.Tensor | None, bits: int, seed: int) -> Any:
    flat = w.detach().to(torch.float32).reshape(-1)
    kept = flat[mask.reshape(-1)] if mask is not None else flat
    if kept.numel() == 0:
        return None
    sample = kept
    if kept.numel() > KMEANS_SAMPLE:
        gen = torch.Generator().manual_seed(seed)
        sample = kept[torch.randperm(kept.numel(), generator=gen)[:KMEANS_SAMPLE]]
    centroids = kmeans_1d(sample, 2**bits, "linear", max_iter=30, seed=seed).centroids
    codes = torch.zeros(flat.numel(), dtype=torch.uint8)
    labels = assign(kept, centroids).to(torch.uint8)
    if mask is not None:
        codes[mask.reshape(-1)] = labels
    else:
        codes = labels
    return codebook_state(codes.reshape(w.shape), centroids.to(torch.float32), bits)


def choice_state(w: torch.Tensor, c: Mapping[str, Any], seed: int = 0) -> WeightState | None:
    """The compression state ``c`` gives weight ``w`` (None: left dense)."""
    mask = magnitude_mask(w, float(c["prune"])) if c["prune"] > 0 else None
    q = c.get("quant")
    quant = None
    if q is not None and q["kind"] == "int":
        quant = quantize_weight(w, RTNConfig(**rtn_options(int(q["bits"]))).spec(), mask)
    elif q is not None:
        quant = _codebook(w, mask, int(q["bits"]), seed)
    if mask is None and quant is None:
        return None
    return WeightState(mask=mask, quant=quant)


def encoded_bytes(w: torch.Tensor, state: WeightState | None, name: str, entropy: str) -> int:
    """Bytes ``w`` with ``state`` takes in an artifact: parts, their headers, manifest entry."""
    values = w.detach() if state is None else effective_weight(state, w.detach())
    parts, meta = encode_tensor(values, state, name, entropy)
    return parts_bytes(parts) + PART_OVERHEAD * len(parts) + len(json.dumps(meta))


def _rel_error(w: torch.Tensor, state: WeightState | None) -> float:
    if state is None:
        return 0.0
    ref = w.detach().to(torch.float32)
    err = effective_weight(state, ref) - ref
    return float(err.norm() / ref.norm().clamp_min(1e-12))


def build_size_model(
    model: nn.Module,
    layers: Mapping[str, Sequence[WeightRef]],
    grid: Sequence[Choice],
    baseline_bytes: int,
    entropy: str = "huffman",
    seed: int = 0,
) -> SizeModel:
    """Size table of every layer under every choice of ``grid``; ``baseline_bytes`` is the
    artifact size of the uncompressed model (it fixes the bytes of everything else)."""
    table: dict[str, dict[str, int]] = {}
    error: dict[str, dict[str, float]] = {}
    dense_total = 0
    with torch.no_grad():
        for layer, refs in layers.items():
            dense_total += sum(encoded_bytes(r.weight, None, r.name, entropy) for r in refs)
            table[layer], error[layer] = {}, {}
            for c in grid:
                total, err = 0, 0.0
                for r in refs:
                    state = choice_state(r.weight, c, seed)
                    total += encoded_bytes(r.weight, state, r.name, entropy)
                    err = max(err, _rel_error(r.weight, state))
                table[layer][choice_key(c)] = total
                error[layer][choice_key(c)] = err
            log.debug("size table: %s done", layer)
    return SizeModel(baseline_bytes - dense_total, table, error)
