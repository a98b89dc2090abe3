"""Reports: one self-contained HTML page and the same content as Markdown (with PNG charts
beside it) for an artifact, an automatic search and a sensitivity analysis.

    from slimtorch.report import write_report
    write_report("out/", "out-report/", latency=True)

Needs matplotlib (``pip install 'slimtorch[report]'``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slimtorch.core.errors import UserInputError
from slimtorch.formats.atomic import fsync_dir, temp_sibling, write_file

HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"

__all__ = ["HTML_FILE", "MARKDOWN_FILE", "default_out", "write_report"]


def default_out(path: Path) -> Path:
    """``DIR-report`` beside ``DIR``: files inside an artifact would count as its bytes, and
    `slimtorch auto --force` refuses directories holding files it did not write."""
    path = path.resolve()
    return path.parent / f"{path.name}-report"


def _check_out(out: Path, source: Path, force: bool) -> None:
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise UserInputError(
            f"--out {out} would replace the directory being reported on; choose another --out"
        )
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a directory; choose another --out")
    if not force:
        raise UserInputError(f"--out {out} exists; pass --force to replace it")
    names = set(os.listdir(out))
    if names and not names & {HTML_FILE, MARKDOWN_FILE}:
        raise UserInputError(
            f"--out {out} is not empty and holds no slimtorch report; refusing to replace it"
            " even with --force: choose another --out"
        )


def _write_dir(out: Path, files: dict[str, bytes], force: bool, source: Path) -> None:
    """Write ``files`` into a hidden sibling of ``out``, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        for name, data in files.items():
            write_file(tmp / name, data)
        fsync_dir(tmp)
        _check_out(out, source, force)  # again: the directory may have appeared meanwhile
        old = None
        if os.path.lexists(out):
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_report(
    path: str | Path,
    out: str | Path | None = None,
    latency: bool = False,
    force: bool = False,
    repeats: int = 20,
    threads: int = 1,
    trust_factory: bool = False,
    model: Any = None,
) -> dict[str, Any]:
    """Write ``report.html`` (self-contained) and ``report.md`` (with its PNG charts) for the
    directory ``path`` into ``out`` (default: :func:`default_out`). ``latency`` loads the
    artifact(s) and times every leaf module over ``repeats`` forwards on ``threads`` torch
    threads; an artifact of a Python factory loads only with ``model`` or ``trust_factory``
    (as :func:`slimtorch.load`). Returns a summary."""
    from slimtorch import __version__
    from slimtorch.report.collect import LatencyOptions, collect
    from slimtorch.report.document import build
    from slimtorch.report.html import render_html
    from slimtorch.report.markdown import render_markdown
    from slimtorch.report.plots import require_matplotlib

    require_matplotlib()
    source = Path(path)
    target = Path(out) if out is not None else default_out(source)
    if source.is_dir():
        _check_out(target, source, force)  # fail before the (slow) latency runs
    data = collect(source, LatencyOptions(latency, repeats, threads, trust_factory, model))
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc = build(data, generated, __version__)
    page = render_html(doc).encode("utf-8")
    text, images = render_markdown(doc)
    files = {HTML_FILE: page, MARKDOWN_FILE: text.encode("utf-8"), **images}
    _write_dir(target, files, force, source)
    return {
        "dir": str(source),
        "out": str(target),
        "html": str(target / HTML_FILE),
        "markdown": str(target / MARKDOWN_FILE),
        "html_bytes": len(page),
        "images": sorted(images),
        "contains": [
            name
            for name, part in (
                ("artifact", data.artifact),
                ("auto", data.auto),
                ("sensitivity", data.sensitivity),
            )
            if part is not None
        ],
        "sections": [s.title for s in doc.sections],
        "latency": any(
            a is not None and a.latency is not None
            for a in (data.artifact, data.auto.best if data.auto else None)
        ),
    }
