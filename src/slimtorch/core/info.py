"""What slimtorch knows about a model, typed: how to rebuild it and what travels into its artifact.

Every model slimtorch loads, compresses or saves carries one :class:`ModelInfo` (read it with
:func:`model_info`, change it with :func:`update_info`). ``architecture`` is written to the
manifest's ``architecture`` key; every other field to its ``metadata`` key (docs/artifact.md lists
them). Fields are validated when set, so a typo or a wrong type fails where it is made, naming the
field.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from slimtorch.core.errors import ArtifactError, ConfigError
from slimtorch.core.registry import nearest

INFO_ATTR = "_slimtorch_info"


class InputSpec(BaseModel):
    """An example input for tracing and latency runs of a model slimtorch does not know."""

    model_config = ConfigDict(extra="forbid")

    shape: list[int]
    dtype: Literal["float32", "int64"] = "float32"


class ModelInfo(BaseModel):
    """How to rebuild a model and what travels with it into its artifact."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # how to rebuild the architecture: {"kind": "builtin" | "hf" | "factory", ...}
    architecture: dict[str, Any] | None = None
    source: str | None = None  # the --model spec it was loaded from
    evaluator: str | None = None  # a name in slimtorch.eval.quality.EVALUATORS
    data: str | None = None  # the evaluation dataset spec
    # the tokenizer of its text (causal LMs): a tokenizer.json path or builtin:NAME
    tokenizer: str | None = None
    input: InputSpec | None = None  # example input when slimtorch cannot derive one
    recipe: dict[str, Any] | None = None  # the recipe that compressed it (without description)
    recipe_name: str | None = None
    dense_bytes: int | None = None  # its plain fp32 safetensors size before compression
    offloaded: bool | None = None  # compressed block by block (--max-memory)
    # layers compressed without calibration data (experts no calibration token reached)
    data_free_layers: list[str] | None = None
    structured: dict[str, int] | None = None  # prune.structured: flops/params before and after
    widths: list[dict[str, Any]] | None = None  # prune.reorder: channel groups by importance
    width_stats: dict[str, dict[str, list[Any]]] | None = None  # BatchNorm stats per width
    width: float | None = None  # the width it is served at (slimtorch.load(dir, width=...))
    distilled_from: str | None = None  # `slimtorch distill`: the teacher
    kept_layers: list[int] | None = None  # `slimtorch distill --keep-layers`
    merge: dict[str, Any] | None = None  # `slimtorch merge`: the resolved merge configuration
    inputs: list[str] | None = None  # `slimtorch merge`: the merged models, base included

    def updated(self, **fields: Any) -> ModelInfo:
        """A validated copy with ``fields`` set (None clears one); a ConfigError names an
        unknown or invalid field."""
        for key in fields:
            if key not in ModelInfo.model_fields:
                raise ConfigError(
                    f"{key!r} is not a model info field{_did_you_mean(key)}; valid fields:"
                    f" {', '.join(ModelInfo.model_fields)}"
                )
        try:
            return ModelInfo.model_validate({**self.model_dump(), **fields})
        except ValidationError as exc:
            raise ConfigError(f"invalid model info: {_first_error(exc)}") from None

    def metadata(self) -> dict[str, Any]:
        """The manifest's ``metadata`` object (JSON types; unset fields left out)."""
        return self.model_dump(mode="json", exclude={"architecture"}, exclude_none=True)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], where: str = "manifest") -> ModelInfo:
        """The info recorded in an artifact's manifest; names the bad key of a broken one."""
        meta = manifest.get("metadata") or {}
        arch = manifest.get("architecture")
        if not isinstance(meta, dict):
            raise ArtifactError(f"{where}: 'metadata' must be an object; re-create the artifact")
        if arch is not None and not isinstance(arch, dict):
            raise ArtifactError(
                f"{where}: 'architecture' must be an object; re-create the artifact"
            )
        unknown = [k for k in meta if k not in cls.model_fields or k == "architecture"]
        if unknown:
            raise ArtifactError(
                f"{where}: unknown metadata key {unknown[0]!r}{_did_you_mean(unknown[0])}; a"
                " newer slimtorch may have written it (upgrade slimtorch), else remove it from the"
                f' manifest\'s "metadata" object (valid keys: {", ".join(metadata_keys())})'
            )
        try:
            return cls(architecture=arch, **meta)
        except ValidationError as exc:
            raise ArtifactError(
                f"{where}: invalid metadata ({_first_error(exc)}); re-create the artifact with"
                " this slimtorch version"
            ) from None


def metadata_keys() -> list[str]:
    """The keys a manifest's ``metadata`` object may hold: every field but ``architecture``."""
    return [k for k in ModelInfo.model_fields if k != "architecture"]


def _did_you_mean(key: str) -> str:
    close = nearest(key, list(ModelInfo.model_fields))
    return f" (did you mean {close!r}?)" if close else ""


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


def model_info(model: Any) -> ModelInfo:
    """The :class:`ModelInfo` of ``model`` (an empty one is attached on first use)."""
    info = model.__dict__.get(INFO_ATTR)
    if not isinstance(info, ModelInfo):
        info = ModelInfo()
        model.__dict__[INFO_ATTR] = info
    return info


def set_model_info(model: Any, info: ModelInfo) -> ModelInfo:
    """Attach ``info`` to ``model`` (replacing what it had); returns it."""
    model.__dict__[INFO_ATTR] = info
    return info


def update_info(model: Any, **fields: Any) -> ModelInfo:
    """Set ``fields`` of ``model``'s info (None clears one), all validated before any is set;
    returns the info. An unknown field is a ConfigError naming it and the valid ones."""
    info = model_info(model)
    new = info.updated(**fields)
    for key in fields:
        setattr(info, key, getattr(new, key))
    return info


class MetadataView(MutableMapping[str, Any]):
    """The pre-redesign ``get_metadata(model)`` dict, as a view onto :class:`ModelInfo` fields.

    Kept for one release; use :func:`model_info` and :func:`update_info` instead. Unknown keys
    are refused with the list of valid ones.
    """

    def __init__(self, model: Any) -> None:
        self._model = model

    def _key(self, key: str) -> str:
        if key not in ModelInfo.model_fields or key == "architecture":
            raise KeyError(
                f"{key!r} is not a model info field{_did_you_mean(key)}; valid fields:"
                f" {', '.join(metadata_keys())}"
            )
        return key

    def __getitem__(self, key: str) -> Any:
        value = getattr(model_info(self._model), self._key(key))
        if value is None:
            raise KeyError(key)
        return value.model_dump() if isinstance(value, BaseModel) else value

    def __setitem__(self, key: str, value: Any) -> None:
        update_info(self._model, **{self._key(key): value})

    def __delitem__(self, key: str) -> None:
        if self[key] is not None:  # KeyError when unset, as a dict
            update_info(self._model, **{key: None})

    def __iter__(self) -> Iterator[str]:
        return iter(model_info(self._model).metadata())

    def __len__(self) -> int:
        return len(model_info(self._model).metadata())
