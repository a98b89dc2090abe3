"""The result of a sensitivity scan: quality per layer and per single compression choice.

JSON form (``kind: slimtorch.sensitivity``, version 1), read by the auto-search and the report::

    {"kind": "slimtorch.sensitivity", "version": 1, "model": str|null, "metric": str,
     "higher_is_better": bool, "baseline": float,
     "layers": [{"name": str, "type": str, "params": int, "dense_bytes": int,
                 "prune": [{"value": float, "quality": float, "drop": float}, ...],
                 "bits": [...], "codebook": [...]}]}

``drop`` is the loss of quality against ``baseline``, positive = worse whatever the metric's
direction (accuracy 92 -> 90 and perplexity 30 -> 32 are both drops of +2).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimtorch.core.errors import ArtifactError, ConfigError, TargetError
from slimtorch.core.registry import nearest
from slimtorch.formats.atomic import fsync_dir, temp_sibling, write_file

SCHEMA_KIND = "slimtorch.sensitivity"
SCHEMA_VERSION = 1
KINDS = ("prune", "bits", "codebook")
# the value at which a choice changes nothing: no pruning, or 32-bit (float) weights
NEUTRAL = {"prune": 0.0, "bits": 32.0, "codebook": 32.0}


def quality_drop(baseline: float, quality: float, higher_is_better: bool) -> float:
    """How much worse ``quality`` is than ``baseline`` (positive = worse)."""
    return baseline - quality if higher_is_better else quality - baseline


def _round(x: float) -> float:
    """``x`` to 12 significant digits (hides float noise such as 0.09999999999999432)."""
    return float(f"{x:.12g}") if math.isfinite(x) else x


@dataclass
class Point:
    """One measured choice: its value, the quality it gave, and the drop from the baseline."""

    value: float
    quality: float
    drop: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "quality": _round(self.quality), "drop": _round(self.drop)}


@dataclass
class LayerSensitivity:
    """The measured points of one layer, per kind of choice (``prune``, ``bits``, ``codebook``)."""

    name: str
    type: str
    params: int
    dense_bytes: int
    prune: list[Point] = field(default_factory=list)
    bits: list[Point] = field(default_factory=list)
    codebook: list[Point] = field(default_factory=list)

    def points(self, kind: str) -> list[Point]:
        if kind not in KINDS:
            raise ConfigError(f"unknown choice kind {kind!r}; use one of {', '.join(KINDS)}")
        return list(getattr(self, kind))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "params": self.params,
            "dense_bytes": self.dense_bytes,
        }
        for kind in KINDS:
            out[kind] = [p.to_dict() for p in self.points(kind)]
        return out


def interpolate_drop(points: Sequence[Point], value: float, neutral: float) -> float:
    """Drop at ``value``, linear between measured points and the ``neutral`` value (drop 0).

    Raises ValueError outside ``[neutral, furthest measured value]`` (no extrapolation).
    """
    xs = [float(neutral)] + [float(p.value) for p in points]
    ys = [0.0] + [float(p.drop) for p in points]
    order = np.argsort(xs, kind="stable")
    xs_sorted = np.asarray(xs)[order]
    ys_sorted = np.asarray(ys)[order]
    if not xs_sorted[0] - 1e-9 <= value <= xs_sorted[-1] + 1e-9:
        raise ValueError(f"{value} outside [{xs_sorted[0]:g}, {xs_sorted[-1]:g}]")
    return float(np.interp(value, xs_sorted, ys_sorted))


@dataclass
class Sensitivity:
    """Quality of a model with one choice applied to one layer, for every layer and choice."""

    metric: str
    higher_is_better: bool
    baseline: float
    layers: list[LayerSensitivity] = field(default_factory=list)
    model: str | None = None

    def layer(self, name: str) -> LayerSensitivity:
        for entry in self.layers:
            if entry.name == name:
                return entry
        names = [e.name for e in self.layers]
        hint = nearest(name, names)
        raise TargetError(
            f"layer {name!r} is not in this sensitivity table"
            + (f"; did you mean {hint!r}?" if hint else "")
            + f" Scanned layers: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
        )

    def drop(self, layer: str, kind: str, value: float) -> float:
        """Quality drop of ``kind=value`` on ``layer``, interpolated between measured values.

        0 for the neutral value (``prune`` 0, ``bits``/``codebook`` 32). Values beyond the
        most aggressive measured one are refused rather than extrapolated.
        """
        points = self.layer(layer).points(kind)
        if not points and value != NEUTRAL[kind]:
            raise ConfigError(
                f"no {kind} values were measured for {layer!r}; rescan with {kind} values"
                f" (e.g. `slimtorch sensitivity --{kind} ...`)"
            )
        try:
            return interpolate_drop(points, float(value), NEUTRAL[kind])
        except ValueError as exc:
            measured = sorted(p.value for p in points)
            raise ConfigError(
                f"{kind}={value} for {layer!r} is {exc}, beyond the measured values {measured};"
                f" rescan with {kind} values covering it"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": SCHEMA_KIND,
            "version": SCHEMA_VERSION,
            "model": self.model,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "baseline": self.baseline,
            "layers": [entry.to_dict() for entry in self.layers],
        }

    @classmethod
    def from_dict(cls, raw: Any) -> Sensitivity:
        """Parse the JSON form; a malformed table raises ArtifactError saying what is wrong."""
        if not isinstance(raw, dict) or raw.get("kind") != SCHEMA_KIND:
            raise ArtifactError(
                f"not a sensitivity table (kind {raw.get('kind') if isinstance(raw, dict) else raw!r}"
                f", expected {SCHEMA_KIND!r}); give a sensitivity.json written by"
                " `slimtorch sensitivity`"
            )
        if raw.get("version") != SCHEMA_VERSION:
            raise ArtifactError(
                f"sensitivity table version {raw.get('version')!r} is not supported (this"
                f" slimtorch reads version {SCHEMA_VERSION}); rerun `slimtorch sensitivity`"
            )
        try:
            layers = [_layer_from_dict(entry) for entry in raw["layers"]]
            return cls(
                metric=str(raw["metric"]),
                higher_is_better=bool(raw["higher_is_better"]),
                baseline=float(raw["baseline"]),
                layers=layers,
                model=None if raw.get("model") is None else str(raw["model"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"malformed sensitivity table ({type(exc).__name__}: {exc}); rerun"
                " `slimtorch sensitivity` to write a fresh one"
            ) from None

    def save(self, path: str | Path, atomic: bool = True) -> Path:
        """Write the JSON form to ``path`` (atomically: a temporary file renamed into place)."""
        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n", atomic)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ArtifactError(
                f"{path} does not exist; run `slimtorch sensitivity --out DIR` first"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"cannot read {path} as JSON ({exc}); rerun the scan") from None
        return cls.from_dict(raw)


def _layer_from_dict(raw: dict[str, Any]) -> LayerSensitivity:
    def pts(kind: str) -> list[Point]:
        return [
            Point(float(p["value"]), float(p["quality"]), float(p["drop"]))
            for p in raw.get(kind, [])
        ]

    return LayerSensitivity(
        name=str(raw["name"]),
        type=str(raw["type"]),
        params=int(raw["params"]),
        dense_bytes=int(raw["dense_bytes"]),
        prune=pts("prune"),
        bits=pts("bits"),
        codebook=pts("codebook"),
    )


def write_text_atomic(path: Path, text: str, atomic: bool = True) -> None:
    """Write ``text`` to ``path``; with ``atomic`` a reader never sees a half-written file."""
    if not atomic:
        path.write_text(text)
        return
    tmp = temp_sibling(path)
    try:
        write_file(tmp, text.encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _label(kind: str, value: float) -> str:
    return f"{kind} {value:g}"


def _cell(drop: float | None) -> str:
    if drop is None:
        return ""
    if not math.isfinite(drop):
        return str(drop)
    return f"{drop:+.3g}"


def to_markdown(sens: Sensitivity) -> str:
    """One Markdown table: a row per layer, a column per kind and value holding the drop."""
    columns = [
        (kind, value)
        for kind in KINDS
        for value in sorted(
            {p.value for e in sens.layers for p in e.points(kind)}, reverse=kind != "prune"
        )
    ]
    direction = "higher is better" if sens.higher_is_better else "lower is better"
    lines = [
        f"Sensitivity of {sens.model or 'the model'}: drop in {sens.metric} ({direction}) from"
        f" the baseline {sens.baseline:.6g} when one layer alone is compressed; positive ="
        " worse. prune = unstructured magnitude sparsity, bits = round-to-nearest integer"
        " bits, codebook = k-means index bits (2^bits shared values).",
        "",
        "| layer | type | params | " + " | ".join(_label(k, v) for k, v in columns) + " |",
        "|---|---|---:|" + "---:|" * len(columns),
    ]
    for entry in sens.layers:
        measured = {(k, p.value): p.drop for k in KINDS for p in entry.points(k)}
        cells = [_cell(measured.get(col)) for col in columns]
        lines.append(
            f"| {entry.name} | {entry.type} | {entry.params:,} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def most_sensitive(sens: Sensitivity, n: int = 5) -> list[dict[str, Any]]:
    """The ``n`` measured (layer, kind, value) choices with the largest drops, largest first."""
    rows: list[dict[str, Any]] = [
        {"layer": e.name, "kind": kind, "value": p.value, "quality": p.quality, "drop": p.drop}
        for e in sens.layers
        for kind in KINDS
        for p in e.points(kind)
    ]
    rows.sort(key=lambda r: -r["drop"] if math.isfinite(r["drop"]) else -math.inf)
    return rows[:n]
