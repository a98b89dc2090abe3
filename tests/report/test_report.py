"""`slimtorch report`: self-contained HTML + Markdown for artifacts, searches, sensitivity."""

from __future__ import annotations

import base64
import builtins
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch

import slimtorch as st
from slimtorch.cli.commands import report as cmd_report
from slimtorch.core.errors import UserInputError
from slimtorch.core.info import update_info
from slimtorch.report import write_report
from slimtorch.report.collect import module_latency_ms
from slimtorch.report.markdown import escape_md
from slimtorch.testing.models import tiny_cnn

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RECIPE = {
    "stages": [
        {"method": "prune.magnitude", "sparsity": 0.75},
        {"method": "quantize.rtn", "bits": 8},
    ]
}
EVIL = "<script>alert(1)</script>"


class _Page(HTMLParser):
    """Collects tags, table cells and img sources; fails on unbalanced table markup."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.cells: list[str] = []
        self.text: list[str] = []
        self.open: list[str] = []
        self._cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag in ("table", "tr", "td", "th"):
            self.open.append(tag)
        if tag in ("td", "th"):
            self._cell, self.cells = True, [*self.cells, ""]
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("table", "tr", "td", "th"):
            assert self.open.pop() == tag
        if tag in ("td", "th"):
            self._cell = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell:
            self.cells[-1] += data


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    assert not page.open
    return page


def _artifact(path: Path) -> Path:
    model = tiny_cnn()
    update_info(model, input={"shape": [1, 1, 8, 8], "dtype": "float32"})
    st.save(st.compress(model, RECIPE).model, path)
    return path


def _sensitivity(path: Path) -> None:
    layers = []
    for i, name in enumerate(["conv", "fc1", EVIL]):
        layers.append(
            {
                "name": name,
                "type": "Linear",
                "params": 100 * (i + 1),
                "dense_bytes": 400 * (i + 1),
                "prune": [{"value": v, "quality": 0.9 - v * i, "drop": v * i} for v in (0.5, 0.9)],
                "bits": [{"value": b, "quality": 0.9, "drop": 0.1 * i / b} for b in (2, 4, 8)],
            }
        )
    doc = {"kind": "slimtorch.sensitivity", "version": 1, "model": None, "metric": "accuracy"}
    doc |= {"higher_is_better": True, "baseline": 0.9, "layers": layers}
    (path / "sensitivity.json").write_text(json.dumps(doc))


def _auto(path: Path) -> Path:
    path.mkdir()
    meta = {
        "kind": "slimtorch.auto",
        "version": 1,
        "model": "builtin:lenet5-fashion",
        "metric": "accuracy",
        "higher_is_better": True,
        "baseline": {"quality": 0.9, "bytes": 20000, "latency_ms": 1.0},
        "budgets": {"max_bytes": 6000, "max_latency_ms": None, "max_drop": 0.02},
        "best": 2,
        "status": "done",
        "trials": 4,
        "uniform": [1],
    }
    (path / "auto.json").write_text(json.dumps(meta))
    trials = [
        {"id": 1, "label": "uniform int8", "status": "ok", "bytes": 5000, "latency_ms": 0.5},
        {"id": 2, "label": EVIL, "status": "ok", "bytes": 3000, "latency_ms": 0.4},
        {"id": 3, "label": "sparse", "status": "ok", "bytes": 9000, "latency_ms": 0.7},
        {"id": 4, "label": "x", "status": "failed", "error": "NaN & <inf>"},
    ]
    for t, drop in zip(trials, (0.01, 0.015, 0.03, None), strict=True):
        t |= {"drop": drop, "quality": None if drop is None else 0.9 - drop}
        t |= {"recipe": RECIPE, "meets_budget": drop is not None and drop <= 0.02}
    lines = [json.dumps(t) for t in trials]
    (path / "trials.jsonl").write_text("\n".join(lines) + "\n{partial")
    (path / "pareto.json").write_text(json.dumps({"ids": [1, 2]}))
    _artifact(path / "best")
    return path


def _check_page(html: str) -> _Page:
    page = _parse(html)
    assert not re.search(r"https?://", html)
    assert "<script" not in html.lower()
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    for src in page.images:
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    return page


def test_artifact_report_has_tables_charts_latency(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "art")
    (art / "eval.json").write_text(json.dumps({"metric": "accuracy", "value": 0.875}))
    threads = torch.get_num_threads()
    result = write_report(art, latency=True, repeats=3, threads=2, trust_factory=True)
    assert torch.get_num_threads() == threads  # restored
    out = tmp_path / "art-report"  # beside the artifact: its byte count stays honest
    assert result["out"] == str(out) and result["contains"] == ["artifact"]
    assert result["latency"] and result["images"] == ["latency.png", "size.png"]
    html = (out / "report.html").read_text()
    page = _check_page(html)
    assert len(page.images) == 2
    for cell in ("fc1.weight", "fc1", "conv1d.bias", "dense", "0.875"):
        assert cell in page.cells
    assert any(c.startswith("coded") for c in page.cells)
    assert {"module", "calls", "Linear", "Conv1d", "Conv2d"} <= set(page.cells)  # latency
    assert "median of 3, 2 torch threads" in html
    manifest = json.loads((art / "manifest.json").read_text())
    on_disk = sum(f["bytes"] for f in manifest["files"].values())
    on_disk += (art / "manifest.json").stat().st_size  # eval.json is not artifact bytes
    assert f"{on_disk:,}" in page.cells
    assert f"{(32 * 128 + 32) * 4:,}" in page.cells  # fc1 layer fp32 bytes
    md = (out / "report.md").read_text()
    assert "![fp32 vs stored bytes](size.png)" in md and "| fc1.weight |" in md
    assert (out / "size.png").read_bytes().startswith(PNG_MAGIC)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_module_latency_rows_cover_every_leaf() -> None:
    model = tiny_cnn()
    total, rows = module_latency_ms(model, (torch.randn(1, 1, 8, 8),), repeats=3, warmup=1)
    assert [r["name"] for r in sorted(rows, key=lambda r: r["name"])] == [
        "conv",
        "conv1d",
        "fc1",
        "fc2",
    ]
    assert all(r["calls"] == 1 and r["ms"] > 0 for r in rows)
    assert sum(r["ms"] for r in rows) <= total
    assert rows == sorted(rows, key=lambda r: -r["ms"])
    assert not model.conv._forward_hooks and not model.conv._forward_pre_hooks


def test_auto_and_sensitivity_report(tmp_path: Path) -> None:
    auto = _auto(tmp_path / "auto")
    _sensitivity(auto)
    result = write_report(auto, tmp_path / "rep")
    assert result["contains"] == ["auto", "sensitivity"]
    assert result["images"] == [
        "best-size.png",
        "pareto.png",
        "sensitivity-bits.png",
        "sensitivity-prune.png",
    ]
    html = (tmp_path / "rep" / "report.html").read_text()
    page = _check_page(html)
    assert "&lt;script&gt;" in html
    assert EVIL in page.cells  # shown literally, as text
    assert "NaN & <inf>" in page.cells and "NaN &amp; &lt;inf&gt;" in html
    roles = {c for c in page.cells if c.startswith(("front,", "best,", "uniform,"))}
    assert roles == {"front, uniform", "best, front"}
    assert "prune 0.9" in page.cells and "bits 8" in page.cells
    assert "quantize.rtn" in html  # the best trial's recipe
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "&lt;script&gt;" in md and "<script" not in md
    assert "![accuracy drop vs prune](sensitivity-prune.png)" in md
    for name in result["images"]:
        assert (tmp_path / "rep" / name).read_bytes().startswith(PNG_MAGIC)


def test_out_exists_needs_force_and_a_report(tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    _sensitivity(src)
    out = tmp_path / "rep"
    write_report(src, out)
    with pytest.raises(UserInputError, match="--force"):
        write_report(src, out)
    assert write_report(src, out, force=True)["out"] == str(out)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UserInputError, match="holds no slimtorch report"):
        write_report(src, other, force=True)
    with pytest.raises(UserInputError, match="would replace the directory"):
        write_report(src, src, force=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_bad_dir_names_what_it_looked_for(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"manifest\.json.*auto\.json.*sensitivity\.json"):
        write_report(tmp_path, tmp_path / "rep")
    with pytest.raises(UserInputError, match="not a directory"):
        write_report(tmp_path / "missing", tmp_path / "rep")
    (tmp_path / "sensitivity.json").write_text('{"layers": 3}')
    with pytest.raises(UserInputError, match="no 'layers' list"):
        write_report(tmp_path, tmp_path / "rep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sensitivity.json"]
    with pytest.raises(UserInputError, match="at least 1"):
        write_report(tmp_path, tmp_path / "rep", latency=True, repeats=0)


def test_missing_matplotlib_is_a_clear_error(tmp_path: Path, monkeypatch: Any) -> None:
    _sensitivity(tmp_path)
    real = builtins.__import__

    def no_mpl(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(UserInputError, match=r"pip install 'slimtorch\[report\]'"):
        write_report(tmp_path, tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def test_cli_parser_run_render(tmp_path: Path) -> None:
    import argparse

    _sensitivity(tmp_path)
    parser = argparse.ArgumentParser()
    cmd_report.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(tmp_path), "--out", str(tmp_path / "r"), "--json"])
    result = cmd_report.run(args)
    text = cmd_report.render(result)
    assert "report.html" in text and "sensitivity" in text and "2 PNG charts" in text
    json.dumps(result)


def test_escape_md_keeps_table_cells_literal() -> None:
    assert escape_md("a|b <i>") == "a\\|b &lt;i&gt;"
    assert escape_md("x_y\nz") == "x\\_y z"


def test_cli_latency_report_of_a_factory_artifact_needs_model_or_trust(tmp_path: Path) -> None:
    from slimtorch.cli.main import main

    art = _artifact(tmp_path / "art")
    assert (
        main(["report", str(art), "--latency", "--repeats", "1", "--out", str(tmp_path / "a")]) == 2
    )
    assert not (tmp_path / "a").exists()  # nothing half-written
    model = "slimtorch.testing.models:tiny_cnn"
    args = ["--latency", "--repeats", "1", "--json"]
    assert main(["report", str(art), *args, "--out", str(tmp_path / "b"), "--model", model]) == 0
    assert main(["report", str(art), *args, "--out", str(tmp_path / "c"), "--trust-factory"]) == 0
    assert (tmp_path / "b" / "report.html").is_file() and (tmp_path / "c" / "report.html").is_file()
