"""Render a report document as Markdown; its charts are PNG files written beside report.md.
Text is escaped so that table pipes and HTML-looking names (``<script>``) stay literal."""

from __future__ import annotations

from slimtorch.report.document import Code, Document, Figure, Section, Table


def escape_md(text: str) -> str:
    """Literal text for a Markdown paragraph or table cell (one line)."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in "\\`*_[]|":
        text = text.replace(ch, "\\" + ch)
    return " ".join(text.split())


def figure_file(fig: Figure) -> str:
    return f"{fig.name}.png"


def render_table(table: Table) -> str:
    lines = [
        "| " + " | ".join(escape_md(h) or " " for h in table.header) + " |",
        "|" + "|".join("---" for _ in table.header) + "|",
    ]
    lines += ["| " + " | ".join(escape_md(c) for c in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", f"*{escape_md(table.note)}*"]
    return "\n".join(lines)


def _block(block: str | Table | Figure | Code) -> str:
    if isinstance(block, Table):
        return render_table(block)
    if isinstance(block, Figure):
        return f"![{escape_md(block.caption)}]({figure_file(block)})"
    if isinstance(block, Code):
        fence = "````" if "```" in block.text else "```"
        return f"{fence}json\n{block.text}\n{fence}"
    return escape_md(block)


def _section(section: Section) -> str:
    head = "#" * min(max(section.level, 2), 4) + " " + escape_md(section.title)
    return "\n\n".join([head] + [_block(b) for b in section.blocks])


def render_markdown(doc: Document) -> tuple[str, dict[str, bytes]]:
    """The Markdown text and ``{file name: PNG bytes}`` of the images it links."""
    parts = [f"# {escape_md(doc.title)}", escape_md(doc.subtitle)]
    parts += [_section(s) for s in doc.sections]
    files = {figure_file(f): f.png for f in doc.figures()}
    return "\n\n".join(parts) + "\n", files
