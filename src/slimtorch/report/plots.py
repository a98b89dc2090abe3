"""The report's charts as PNG bytes, drawn with matplotlib's object API (Agg, no pyplot: no
global backend or state is touched). matplotlib is imported lazily: it is the ``report`` extra.
"""

from __future__ import annotations

import io
import math
from typing import Any

from slimtorch.core.errors import UserInputError

DPI = 125  # 8-inch charts are 1000 px wide: the page's width
TOP = 20  # bars drawn in the size and latency charts
LABELLED = 10  # sensitivity lines with a legend entry; the rest are drawn grey
_DENSE, _COMPRESSED, _MUTED = "#9aa5b1", "#1f77b4", "#c8ccd0"


def require_matplotlib() -> None:
    """Raise a UserInputError that says how to install matplotlib when it is missing."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as exc:
        raise UserInputError(
            "slimtorch report draws its charts with matplotlib, which is not installed:"
            " pip install 'slimtorch[report]'"
        ) from exc


def _figure(width: float, height: float) -> Any:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def size_chart(layers: list[dict[str, Any]], top: int = TOP) -> bytes:
    """Horizontal bars of the ``top`` biggest layers: fp32 bytes beside stored bytes (log)."""
    shown = layers[:top][::-1]
    fig = _figure(8.0, 1.2 + 0.32 * len(shown))
    ax = fig.add_subplot()
    y = list(range(len(shown)))
    ax.barh([v + 0.2 for v in y], [max(g["dense_bytes"], 1) for g in shown], 0.4,
            color=_DENSE, label="fp32 (dense)")  # fmt: skip
    ax.barh([v - 0.2 for v in y], [max(g["bytes"], 1) for g in shown], 0.4,
            color=_COMPRESSED, label="stored (compressed)")  # fmt: skip
    ax.set_yticks(y, [_short(g["name"]) for g in shown], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes (log scale)")
    ax.set_title(f"Size of the {len(shown)} biggest layers")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def latency_chart(rows: list[dict[str, Any]], top: int = TOP) -> bytes:
    """Horizontal bars of the ``top`` slowest leaf modules (median ms per forward)."""
    shown = rows[:top][::-1]
    fig = _figure(8.0, 1.2 + 0.32 * len(shown))
    ax = fig.add_subplot()
    y = list(range(len(shown)))
    ax.barh(y, [r["ms"] for r in shown], 0.6, color=_COMPRESSED)
    ax.set_yticks(y, [f"{_short(r['name'], 32)} ({r['type']})" for r in shown], fontsize=8)
    ax.set_xlabel("ms per forward (median)")
    ax.set_title(f"Forward time of the {len(shown)} slowest modules")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _points(layer: dict[str, Any], kind: str) -> list[tuple[float, float]]:
    pts = []
    for p in layer.get(kind) or []:
        if not isinstance(p, dict):
            continue
        value, drop = p.get("value"), p.get("drop")
        if isinstance(value, int | float) and isinstance(drop, int | float) and math.isfinite(drop):
            pts.append((float(value), float(drop)))
    return sorted(pts)


def sensitivity_chart(layers: list[dict[str, Any]], kind: str, metric: str) -> bytes | None:
    """One line per layer: quality drop against the ``kind`` setting; None when no layer has
    points. The ``LABELLED`` most sensitive layers get colours and a legend entry."""
    named = [(str(layer.get("name", "?")), _points(layer, kind)) for layer in layers]
    series = [(i, n, pts) for i, (n, pts) in enumerate(named) if pts]
    if not series:
        return None
    series.sort(key=lambda s: -max(d for _, d in s[2]))  # most sensitive first
    fig = _figure(8.0, 4.8)
    ax = fig.add_subplot()
    for _i, _name, pts in series[LABELLED:]:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, color=_MUTED, linewidth=0.8, zorder=0)
    for rank, (i, name, pts) in enumerate(series[:LABELLED]):
        xs, ys = zip(*pts, strict=True)
        colour = f"C{i if len(layers) <= LABELLED else rank}"  # a layer keeps its colour
        ax.plot(xs, ys, color=colour, marker="o", markersize=3, linewidth=1.4,
                label=_short(name, 32))  # fmt: skip
    ax.axhline(0.0, color="black", linewidth=0.6)
    xlabel = {
        "prune": "sparsity",
        "bits": "bits per weight",
        "codebook": "codebook index bits (2**bits shared values)",
    }
    ax.set_xlabel(xlabel.get(kind, kind))
    ax.set_ylabel(f"{metric} drop (positive = worse)")
    if kind in ("bits", "codebook"):
        ticks = sorted({x for _, _, pts in series for x, _ in pts})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    rest = len(series) - min(len(series), LABELLED)
    ax.set_title(f"Sensitivity to {kind}" + (f" ({rest} flatter layers in grey)" if rest else ""))
    ax.legend(fontsize=7, loc="best", ncols=2 if len(series) > 5 else 1)
    ax.grid(alpha=0.3)
    return _png(fig)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def pareto_chart(
    trials: list[dict[str, Any]],
    pareto: list[str],
    uniform: list[str],
    budgets: dict[str, Any],
    best: str | None,
) -> bytes | None:
    """Bytes (log) against quality drop for every successful trial, latency as colour; Pareto
    front trials ringed, uniform candidates as squares, the best as a star, budget lines."""
    ok = [t for t in trials if _num(t.get("bytes")) and _num(t.get("drop")) is not None]
    if not ok:
        return None
    fig = _figure(8.0, 5.2)
    ax = fig.add_subplot()
    lat = [_num(t.get("latency_ms")) for t in ok]
    colour = all(v is not None for v in lat)
    is_uniform = [str(t.get("id")) in uniform for t in ok]
    for marker, want in (("o", False), ("s", True)):
        group = [i for i, u in enumerate(is_uniform) if u == want]
        if not group:
            continue
        art = ax.scatter(
            [ok[i]["bytes"] for i in group],
            [ok[i]["drop"] for i in group],
            c=[lat[i] for i in group] if colour else _COMPRESSED,
            cmap="viridis",
            vmin=min(v for v in lat if v is not None) if colour else None,
            vmax=max(v for v in lat if v is not None) if colour else None,
            marker=marker,
            s=36,
            edgecolors="black",
            linewidths=0.4,
            label="uniform candidate" if marker == "s" else "trial",
        )
        if colour and marker == "o":
            fig.colorbar(art, ax=ax, label="latency ms")
    front = [t for t in ok if str(t.get("id")) in pareto]
    if front:  # the front is over (bytes, latency, drop): ringed, not joined by a 2-D line
        ax.scatter([t["bytes"] for t in front], [t["drop"] for t in front], s=110,
                   facecolors="none", edgecolors="#d62728", linewidths=1.4,
                   label="Pareto front")  # fmt: skip
    star = [t for t in ok if best is not None and str(t.get("id")) == str(best)]
    if star:
        ax.scatter([star[0]["bytes"]], [star[0]["drop"]], marker="*", s=260, color="#ff7f0e",
                   edgecolors="black", linewidths=0.6, zorder=5, label="best")  # fmt: skip
    if _num(budgets.get("max_bytes")):
        ax.axvline(budgets["max_bytes"], color="grey", linestyle="--", label="max bytes")
    if _num(budgets.get("max_drop")) is not None:
        ax.axhline(budgets["max_drop"], color="grey", linestyle=":", label="max drop")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk (log scale)")
    ax.set_ylabel("quality drop (positive = worse)")
    title = "Trials: size against quality"
    if _num(budgets.get("max_latency_ms")):
        title += f" (latency budget {budgets['max_latency_ms']:.3g} ms)"
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)
