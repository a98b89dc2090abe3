"""The per-layer search space of ``slimtorch auto`` and its translation into a recipe.

A *configuration* maps each searched layer (a module name) to a *choice*::

    {"fc1": {"prune": 0.9, "quant": {"kind": "codebook", "bits": 4}},
     "fc2": {"prune": 0.0, "quant": {"kind": "int", "bits": 8}},
     "conv1": {"prune": 0.0, "quant": None}}

:func:`to_recipe` turns it into an ordinary recipe (per-layer ``targets``): ``prune.magnitude``,
an optional short ``train.finetune`` that keeps the masks, ``quantize.rtn`` / ``share.kmeans``
(plus an optional ``share.finetune``), and ``format: {entropy: huffman}``. :class:`SizeModel`
predicts the bytes on disk of a configuration from a per-layer table built by encoding each
layer's weight exactly as the artifact writer would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from slimtorch.core.errors import ConfigError
from slimtorch.search.sensitivity import GROUP_BITS, GROUP_SIZE

Choice = dict[str, Any]
Config = dict[str, Choice]
QUANT_KINDS = ("int", "codebook")


def choice(prune: float = 0.0, kind: str | None = None, bits: int = 8) -> Choice:
    """One layer's choice: ``prune`` fraction, then ``kind`` ("int", "codebook", None) at ``bits``."""
    return {"prune": float(prune), "quant": None if kind is None else {"kind": kind, "bits": bits}}


def choice_key(c: Mapping[str, Any]) -> str:
    """A short stable name: ``0.9|codebook4``, ``0|int8``, ``0.5|none``."""
    q = c.get("quant")
    return f"{float(c['prune']):g}|" + ("none" if q is None else f"{q['kind']}{int(q['bits'])}")


def parse_choice_key(key: str) -> Choice:
    """Inverse of :func:`choice_key`."""
    prune, _, quant = key.partition("|")
    if quant == "none":
        return choice(float(prune))
    kind = next((k for k in QUANT_KINDS if quant.startswith(k)), None)
    if kind is None:
        raise ConfigError(f"bad choice key {key!r}; expected e.g. '0.9|int4' or '0|none'")
    return choice(float(prune), kind, int(quant[len(kind) :]))


def check_choice(layer: str, c: Any) -> Choice:
    """``c`` validated (raises ConfigError naming the layer and the fix)."""
    if not isinstance(c, Mapping) or set(c) - {"prune", "quant"}:
        raise ConfigError(
            f"layer {layer!r}: a choice is {{'prune': float, 'quant': ...}}, got {c!r}"
        )
    prune = float(c.get("prune", 0.0))
    if not 0.0 <= prune < 1.0:
        raise ConfigError(f"layer {layer!r}: prune must be in [0, 1), got {prune}")
    q = c.get("quant")
    if q is None:
        return choice(prune)
    if not isinstance(q, Mapping) or q.get("kind") not in QUANT_KINDS:
        raise ConfigError(
            f"layer {layer!r}: quant must be null or {{'kind': 'int'|'codebook', 'bits': n}},"
            f" got {q!r}"
        )
    bits, kind = int(q.get("bits", 0)), str(q["kind"])
    low = 2 if kind == "int" else 1
    if not low <= bits <= 8:
        raise ConfigError(f"layer {layer!r}: {kind} bits must be in {low}..8, got {bits}")
    return choice(prune, kind, bits)


def check_config(config: Mapping[str, Any], layers: Sequence[str]) -> Config:
    """``config`` validated against the model's searchable ``layers``."""
    unknown = sorted(set(config) - set(layers))
    if unknown:
        raise ConfigError(
            f"configuration names layers {unknown[:5]} the model does not have; searchable"
            f" layers: {', '.join(layers[:12])}{' ...' if len(layers) > 12 else ''}"
        )
    return {name: check_choice(name, config[name]) for name in layers if name in config}


def rtn_options(bits: int) -> dict[str, Any]:
    """``quantize.rtn`` options of an ``int`` choice, as the sensitivity scan measures them:
    per output channel, per groups of GROUP_SIZE inputs at GROUP_BITS bits and below."""
    if bits <= GROUP_BITS:
        return {"bits": bits, "granularity": "per_group", "group_size": GROUP_SIZE}
    return {"bits": bits, "granularity": "per_channel"}


