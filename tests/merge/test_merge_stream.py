"""Streaming merges from safetensors files and directories: same tensors as the in-memory maths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimtorch.core.errors import ConfigError
from slimtorch.merge import methods as M
from slimtorch.merge.mergekit import parse_config
from slimtorch.merge.stream import merge_to_dir, open_source
from slimtorch.testing.models import tiny_bert


def _model(seed: int, rows: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(rows, 4, generator=g),
        "fc.weight": torch.randn(3, 4, generator=g),
        "fc.bias": torch.randn(3, generator=g),
        "position_ids": torch.arange(5),
    }


def _save(tmp: Path, models: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, sd in models.items():
        save_file(sd, str(tmp / f"{name}.safetensors"))


def _cfg(method: str, models: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"merge_method": method, "models": models}
    if method != "linear":
        cfg["base_model"] = "base.safetensors"
    if params:
        cfg["parameters"] = params
    return cfg


def _run(tmp: Path, cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    out = tmp / "out"
    report = merge_to_dir(parse_config(cfg), out, force=True, seed=seed, config_dir=tmp)
    assert report["tensors"] == 4 and report["tensors_copied"] == 1
    assert report["output_format"] == "safetensors"
    return load_file(str(out / "model.safetensors"))


@pytest.fixture
def models(tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    ms = {"base": _model(0), "a": _model(1), "b": _model(2)}
    _save(tmp_path, ms)
    return ms


def _two(weights: tuple[float, float], density: float = 1.0) -> list[dict[str, Any]]:
    return [
        {"model": "a.safetensors", "parameters": {"weight": weights[0], "density": density}},
        {"model": "b.safetensors", "parameters": {"weight": weights[1], "density": density}},
    ]


def test_streamed_equals_in_memory(tmp_path: Path, models: dict[str, Any]) -> None:
    base, a, b = models["base"], models["a"], models["b"]
    floats = [k for k in base if base[k].is_floating_point()]
    lin = _run(
        tmp_path,
        _cfg(
            "linear",
            [
                {"model": "a.safetensors", "parameters": {"weight": 0.3}},
                {"model": "b.safetensors", "parameters": {"weight": 0.9}},
            ],
        ),
    )
    ta = _run(tmp_path, _cfg("task_arithmetic", _two((0.5, -0.25)), **{"lambda": 0.8}))
    ti = _run(tmp_path, _cfg("ties", _two((0.7, 0.4), density=0.5)))
    sl = _run(tmp_path, _cfg("slerp", [{"model": "a.safetensors"}], t=0.3))
    for k in floats:
        assert torch.equal(lin[k], M.linear([a[k], b[k]], [0.3, 0.9]))
        opts = M.TaskMergeOptions(lam=0.8)
        assert torch.equal(ta[k], M.task_merge(base[k], [a[k], b[k]], [0.5, -0.25], [1, 1], opts))
        assert torch.equal(ti[k], M.ties(base[k], [a[k], b[k]], [0.7, 0.4], 0.5))
        assert torch.equal(sl[k], M.slerp(0.3, base[k], a[k]))
    assert torch.equal(lin["position_ids"], base["position_ids"])


def test_dare_is_deterministic_under_seed(tmp_path: Path, models: dict[str, Any]) -> None:
    cfg = _cfg("dare_ties", _two((1.0, 1.0), density=0.5))
    first, again, other = _run(tmp_path, cfg, 3), _run(tmp_path, cfg, 3), _run(tmp_path, cfg, 4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["fc.weight"], other["fc.weight"])
    base, a, b = models["base"], models["a"], models["b"]
    gen = M.tensor_generator(3, "fc.weight")
    want = M.dare(base["fc.weight"], [a["fc.weight"], b["fc.weight"]], [1, 1], 0.5, gen, True)
    assert torch.equal(first["fc.weight"], want)


def test_dtype_and_out_dtype(tmp_path: Path, models: dict[str, Any]) -> None:
    cfg = {**_cfg("task_arithmetic", _two((0.5, 0.5))), "dtype": "float64", "out_dtype": "bfloat16"}
    out = _run(tmp_path, cfg)
    assert out["fc.weight"].dtype == torch.bfloat16 and out["position_ids"].dtype == torch.int64
    base, a, b = (models[n]["fc.weight"].double() for n in ("base", "a", "b"))
    assert torch.equal(out["fc.weight"], M.task_arithmetic(base, [a, b], [0.5, 0.5]).bfloat16())


def test_mismatched_shapes_name_the_tensor(tmp_path: Path, models: dict[str, Any]) -> None:
    bad = dict(models["a"], **{"fc.weight": torch.zeros(3, 5)})
    save_file(bad, str(tmp_path / "a.safetensors"))
    with pytest.raises(
        ConfigError, match=r"'fc.weight' has shape \[3, 4\] in base.safetensors but \[3, 5\]"
    ):
        _run(tmp_path, _cfg("ties", _two((1, 1))))
    assert not (tmp_path / "out").exists()


def test_vocab_mismatch_says_so(tmp_path: Path) -> None:
    _save(tmp_path, {"base": _model(0), "a": _model(1, rows=7), "b": _model(2)})
    with pytest.raises(ConfigError, match=r"vocabularies differ: embed\.weight has 6 rows"):
        _run(tmp_path, _cfg("ties", _two((1, 1))))


def test_missing_tensor_and_missing_model(tmp_path: Path, models: dict[str, Any]) -> None:
    save_file(
        {k: v for k, v in models["a"].items() if k != "fc.bias"}, str(tmp_path / "a.safetensors")
    )
    with pytest.raises(ConfigError, match=r"1 missing from a.safetensors \(e.g. \['fc.bias'\]\)"):
        _run(tmp_path, _cfg("ties", _two((1, 1))))
    with pytest.raises(ConfigError, match="not found"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no \*.safetensors"):
        open_source(str(tmp_path / "empty"))


def test_hf_directory_output_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    sds = []
    for seed, name in ((0, "m0"), (1, "m1")):
        model = tiny_bert(
            1, vocab=30, hidden=8, heads=2, intermediate=16, max_positions=16, seed=seed
        )
        model.save_pretrained(tmp_path / name)  # type: ignore[operator]
        (tmp_path / name / "tokenizer_config.json").write_text("{}")
        sds.append(model.state_dict())
    raw = {
        "merge_method": "linear",
        "dtype": "float32",
        "out_dtype": "bfloat16",
        "models": [
            {"model": "m0", "parameters": {"weight": 1}},
            {"model": "m1", "parameters": {"weight": 3}},
        ],
    }
    report = merge_to_dir(parse_config(raw), tmp_path / "out", config_dir=tmp_path)
    assert report["output_format"] == "hf"
    out = tmp_path / "out"
    assert (out / "tokenizer_config.json").read_text() == "{}"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "slimtorch_merge.json").read_text())["merge"]["method"] == "linear"
    merged = transformers.BertModel.from_pretrained(out, dtype=torch.float32)
    w = "encoder.layer.0.attention.self.query.weight"
    want = M.linear([sds[0][w], sds[1][w]], [1.0, 3.0]).bfloat16().float()
    assert torch.equal(merged.state_dict()[w], want)
