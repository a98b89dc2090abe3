"""Every registered recipe method with its options and the layers it works on
(``slimtorch methods``), and docs/methods.md generated from that listing.

    slimtorch methods --markdown > docs/methods.md    # what tests/workflows checks
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from slimtorch.core.config import StageConfig
from slimtorch.core.methods import METHODS, MethodSpec, load_methods

COMMON = ("targets", "ignore")  # every stage's selection, listed once
EVERY_LAYER = "every layer it supports"
COMMON_HELP = {  # StageConfig's fields, in words
    "targets": "the layers the stage works on: class names (`Linear`), exact module names or"
    " `re:<regex>`; null = every layer the method supports",
    "ignore": "layers left alone, in the same vocabulary as `targets`",
}
WHOLE_MODEL = "whole model"
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=",
           "max_length": "length <=", "multiple_of": "multiple of"}  # fmt: skip


def type_name(annotation: Any) -> str:
    """``int``, ``float | None``, ``'layer' | 'global'``, ``list[str]``, ``dict[str, int]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(field: FieldInfo) -> list[str]:
    out = []
    for item in field.metadata:
        for attr, sign in _BOUNDS.items():
            value = getattr(item, attr, None)
            if value is not None:
                out.append(f"{sign} {value}")
    return out


def _default(field: FieldInfo) -> Any:
    value = field.get_default(call_default_factory=True)
    return None if value is PydanticUndefined else to_jsonable_python(value)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation if is_model else None


def options(
    config: type[BaseModel], prefix: str = "", skip: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """One row per option of ``config`` (nested option groups as ``group.option``)."""
    rows: list[dict[str, Any]] = []
    for name, field in config.model_fields.items():
        if name in skip:
            continue
        sub = _submodel(field.annotation)
        if sub is not None:
            rows += options(sub, f"{prefix}{name}.")
            continue
        rows.append(
            {
                "name": prefix + name,
                "type": type_name(field.annotation),
                "required": field.is_required(),
                "default": _default(field),
                "description": field.description,
                "constraints": _constraints(field),
            }
        )
    return rows


def applies_to(config: type[StageConfig]) -> tuple[list[str] | None, str]:
    """The default ``targets`` of ``config`` and what they mean in words."""
    field = config.model_fields.get("targets")
    if field is None:
        return None, WHOLE_MODEL
    targets = _default(field)
    return targets, ", ".join(targets) if targets else EVERY_LAYER


def describe(spec: MethodSpec) -> dict[str, Any]:
    """The JSON-able listing of one method."""
    targets, words = applies_to(spec.config)
    return {
        "name": spec.name,
        "summary": spec.summary,
        "needs_data": spec.needs_data,
        "layerwise": spec.layerwise is not None,
        "targets": targets,
        "applies_to": words,
        "options": options(spec.config, skip=COMMON),
    }


def list_methods() -> dict[str, Any]:
    """Every registered recipe method (sorted by name) and the options every stage shares."""
    load_methods()
    return {
        "common_options": [
            {**r, "description": r["description"] or COMMON_HELP[r["name"]]}
            for r in options(StageConfig)
            if r["name"] in COMMON
        ],
        "methods": [describe(spec) for _, spec in METHODS.items()],
    }


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(value: Any) -> str:
    return "`" + _cell(json.dumps(value)) + "`"


def _option_rows(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| option | type | default | description |", "|---|---|---|---|"]
    for r in rows:
        default = "(required)" if r["required"] else _code(r["default"])
        bounds = f"({', '.join(r['constraints'])})" if r["constraints"] else ""
        text = " ".join(t for t in (r["description"], bounds) if t)
        lines.append(f"| `{r['name']}` | `{_cell(r['type'])}` | {default} | {_cell(text)} |")
    return lines


def methods_markdown(listing: dict[str, Any] | None = None) -> str:
    """docs/methods.md: the listing as Markdown (``slimtorch methods --markdown``)."""
    listing = listing if listing is not None else list_methods()
    lines = [
        "# Recipe methods",
        "",
        "<!-- generated by `slimtorch methods --markdown > docs/methods.md`; do not edit:"
        " tests/workflows/test_workflow_methods.py fails when it is out of date -->",
        "",
        "Every method a recipe stage can name (`method: ...`), with its options. Every stage"
        " also takes:",
        "",
        *_option_rows(listing["common_options"]),
        "",
        "| method | summary | applies to | needs data | layer-wise |",
        "|---|---|---|---|---|",
    ]
    yes_no = {True: "yes", False: "no"}
    for m in listing["methods"]:
        lines.append(
            f"| `{m['name']}` | {_cell(m['summary'])} | {_cell(m['applies_to'])}"
            f" | {yes_no[m['needs_data']]} | {yes_no[m['layerwise']]} |"
        )
    lines += [
        "",
        "*needs data*: the stage trains or calibrates on `--data`; *layer-wise*: it also runs"
        " block by block on checkpoints bigger than memory (`slimtorch compress --max-memory`).",
    ]
    family = None
    for m in listing["methods"]:
        if m["name"].split(".")[0] != family:
            family = m["name"].split(".")[0]
            lines += ["", f"## {family}"]
        lines += ["", f"### `{m['name']}`", "", _cell(m["summary"]), ""]
        lines.append(f"Applies to: {m['applies_to']}.")
        lines += ["", *(_option_rows(m["options"]) if m["options"] else ["No options."])]
    return "\n".join(lines) + "\n"
