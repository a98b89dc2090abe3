"""Text formatting shared by the commands: numbers, aligned tables, before/after reports."""

from __future__ import annotations

from typing import Any


def fmt(v: Any) -> str:
    """``-`` for None, 4 significant digits for floats, thousands separators for integers."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(rows: list[list[Any]], header: list[str]) -> str:
    """Left-aligned columns under ``header``, with a dashed rule below it."""
    cells = [header] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def before_after(r: dict[str, Any]) -> str:
    """The original model's figures beside the compressed one's (compress, eval, demo)."""
    metric = r.get("metric") or "quality"
    rows = [
        [metric, r.get("baseline_value"), r.get("value")],
        ["bytes on disk", r.get("dense_bytes"), r.get("bytes_on_disk")],
        ["compression ratio", 1.0, r.get("compression_ratio")],
        [
            f"latency ms (batch {r.get('latency_batch', 1)})",
            r.get("baseline_latency_ms"),
            r.get("latency_ms"),
        ],
        ["params", r.get("baseline_params"), r.get("params")],
        ["nonzero params", r.get("baseline_nonzero_params"), r.get("nonzero_params")],
    ]
    if r.get("kld_mean") is not None:  # the LLM quality suite
        rows += [
            ["LLM suite perplexity", r.get("baseline_perplexity"), r.get("perplexity")],
            ["KLD mean / p99", 0.0, f"{r['kld_mean']:.4g} / {r.get('kld_p99', 0.0):.4g}"],
            ["top-1 agreement", 1.0, r.get("top1_agreement")],
        ]
    if r.get("tokens_per_s") is not None:  # a causal LM's decoding speed
        rows.append(
            ["tokens/s (greedy, batch 1)", r.get("baseline_tokens_per_s"), r["tokens_per_s"]]
        )
    return table(rows, ["", "original (fp32)", "compressed"])
