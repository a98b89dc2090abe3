"""The methods listing: every registered method with its options, and docs/methods.md from it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from slimtorch.core.config import StageConfig, StrictModel
from slimtorch.core.methods import METHODS
from slimtorch.workflows.methods import (
    EVERY_LAYER,
    WHOLE_MODEL,
    applies_to,
    list_methods,
    methods_markdown,
    options,
    type_name,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def _leaves(config: type[BaseModel], prefix: str = "") -> set[str]:
    names = set()
    for name, field in config.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            names |= _leaves(sub, f"{prefix}{name}.")
        else:
            names.add(prefix + name)
    return names


def test_every_registered_method_is_listed_with_its_options() -> None:
    listing = list_methods()
    assert [m["name"] for m in listing["methods"]] == METHODS.names()
    assert len(listing["methods"]) >= 30
    for m in listing["methods"]:
        spec = METHODS.get(m["name"])
        assert m["summary"] == spec.summary and m["summary"]
        assert {o["name"] for o in m["options"]} == _leaves(spec.config) - {"targets", "ignore"}
        assert m["needs_data"] == spec.needs_data
        assert m["layerwise"] == (spec.layerwise is not None)
        assert m["applies_to"]
    assert [o["name"] for o in listing["common_options"]] == ["targets", "ignore"]


def test_option_rows_carry_type_default_bounds_and_description() -> None:
    rtn = next(m for m in list_methods()["methods"] if m["name"] == "quantize.rtn")
    bits = next(o for o in rtn["options"] if o["name"] == "bits")
    assert bits["type"] == "int" and bits["default"] == 8 and not bits["required"]
    assert bits["description"] and ">= 2" in bits["constraints"] and "<= 8" in bits["constraints"]
    gptq = next(m for m in list_methods()["methods"] if m["name"] == "quantize.gptq")
    assert gptq["layerwise"] and "calibration.samples" in {o["name"] for o in gptq["options"]}


class _Nested(StrictModel):
    steps: int = Field(10, ge=1, description="how many")


class _Config(StageConfig):
    targets: list[str] | None = Field(default_factory=lambda: ["Linear", "re:.*mlp.*"])
    mode: Literal["a", "b"] = "a"
    sizes: dict[str, int] | float = 1.0
    inner: _Nested = Field(default_factory=_Nested)
    needed: str


def test_rows_of_a_config() -> None:
    rows = {r["name"]: r for r in options(_Config, skip=("targets", "ignore"))}
    assert rows["mode"]["type"] == "'a' | 'b'" and rows["mode"]["default"] == "a"
    assert rows["sizes"]["type"] == "dict[str, int] | float"
    assert rows["inner.steps"] == {
        "name": "inner.steps",
        "type": "int",
        "required": False,
        "default": 10,
        "description": "how many",
        "constraints": [">= 1"],
    }
    assert rows["needed"]["required"] and rows["needed"]["default"] is None
    assert type_name(int | None) == "int | None"


def test_applies_to_reads_the_default_targets() -> None:
    assert applies_to(_Config) == (["Linear", "re:.*mlp.*"], "Linear, re:.*mlp.*")
    assert applies_to(StageConfig) == (None, EVERY_LAYER)
    assert applies_to(_Nested) == (None, WHOLE_MODEL)  # type: ignore[arg-type]


def test_docs_methods_md_is_up_to_date() -> None:
    assert DOC.read_text() == methods_markdown(), (
        "docs/methods.md is out of date: run `slimtorch methods --markdown > docs/methods.md`"
    )
    text = DOC.read_text()
    assert all(f"### `{name}`" in text for name in METHODS.names())
