"""The report as a format-neutral document (sections of paragraphs, tables, figures, code),
built from :mod:`slimtorch.report.collect`'s data. HTML and Markdown render the same document,
so both show the same numbers; cells are formatted here, once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from slimtorch.report import plots
from slimtorch.report.collect import (
    SENSITIVITY_KINDS,
    ArtifactData,
    AutoData,
    LatencyData,
    ReportData,
)

MAX_ROWS = 200  # longer tables are cut, with a line that says so


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Figure:
    name: str  # file stem of the Markdown PNG, unique in the document
    png: bytes
    caption: str


@dataclass
class Code:
    text: str


Block = str | Table | Figure | Code


@dataclass
class Section:
    title: str
    level: int = 2
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Document:
    title: str
    subtitle: str
    sections: list[Section] = field(default_factory=list)

    def figures(self) -> list[Figure]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]


def fmt(v: Any) -> str:
    """One cell: '-' for missing, thousands separators, 4 significant digits."""
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1e5 else f"{v:.4g}"
    if isinstance(v, list | tuple):
        return "x".join(fmt(x) for x in v)
    return str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100.0 * v:.1f}%"


def _table(header: list[str], rows: list[list[Any]], what: str = "rows") -> Table:
    cells = [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows[:MAX_ROWS]]
    note = f"first {MAX_ROWS} of {len(rows)} {what}" if len(rows) > MAX_ROWS else ""
    return Table(header, cells, note)


def _pairs(pairs: list[tuple[str, Any]]) -> Table:
    return _table(["", "value"], [[k, v] for k, v in pairs if v is not None])


def _eval_table(ev: dict[str, Any]) -> Table:
    metric = ev.get("metric") or "quality"
    rows = [
        [str(metric), ev.get("baseline_value"), ev.get("value")],
        [
            f"latency ms (batch {ev.get('latency_batch', 1)})",
            ev.get("baseline_latency_ms"),
            ev.get("latency_ms"),
        ],
        ["bytes on disk", ev.get("dense_bytes"), ev.get("bytes_on_disk")],
        ["params", ev.get("baseline_params"), ev.get("params")],
        ["nonzero params", ev.get("baseline_nonzero_params"), ev.get("nonzero_params")],
    ]
    return _table(["measure", "original (fp32)", "compressed"], rows)


def _latency_blocks(lat: LatencyData, fig_name: str) -> list[Block]:
    covered = sum(r["ms"] for r in lat.rows)
    text = (
        f"Forward pass on the recorded example inputs (batch {lat.batch}, median of"
        f" {lat.repeats}, {lat.threads} torch thread{'s' if lat.threads != 1 else ''}):"
        f" {lat.forward_ms:.4g} ms without hooks, {lat.hooked_ms:.4g} ms with"
        f" the per-module timers; leaf modules account for {covered:.4g} ms"
        f" ({_pct(covered / lat.hooked_ms if lat.hooked_ms else None)}), the rest is"
        " functional code between modules and hook overhead."
    )
    blocks: list[Block] = [text]
    if lat.rows:
        png = plots.latency_chart(lat.rows)
        blocks.append(Figure(fig_name, png, "Median forward time per leaf module"))
    rows = [[r["name"], r["type"], r["calls"], r["ms"], _pct(r["share"])] for r in lat.rows]
    blocks.append(_table(["module", "type", "calls", "ms", "share"], rows, "modules"))
    return blocks


def _size_section(data: ArtifactData, prefix: str, level: int) -> Section:
    size = Section("Size breakdown", level)
    if data.layers:
        size.blocks.append(
            Figure(f"{prefix}size", plots.size_chart(data.layers), "fp32 vs stored bytes")
        )
    total = sum(g["bytes"] for g in data.layers) or 1
    rows = [
        [g["name"], g["tensors"], g["dense_bytes"], g["bytes"],
         g["dense_bytes"] / g["bytes"] if g["bytes"] else None, _pct(g["bytes"] / total)]
        for g in data.layers
    ]  # fmt: skip
    header = ["layer", "tensors", "fp32 bytes", "stored bytes", "ratio", "share of stored"]
    size.blocks.append(_table(header, rows, "layers"))
    return size


def _tensor_section(data: ArtifactData, level: int) -> Section:
    tensors = Section("Per-tensor table", level)
    rows = [
        [t["name"], t["shape"], t["dtype"], _pct(t["sparsity"]), t["bits"], t.get("quant_bits"),
         t["encoding"], t.get("codebook_size"), t["bytes"], t["dense_bytes"], t.get("alias_of")]
        for t in data.tensors
    ]  # fmt: skip
    header = ["tensor", "shape", "dtype", "sparsity", "stored bits/elem", "quant bits"]
    header += ["encoding", "codebook", "bytes", "fp32 bytes", "alias of"]
    tensors.blocks.append(_table(header, rows, "tensors"))
    return tensors


def artifact_sections(data: ArtifactData, title: str, prefix: str, level: int = 2) -> list[Section]:
    """Summary, eval numbers, size breakdown, per-tensor table, latency breakdown."""
    s = data.summary
    params, nonzero = s["params"], s["nonzero"]
    summary = _pairs(
        [
            ("directory", s["dir"]),
            ("source model", s.get("source")),
            ("recipe", s.get("recipe")),
            ("architecture", s.get("architecture")),
            ("bytes on disk", s["bytes_on_disk"]),
            ("fp32 safetensors bytes", s["dense_bytes"]),
            ("compression ratio", s.get("compression_ratio")),
            ("parameters", params),
            ("nonzero parameters", f"{nonzero:,} ({_pct(nonzero / params if params else None)})"),
            ("written by slimtorch", s.get("slimtorch_version")),
        ]
    )
    main = Section(title, level, [summary])
    if data.eval:
        main.blocks += [
            "Measured by slimtorch eval (eval.json in the directory):",
            _eval_table(data.eval),
        ]
    size = _size_section(data, prefix, level + 1)
    tensors = _tensor_section(data, level + 1)
    out = [main, size, tensors]
    if data.latency is not None:
        out.append(
            Section(
                "Latency breakdown", level + 1, _latency_blocks(data.latency, f"{prefix}latency")
            )
        )
    elif data.latency_note:
        out.append(Section("Latency breakdown", level + 1, [data.latency_note]))
    return out


def _role(trial: dict[str, Any], auto: AutoData) -> str:
    tid = str(trial.get("id"))
    roles = []
    if tid == str(auto.meta.get("best")):
        roles.append("best")
    if tid in auto.pareto:
        roles.append("front")
    if tid in [str(u) for u in auto.meta.get("uniform") or []]:
        roles.append("uniform")
    return ", ".join(roles)


def auto_sections(auto: AutoData) -> list[Section]:
    """Budgets and baseline, the Pareto chart, the trial table, the best artifact."""
    m = auto.meta
    base: dict[str, Any] = m["baseline"] if isinstance(m.get("baseline"), dict) else {}
    budgets: dict[str, Any] = m["budgets"] if isinstance(m.get("budgets"), dict) else {}
    no_best = "none met the budgets" if auto.trials else "none yet"
    summary = _pairs(
        [
            ("model", m.get("model")),
            ("data", m.get("data")),
            ("metric", m.get("metric")),
            ("higher is better", m.get("higher_is_better")),
            ("profile", m.get("profile")),
            ("runtime", m.get("runtime")),
            ("status", m.get("status")),
            ("trials", m.get("trials", len(auto.trials))),
            ("best trial", m.get("best") if m.get("best") is not None else no_best),
            ("baseline quality", base.get("quality")),
            ("baseline bytes", base.get("bytes")),
            ("baseline latency ms", base.get("latency_ms")),
            ("budget: max bytes", budgets.get("max_bytes")),
            ("budget: max latency ms", budgets.get("max_latency_ms")),
            ("budget: max quality drop", budgets.get("max_drop")),
        ]
    )
    main = Section(f"Automatic search: {auto.path}", 2, [summary])
    uniform = [str(u) for u in m.get("uniform") or []]
    best = None if m.get("best") is None else str(m.get("best"))
    png = plots.pareto_chart(auto.trials, auto.pareto, uniform, budgets, best)
    if png is not None:
        main.blocks.append(
            Figure("pareto", png, "Trials: bytes vs quality drop, latency as colour")
        )
    rows = [
        [t.get("id"), t.get("label"), t.get("status"), t.get("bytes"), t.get("latency_ms"),
         t.get("quality"), t.get("drop"), t.get("meets_budget"), _role(t, auto),
         t.get("seconds"), t.get("error")]
        for t in auto.trials
    ]  # fmt: skip
    header = ["id", "label", "status", "bytes", "latency ms", "quality", "drop"]
    header += ["meets budget", "role", "seconds", "error"]
    table = _table(header, rows, "trials")
    trials = Section("Trials", 3, [table if rows else "No trial has finished yet."])
    out = [main, trials]
    chosen = next((t for t in auto.trials if best is not None and str(t.get("id")) == best), None)
    if chosen is not None and chosen.get("recipe") is not None:
        recipe = json.dumps(chosen["recipe"], indent=2, default=str)
        out.append(Section(f"Recipe of the best trial ({best})", 3, [Code(recipe)]))
    if auto.best is not None:
        out += artifact_sections(auto.best, "Best artifact", "best-", 3)
    return out


def _kind_table(layers: list[dict[str, Any]], kind: str) -> Table | None:
    values = sorted(
        {p["value"] for layer in layers for p in layer.get(kind) or [] if isinstance(p, dict)
         and isinstance(p.get("value"), int | float)}
    )  # fmt: skip
    if not values:
        return None
    rows = []
    for layer in layers:
        drops = {
            p.get("value"): p.get("drop") for p in layer.get(kind) or [] if isinstance(p, dict)
        }
        rows.append([str(layer.get("name", "?"))] + [drops.get(v) for v in values])
    return _table(["layer"] + [f"{kind} {fmt(v)}" for v in values], rows, "layers")


def sensitivity_sections(sens: dict[str, Any]) -> list[Section]:
    """Layer table, then for each kind a chart (drop vs value, a line per layer) and a table."""
    layers = [layer for layer in sens["layers"] if isinstance(layer, dict)]
    metric = str(sens.get("metric") or "quality")
    model = f" of {sens['model']}" if sens.get("model") else ""
    text = (
        f"Quality drop of {metric} (baseline {fmt(sens.get('baseline'))},"
        f" {'higher' if sens.get('higher_is_better', True) else 'lower'} is better) when one"
        f" layer{model} at a time is compressed, all others kept as they are."
    )
    rows = [
        [layer.get("name"), layer.get("type"), layer.get("params"), layer.get("dense_bytes")]
        for layer in layers
    ]
    main = Section(
        "Sensitivity", 2, [text, _table(["layer", "type", "params", "fp32 bytes"], rows)]
    )
    out = [main]
    for kind in SENSITIVITY_KINDS:
        table = _kind_table(layers, kind)
        if table is None:
            continue
        section = Section(f"Sensitivity to {kind}", 3)
        png = plots.sensitivity_chart(layers, kind, metric)
        if png is not None:
            section.blocks.append(Figure(f"sensitivity-{kind}", png, f"{metric} drop vs {kind}"))
        section.blocks += [f"Quality drop ({metric}) per layer and {kind} setting:", table]
        out.append(section)
    return out


def build(data: ReportData, generated: str, version: str) -> Document:
    """The whole report of ``data``: artifact, automatic search and sensitivity, as present."""
    parts = [
        name
        for name, present in (
            ("artifact", data.artifact),
            ("automatic search", data.auto),
            ("sensitivity", data.sensitivity),
        )
        if present is not None
    ]
    doc = Document(
        f"slimtorch report: {data.path.name or data.path}",
        f"{data.path} ({', '.join(parts)}); generated {generated} by slimtorch {version}",
    )
    if data.artifact is not None:
        doc.sections += artifact_sections(data.artifact, "Artifact", "")
    if data.auto is not None:
        doc.sections += auto_sections(data.auto)
    if data.sensitivity is not None:
        doc.sections += sensitivity_sections(data.sensitivity)
    return doc
