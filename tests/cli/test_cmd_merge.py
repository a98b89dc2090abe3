"""`slimtorch merge` through the CLI entry: builtin + artifacts in, a loadable artifact out."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml

import slimtorch as st
from slimtorch import api
from slimtorch.cli.commands import merge as cmd_merge
from slimtorch.core.errors import ArtifactError, ConfigError
from slimtorch.merge import methods as M
from slimtorch.models.registry import load_model
from slimtorch.workflows.evaluate import evaluate_dir

BASE = "builtin:lenet300-fashion"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slimtorch")
    cmd_merge.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["merge", *argv])


def _perturbed(tmp: Path, name: str, seed: int) -> dict[str, torch.Tensor]:
    loaded = load_model(BASE)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    api.set_architecture(loaded.model, loaded.architecture)
    st.save(loaded.model, tmp / name)
    return {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}


def test_merge_builtin_with_artifacts_and_load(tmp_path: Path) -> None:
    a, b = _perturbed(tmp_path, "a", 1), _perturbed(tmp_path, "b", 2)
    base = load_model(BASE).model.state_dict()
    cfg = {
        "merge_method": "ties",
        "base_model": BASE,
        "models": [
            {"model": "a", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": "b", "parameters": {"weight": 0.4, "density": 0.5}},
        ],
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))  # model paths relative to the config's directory
    out = tmp_path / "out"
    result = cmd_merge.run(_args(str(path), "--out", str(out)))
    assert result["method"] == "ties" and result["output_format"] == "slimtorch"
    assert result["tensors"] == result["tensors_merged"] == 6
    assert result["bytes_on_disk"] > 300 * 784 * 4
    assert "peak_rss_mb" in result and "merged 3 models" in cmd_merge.render(result)
    model = st.load(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, M.ties(base[k], [a[k], b[k]], [0.6, 0.4], 0.5)), k
    meta = api.get_metadata(model)
    assert meta["source"] == BASE and meta["evaluator"] == "accuracy"
    assert meta["merge"]["method"] == "ties" and meta["dense_bytes"] > 0
    report = evaluate_dir(out, baseline=False)
    assert report["value"] > 0.7  # accuracy on Fashion-MNIST stays close to the base's

    with pytest.raises(ArtifactError, match="exists"):
        cmd_merge.run(_args(str(path), "--out", str(out)))
    again = cmd_merge.run(_args(str(path), "--out", str(out), "--force", "--json"))
    assert again["tensors"] == 6


def test_bad_config_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "breadcrumbs", "models": [{"model": BASE}]}))
    with pytest.raises(ConfigError, match="not supported"):
        cmd_merge.run(_args(str(path), "--out", str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
