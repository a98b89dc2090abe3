"""`slimtorch distill` command: parser and a 3-step run on a tiny Hugging Face encoder."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from slimtorch import api
from slimtorch.cli.commands import distill as cmd_distill
from slimtorch.core.errors import ConfigError
from slimtorch.testing.models import tiny_bert

transformers = pytest.importorskip("transformers")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimtorch")
    cmd_distill.add_parser(parser.add_subparsers(dest="command"))
    return parser


def _tiny_bert_dir(path: Path) -> Path:
    # max_positions 128: api.evaluate's latency input is 128 tokens
    model = tiny_bert(3, vocab=30522, hidden=16, heads=2, intermediate=24, max_positions=128)
    model.save_pretrained(path)  # type: ignore[operator]
    return path


def test_distill_command_shrinks_trains_saves(tmp_path: Path) -> None:
    model_dir = _tiny_bert_dir(tmp_path / "bert")
    text = tmp_path / "s.txt"
    text.write_text("A small model learns from a big one. " * 2 + "Cats sleep all day long. ")
    out = tmp_path / "out"
    argv = ["distill", "--teacher", str(model_dir), "--keep-layers", "0,2", "--data", str(text)]
    argv += ["--steps", "3", "--batch-size", "2", "--out", str(out), "--json"]
    args = _parser().parse_args(argv)
    report = cmd_distill.run(args)
    assert report["steps"] == 3 and report["kept_layers"] == [0, 2]
    assert set(report["loss_terms"]) == {
        "output",
        "hidden.encoder.layer.0",
        "hidden.encoder.layer.1",
    }
    loaded = api.load(out)
    assert len(loaded.encoder.layer) == 2
    assert report["params"] < report["teacher_params"]
    assert api.get_metadata(loaded)["distilled_from"] == str(model_dir)
    assert "->" in cmd_distill.render(report)
    with pytest.raises(ConfigError, match="exists"):
        cmd_distill.run(args)


def test_bad_keep_layers_is_a_config_error(tmp_path: Path) -> None:
    args = _parser().parse_args(
        ["distill", "--teacher", "builtin:minilm", "--keep-layers", "0,x", "--out", str(tmp_path)]
    )
    with pytest.raises(ConfigError, match="comma-separated"):
        cmd_distill.run(args)
    args = _parser().parse_args(
        ["distill", "--teacher", "builtin:minilm", "--alpha", "2", "--out", str(tmp_path / "o")]
    )
    with pytest.raises(ConfigError, match="alpha"):
        cmd_distill.run(args)


def test_model_without_task_or_text_is_refused(tmp_path: Path) -> None:
    args = _parser().parse_args(
        ["distill", "--teacher", "slimtorch.testing.models:tiny_cnn", "--out", str(tmp_path / "o")]
    )
    with pytest.raises(ConfigError, match="no training task"):
        cmd_distill.run(args)
    assert not (tmp_path / "o").exists()