def uniform(layers: Iterable[str], c: Choice) -> Config:
    """Every layer with the same choice: a single-recipe configuration."""
    return {name: dict(c) for name in layers}


@dataclass(frozen=True)
class RecipeOptions:
    """How a configuration becomes a recipe: fine-tuning after pruning, trained sharing, coding."""

    finetune_steps: int = 0  # train.finetune after pruning (optional stage: needs --data)
    finetune_lr: float = 1e-3
    batch_size: int = 128
    share_finetune_steps: int = 0
    entropy: str = "huffman"


def _group(config: Config, key: Any) -> dict[Any, list[str]]:
    groups: dict[Any, list[str]] = {}
    for name, c in config.items():
        k = key(c)
        if k is not None:
            groups.setdefault(k, []).append(name)
    return dict(sorted(groups.items(), key=lambda kv: str(kv[0])))


def _bits(c: Choice, kind: str) -> int | None:
    q = c["quant"]
    return int(q["bits"]) if q is not None and q["kind"] == kind else None


def _train(steps: int, options: RecipeOptions, lr: float) -> dict[str, Any]:
    return {"steps": steps, "lr": lr, "batch_size": options.batch_size, "lr_schedule": "cosine"}


def to_recipe(config: Config, options: RecipeOptions | None = None) -> dict[str, Any]:
    """The recipe dict (``slimtorch.compress`` accepts it) that applies ``config``."""
    options = options or RecipeOptions()
    stages: list[dict[str, Any]] = []
    by_prune = _group(config, lambda c: c["prune"] if c["prune"] > 0 else None)
    for sparsity, names in by_prune.items():
        stages.append({"method": "prune.magnitude", "sparsity": sparsity, "targets": names})
    if by_prune and options.finetune_steps:
        train = _train(options.finetune_steps, options, options.finetune_lr)
        stages.append({"method": "train.finetune", "optional": True, "train": train})
    quant = _group(config, lambda c: _bits(c, "int"))
    for bits, names in quant.items():
        stages.append({"method": "quantize.rtn", **rtn_options(bits), "targets": names})
    books = {n: b for n, c in config.items() if (b := _bits(c, "codebook")) is not None}
    if books:
        stages.append({"method": "share.kmeans", "bits": books, "targets": sorted(books)})
        if options.share_finetune_steps:
            train = _train(options.share_finetune_steps, options, options.finetune_lr / 5)
            stages.append({"method": "share.finetune", "optional": True, "train": train})
    if not stages:  # an all-dense configuration: the model as it is
        stages.append({"method": "prune.magnitude", "sparsity": 0.0, "targets": sorted(config)})
    return {"stages": stages, "format": {"entropy": options.entropy}}


def trial_id(
    model: str,
    data: str | None,
    recipe: Mapping[str, Any],
    measure: Mapping[str, Any] | None = None,
) -> str:
    """A stable id: the same model, data, recipe and measuring options (``measure``) always
    give the same id, so a resumed search recognises a finished trial."""
    key = {"model": model, "data": data, "recipe": recipe, "measure": measure or {}}
    text = json.dumps(key, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class SizeModel:
    """Predicted bytes on disk: ``fixed`` (every other tensor, headers, manifest) plus, per
    layer, the bytes its weight takes under each choice (``table[layer][choice_key]``).
    ``error[layer][choice_key]`` is the relative weight error of that choice (a data-free
    proxy of its quality cost)."""

    fixed: int
    table: dict[str, dict[str, int]]
    error: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.table)

    def layer_bytes(self, layer: str, c: Mapping[str, Any]) -> int:
        try:
            return self.table[layer][choice_key(c)]
        except KeyError:
            raise ConfigError(
                f"no size known for layer {layer!r} with choice {choice_key(c)!r}; the search"
                " grid must include every choice a configuration uses"
            ) from None

    def predict(self, config: Mapping[str, Mapping[str, Any]]) -> int:
        """Bytes of the artifact of ``config`` (layers missing from it count as dense)."""
        dense = choice()
        return self.fixed + sum(self.layer_bytes(n, config.get(n, dense)) for n in self.table)

    def to_dict(self) -> dict[str, Any]:
        return {"fixed": self.fixed, "table": self.table, "error": self.error}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SizeModel:
        return cls(int(raw["fixed"]), dict(raw["table"]), dict(raw.get("error", {})))
