"""Parse, validate and serialise recipes: an ordered list of stages plus storage options.

stages:
  - method: prune.magnitude
    sparsity: 0.9
    targets: [Linear, Conv2d]
  - method: train.finetune
    optional: true          # skipped (with a warning) when no training data is given
  - method: quantize.rtn
    bits: 8
format: {}

Every method a stage can name is registered by a technique's ``stages`` module; they are found on
disk, with no list to keep (:func:`slimtorch.core.methods.load_methods`, re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from slimtorch.core.config import StageConfig, StrictModel
from slimtorch.core.errors import ConfigError
from slimtorch.core.methods import METHODS, MethodSpec, load_methods
from slimtorch.core.registry import nearest

PRESET_DIR = Path(__file__).parent / "presets"


class FormatOptions(StrictModel):
    """How the artifact is stored. Every tensor takes its smallest encoding; ``entropy:
    huffman`` adds Huffman-coded code and index streams to the choices (Deep Compression's
    last stage)."""

    entropy: Literal["none", "huffman"] = "none"


@dataclass
class Stage:
    """One recipe stage: a registered method, its validated config, and whether it may be skipped."""

    spec: MethodSpec
    config: StageConfig
    optional: bool = False

    def to_dict(self) -> dict[str, Any]:
        body = self.config.model_dump(mode="json", exclude_defaults=True)
        out: dict[str, Any] = {"method": self.spec.name, **body}
        if self.optional:
            out["optional"] = True
        return out


@dataclass
class Recipe:
    stages: list[Stage]
    format: FormatOptions = field(default_factory=FormatOptions)
    name: str = "custom"
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stages": [s.to_dict() for s in self.stages]}
        if self.description:
            out["description"] = self.description
        fmt = self.format.model_dump(mode="json", exclude_defaults=True)
        if fmt:
            out["format"] = fmt
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def needs_data(self) -> bool:
        return any(s.spec.needs_data and not s.optional for s in self.stages)


def _validation_message(where: str, spec: MethodSpec, exc: ValidationError) -> str:
    valid = sorted(spec.config.model_fields)
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(stage)"
        if err["type"] == "extra_forbidden":
            hint = nearest(str(err["loc"][-1]), valid)
            extra = f"; did you mean {hint!r}?" if hint else ""
            lines.append(f"unknown option {loc!r}{extra} Valid options: {', '.join(valid)}")
        else:
            lines.append(f"option {loc!r}: {err['msg']} (got {err.get('input')!r})")
    return f"{where} ({spec.name}): " + "; ".join(lines)


def _spec_of(config: StageConfig, where: str) -> MethodSpec:
    """The one registered method whose config class is ``type(config)``."""
    load_methods()
    cls = type(config)
    names = [name for name, spec in METHODS.items() if spec.config is cls]
    if len(names) == 1:
        return METHODS.get(names[0])
    dump = config.model_dump(mode="json", exclude_defaults=True)
    if names:
        raise ConfigError(
            f"{where}: {cls.__name__} is the config of several methods ({', '.join(names)}):"
            f" give a stage dict that names one, e.g. {{'method': {names[0]!r}, **{dump!r}}}"
        )
    raise ConfigError(
        f"{where}: {cls.__name__} is not the config of a registered method (a subclass does not"
        " count): give a stage dict {'method': NAME, ...} or the config class of a method itself"
    )


def parse_stage(raw: Any, index: int) -> Stage:
    """One stage from a stage dict ``{method: ..., **options}``, a method's config instance
    (``RTNConfig(bits=4)``: its method is looked up) or a Stage."""
    where = f"stage {index + 1}"
    if isinstance(raw, Stage):
        return raw
    if isinstance(raw, StageConfig):
        return Stage(_spec_of(raw, where), raw.model_copy(deep=True))
    if not isinstance(raw, dict) or "method" not in raw:
        raise ConfigError(
            f"{where}: each stage must be a mapping with a `method` key or a method's config"
            f" (such as RTNConfig(bits=4)), got {raw!r}"
        )
    body = dict(raw)
    method = str(body.pop("method"))
    optional = bool(body.pop("optional", False))
    load_methods()
    try:
        spec = METHODS.get(method)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    try:
        config = spec.config.model_validate(body)
    except ValidationError as exc:
        raise ConfigError(_validation_message(where, spec, exc)) from None
    return Stage(spec, config, optional)


def parse_recipe(raw: Any, name: str = "custom") -> Recipe:
    """Build a Recipe from its dict form, or a list of stages (stage dicts, config instances);
    every error names the stage and field at fault."""
    if isinstance(raw, (list, tuple)):
        raw = {"stages": list(raw)}
    if not isinstance(raw, dict):
        raise ConfigError(f"a recipe must be a mapping with `stages`, got {type(raw).__name__}")
    unknown = set(raw) - {"stages", "format", "description"}
    if unknown:
        raise ConfigError(
            f"unknown recipe key(s) {sorted(unknown)}; valid keys: stages, format, description"
        )
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError("a recipe needs a non-empty `stages` list")
    stages = [parse_stage(s, i) for i, s in enumerate(stages_raw)]
    try:
        fmt = FormatOptions.model_validate(raw.get("format") or {})
    except ValidationError as exc:
        raise ConfigError(f"recipe `format`: {exc.errors()[0]['msg']}") from None
    return Recipe(stages, fmt, name, str(raw.get("description", "")))


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description."""
    out = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        out[path.stem] = str(raw.get("description", "")).strip().splitlines()[0]
    return out


# what load_recipe (and so st.compress) accepts as a recipe
RecipeLike = (
    str
    | Path
    | dict[str, Any]
    | Recipe
    | StageConfig
    | Sequence[StageConfig | Stage | dict[str, Any]]
)


def load_recipe(recipe: RecipeLike) -> Recipe:
    """A Recipe from a preset name, a YAML path (str or Path), a dict, a Recipe, a stage config
    (``RTNConfig(bits=4)``) or a list of stage configs and stage dicts
    (``[MagnitudeConfig(sparsity=0.5), {"method": "quantize.rtn", "bits": 8}]``)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (dict, list, tuple)):
        return parse_recipe(recipe)
    if isinstance(recipe, StageConfig):
        return parse_recipe([recipe])
    if not isinstance(recipe, (str, Path)):
        raise ConfigError(
            f"a recipe is a preset name, a YAML path, a dict, a Recipe or a list of stage configs,"
            f" got {type(recipe).__name__}"
        )
    text = str(recipe)
    preset = PRESET_DIR / f"{text}.yaml"
    path = Path(text)
    if preset.is_file():
        source, name = preset, text
    elif path.suffix in {".yaml", ".yml"} and path.is_file():
        source, name = path, path.stem
    else:
        names = list(list_presets())
        hint = nearest(text, names)
        raise ConfigError(
            f"recipe {text!r} is neither a preset nor a YAML file"
            + (f"; did you mean {hint!r}?" if hint else "")
            + f" Presets: {', '.join(names)}"
        )
    try:
        raw = yaml.safe_load(source.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe file {source} is not valid YAML: {exc}") from None
    return parse_recipe(raw, name)
