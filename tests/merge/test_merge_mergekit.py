"""mergekit YAML parsing: good configs resolve like mergekit, each bad case names the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from slimtorch.core.errors import ConfigError
from slimtorch.merge.mergekit import load_config, parse_config


def _cfg(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 0.5, "density": 0.4}},
            {"model": "b", "parameters": {"weight": 0.7}},
        ],
        "parameters": {"density": 0.9},
        "dtype": "bfloat16",
    }
    base.update(over)
    return base


def test_ties_resolves_inputs_defaults_and_precedence() -> None:
    cfg = parse_config(_cfg())
    assert cfg.method == "ties"
    assert [i.model for i in cfg.inputs] == ["a", "b", "base"]  # base appended, as mergekit
    assert cfg.base_index == 2
    assert [i.density for i in cfg.inputs[:2]] == [0.4, 0.9]  # model value beats global
    assert cfg.normalize is True and cfg.rescale is None and cfg.scale == 1.0
    assert cfg.dtype == "bfloat16" and cfg.out_dtype is None


def test_method_defaults_follow_mergekit() -> None:
    dare = parse_config(_cfg(merge_method="dare_linear"))
    assert dare.normalize is False and dare.rescale == "l1"
    ta = parse_config(_cfg(merge_method="task_arithmetic", parameters={"lambda": 0.5}))
    assert ta.normalize is False and ta.scale == 0.5
    paper = parse_config(_cfg(merge_method="dare_ties", parameters={"rescale": "density"}))
    assert paper.rescale == "density"


def test_linear_and_slerp() -> None:
    lin = parse_config(
        {
            "merge_method": "linear",
            "models": [{"model": "a"}, {"model": "b"}],
            "parameters": {"weight": 2},
        }
    )
    assert [i.weight for i in lin.inputs] == [2.0, 2.0] and lin.base_index is None
    sl = parse_config(
        {
            "merge_method": "slerp",
            "base_model": "a",
            "models": [{"model": "a"}, {"model": "b"}],
            "parameters": {"t": 0.25},
        }
    )
    assert sl.t == 0.25 and sl.base_index == 0


def test_yaml_file_and_ignored_keys_warn(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        yaml.safe_dump(_cfg(chat_template="chatml", parameters={"int8_mask": True, "weight": 1}))
    )
    with pytest.warns(UserWarning) as record:
        cfg = load_config(path)
    messages = " ".join(str(w.message) for w in record)
    assert "chat_template" in messages and "int8_mask" in messages
    assert cfg.inputs[1].weight == 0.7 and cfg.tokenizer_source is None


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"slices": [{"sources": []}]}, "unsupported"),
        ({"modules": {}}, "unsupported"),
        ({"foo": 1, "bar": 2}, r"unknown merge config keys \['bar', 'foo'\]"),
        ({"merge_method": "tie"}, "did you mean 'ties'"),
        ({"merge_method": "breadcrumbs"}, "not supported"),
        ({"base_model": None}, "needs `base_model`"),
        ({"models": []}, "non-empty list"),
        ({"models": ["a"]}, "mapping with a `model` key"),
        ({"models": [{"model": {"path": "x"}}]}, "path or builtin"),
        ({"models": [{"model": "a", "weight": 1}]}, "unknown keys"),
        ({"models": [{"model": "a"}], "parameters": {}}, "no `weight` for \\['a'\\]"),
        ({"parameters": {"weight": [0.1, 0.9]}}, "gradients"),
        ({"parameters": {"weight": [{"filter": "mlp", "value": 1}]}}, "filter"),
        ({"parameters": {"weight": {"value": 1}}}, "conditional"),
        ({"parameters": {"t": 0.5}}, "unsupported parameters \\['t'\\]"),
        ({"parameters": {"density": 1.5}}, "less than or equal to 1"),
        ({"dtype": "int8"}, "dtype 'int8' is not supported"),
        ({"parameters": {"rescale": "l2"}}, "rescale"),
        ({"models": [{"model": "a", "parameters": {"weight": 1}}] * 2}, "twice"),
    ],
)
def test_bad_configs(over: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(_cfg(**over))


def test_slerp_needs_two_models_and_t() -> None:
    three = {
        "merge_method": "slerp",
        "base_model": "a",
        "parameters": {"t": 0.5},
        "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}],
    }
    with pytest.raises(ConfigError, match="exactly 2"):
        parse_config(three)
    with pytest.raises(ConfigError, match=r"needs `parameters: \{t"):
        parse_config({**three, "models": [{"model": "a"}, {"model": "b"}], "parameters": {}})


def test_not_a_mapping_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="YAML mapping"):
        parse_config(["merge_method"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
