"""Passthrough merges with ``slices``: stack layer ranges of Hugging Face models (frankenmerges).

mergekit's YAML::

    merge_method: passthrough
    slices:
      - sources: [{model: runs/a, layer_range: [0, 6]}]
      - sources: [{model: runs/b, layer_range: [3, 8]}]
    dtype: bfloat16

The output's layer ``i`` is the ``i``-th layer the slices list (renumbered from 0); the weights
outside the layers come, as in mergekit, from the first slice's model for those before the layers
(embeddings) and from the last slice's model for those after them (final norm, LM head). The
layers are the tensors named ``<prefix><index>.<rest>`` whose prefix holds the most indices
(``model.layers.`` for Llama-family models). ``config.json`` is the first slice's with the new
layer count (and ``layer_types``, where the config has one, following the slices). Only one
source per slice (mergekit's passthrough) is supported.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimtorch.core.errors import ConfigError
from slimtorch.formats.quant_parts import dtype_from_name
from slimtorch.formats.streaming import StreamingSafetensorsDir, TensorSpec
from slimtorch.merge.stream import _hf_files, open_source

_LAYER = re.compile(r"^(.*?)(\d+)\.(.+)$")
_PRE = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Slice:
    """One output slice: layers ``start`` (included) to ``end`` (excluded) of ``model``."""

    model: str
    start: int
    end: int
    scale: float | None = None


def parse_slices(raw: Any) -> list[Slice]:
    """mergekit's ``slices`` list (one source each) as :class:`Slice` values."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("`slices` must be a non-empty list of {sources: [{model, layer_range}]}")
    out = []
    for i, entry in enumerate(raw):
        where = f"slices[{i}]"
        sources = entry.get("sources") if isinstance(entry, dict) else None
        if not isinstance(sources, list) or len(sources) != 1:
            raise ConfigError(
                f"{where}: give exactly one source (`sources: [{{model, layer_range}}]`);"
                " merging several sources inside a slice is unsupported"
            )
        src = sources[0]
        rng = src.get("layer_range") if isinstance(src, dict) else None
        model = src.get("model") if isinstance(src, dict) else None
        if not isinstance(model, str) or not isinstance(rng, list) or len(rng) != 2:
            raise ConfigError(f"{where}.sources[0] needs `model: PATH` and `layer_range: [a, b]`")
        start, end = int(rng[0]), int(rng[1])
        if not 0 <= start < end:
            raise ConfigError(f"{where}: layer_range {rng} must satisfy 0 <= start < end")
        params = src.get("parameters") or {}
        extra = sorted(set(params) - {"scale"})
        if extra:
            raise ConfigError(f"{where}: unsupported parameters {extra}; passthrough takes `scale`")
        scale = params.get("scale")
        out.append(Slice(model, start, end, None if scale is None else float(scale)))
    return out


def layer_prefix(names: Sequence[str]) -> str:
    """The name prefix before the layer index that most tensors share."""
    counts: Counter[str] = Counter()
    for n in names:
        m = _LAYER.match(n)
        if m:
            counts[m.group(1)] += 1
    if not counts:
        raise ConfigError("no numbered layers found in the model's tensor names; cannot slice it")
    return counts.most_common(1)[0][0]


def plan(slices: list[Slice], names: dict[str, list[str]]) -> list[tuple[str, str, str, Slice]]:
    """``(output name, model, input name, slice)`` for every output tensor, in output order."""
    first, last = slices[0], slices[-1]
    prefix = layer_prefix(names[first.model])
    rows: list[tuple[str, str, str, Slice]] = []
    outside = [n for n in names[first.model] if not n.startswith(prefix)]
    pre = [n for n in outside if any(h in n for h in _PRE)]
    for n in pre:
        rows.append((n, first.model, n, first))
    index = 0
    for s in slices:
        have = {
            int(m.group(2))
            for n in names[s.model]
            if n.startswith(prefix) and (m := _LAYER.match(n)) and m.group(1) == prefix
        }
        missing = [i for i in range(s.start, s.end) if i not in have]
        if missing:
            raise ConfigError(
                f"{s.model} has no layers {missing} (it has {len(have)}); fix layer_range"
            )
        for layer in range(s.start, s.end):
            head = f"{prefix}{layer}."
            for n in names[s.model]:
                if n.startswith(head):
                    rows.append((f"{prefix}{index}.{n[len(head) :]}", s.model, n, s))
            index += 1
    for n in outside:
        if n not in pre:
            if n not in names[last.model]:
                raise ConfigError(f"{last.model} has no tensor {n!r}; slice models of one family")
            rows.append((n, last.model, n, last))
    return rows


def out_config(cfg: dict[str, Any], slices: list[Slice]) -> dict[str, Any]:
    """The first slice model's config with the sliced layer count (and ``layer_types``)."""
    total = sum(s.end - s.start for s in slices)
    cfg = dict(cfg)
    keys = [k for k in _LAYER_KEYS if k in cfg]
    for k in keys or ["num_hidden_layers"]:
        cfg[k] = total
    if isinstance(cfg.get("layer_types"), list):
        types = cfg["layer_types"]
        cfg["layer_types"] = [types[i] for s in slices for i in range(s.start, s.end)]
    return cfg


def slice_to_dir(
    slices: list[Slice],
    out: Path,
    dtypes: tuple[str | None, str | None],
    force: bool,
    config_dir: Path | None,
) -> dict[str, Any]:
    """Write the stacked model of ``slices`` to ``out`` (``dtypes``: mergekit's dtype, out_dtype)."""
    with ExitStack() as stack:
        sources = {}
        for s in slices:
            if s.model not in sources:
                src = open_source(s.model, config_dir)
                stack.callback(src.close)
                sources[s.model] = src
        rows = plan(slices, {k: list(v.infos) for k, v in sources.items()})
        merge_dtype = dtype_from_name(dtypes[0]) if dtypes[0] else None
        store = dtype_from_name(dtypes[1]) if dtypes[1] else merge_dtype

        def tensor(model: str, name: str, sl: Slice) -> torch.Tensor:
            x = sources[model].read(name)
            if not x.is_floating_point():
                return x
            x = x.to(merge_dtype) if merge_dtype else x
            x = x if sl.scale is None else x * sl.scale
            return x.to(store) if store else x

        specs = []
        for o, m, n, _ in rows:
            shape, dt = sources[m].infos[n]
            specs.append(TensorSpec(o, shape, store if store and dt.is_floating_point else dt))
        first = sources[slices[0].model]
        record = {"merge": {"method": "passthrough", "slices": [s.__dict__ for s in slices]}}
        files = _hf_files(first.root, dtypes[1] or dtypes[0], record) if first.root else {}
        if "config.json" in files:
            cfg = out_config(json.loads(files["config.json"]), slices)
            files["config.json"] = json.dumps(cfg, indent=2).encode("utf-8")
        with StreamingSafetensorsDir(out, specs, files, overwrite=force) as writer:
            for o, m, n, sl in rows:
                writer.write(o, tensor(m, n, sl))
    return {
        "method": "passthrough",
        "models": sorted(sources),
        "layers": sum(s.end - s.start for s in slices),
        "tensors": len(rows),
        "out": str(out),
        "bytes_on_disk": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
    }
