"""Render a report document as one self-contained HTML page: inline CSS, charts as base64 PNG
data URIs, no script and no external reference. Every string from the data is escaped."""

from __future__ import annotations

import base64
import re
from html import escape

from slimtorch.report.document import Code, Document, Figure, Section, Table

CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2329;
       margin: 0 auto; padding: 24px 32px 48px; max-width: 1200px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #d8dee4; }
h3 { font-size: 16px; margin: 26px 0 8px; }
h4 { font-size: 14px; margin: 20px 0 6px; }
p.sub { color: #57606a; margin: 0 0 16px; }
nav { background: #f6f8fa; border: 1px solid #d8dee4; border-radius: 6px; padding: 8px 16px; }
nav ul { margin: 4px 0; padding-left: 20px; }
nav li.l3 { margin-left: 18px; font-size: 13px; }
nav a { color: #0969da; text-decoration: none; }
.scroll { overflow-x: auto; margin: 8px 0 4px; }
table { border-collapse: collapse; font-size: 12.5px; }
th, td { border: 1px solid #d8dee4; padding: 3px 8px; text-align: left; white-space: nowrap; }
th { background: #f6f8fa; font-weight: 600; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
p.note { color: #57606a; font-size: 12px; margin: 2px 0 10px; }
figure { margin: 12px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 12px; }
pre { background: #f6f8fa; border: 1px solid #d8dee4; border-radius: 6px; padding: 10px;
      font-size: 12px; overflow-x: auto; }
"""

_NUMERIC = re.compile(r"^[-+]?[\d,]*\.?\d+(e[-+]?\d+)?%?$|^-$")


def _anchor(index: int, title: str) -> str:
    return f"s{index}-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40]


def _numeric_columns(table: Table) -> list[bool]:
    cols = []
    for i in range(len(table.header)):
        cells = [r[i] for r in table.rows if i < len(r)]
        real = [c for c in cells if c != "-"]
        cols.append(bool(real) and all(_NUMERIC.match(c) for c in real))
    return cols


def render_table(table: Table) -> str:
    numeric = _numeric_columns(table)
    head = "".join(f"<th>{escape(h)}</th>" for h in table.header)
    body = []
    for row in table.rows:
        cells = "".join(
            f'<td class="num">{escape(c)}</td>' if numeric[i] else f"<td>{escape(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    html = (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )
    if table.note:
        html += f'<p class="note">{escape(table.note)}</p>'
    return html


def render_figure(fig: Figure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(fig.caption)}">'
        f"<figcaption>{escape(fig.caption)}</figcaption></figure>"
    )


def _block(block: str | Table | Figure | Code) -> str:
    if isinstance(block, Table):
        return render_table(block)
    if isinstance(block, Figure):
        return render_figure(block)
    if isinstance(block, Code):
        return f"<pre>{escape(block.text)}</pre>"
    return f"<p>{escape(block)}</p>"


def _section(index: int, section: Section) -> str:
    level = min(max(section.level, 2), 4)
    head = f'<h{level} id="{_anchor(index, section.title)}">{escape(section.title)}</h{level}>'
    return "\n".join([head] + [_block(b) for b in section.blocks])


def _nav(doc: Document) -> str:
    items = [
        f'<li class="l{s.level}"><a href="#{_anchor(i, s.title)}">{escape(s.title)}</a></li>'
        for i, s in enumerate(doc.sections)
        if s.level <= 3
    ]
    return f"<nav><strong>Contents</strong><ul>{''.join(items)}</ul></nav>"


def render_html(doc: Document) -> str:
    """The whole page as a string."""
    body = "\n".join(_section(i, s) for i, s in enumerate(doc.sections))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(doc.title)}</title>\n<style>{CSS}</style></head>\n<body>\n"
        f'<h1>{escape(doc.title)}</h1>\n<p class="sub">{escape(doc.subtitle)}</p>\n'
        f"{_nav(doc)}\n{body}\n</body></html>\n"
    )
