"""Read mergekit's YAML merge configuration into a typed, resolved :class:`MergeConfig`.

Supported (mergekit 0.1.5 semantics)::

    merge_method: ties            # any of METHODS: linear slerp task_arithmetic ties dare_linear
                                  # dare_ties della della_linear model_stock nuslerp multislerp
                                  # karcher sce arcee_fusion passthrough
    base_model: builtin:lenet300-fashion     # a path (HF directory, slimtorch artifact,
    models:                                  #   directory or file of *.safetensors) or builtin:NAME
      - model: runs/a
        parameters: {weight: 0.5, density: 0.4}
      - model: runs/b
        parameters: {weight: 0.5, density: 0.4}
    parameters: {normalize: true, lambda: 1.0}   # global values; per-model values take precedence
    dtype: float32                # merge in this dtype (default: the inputs' dtype)
    out_dtype: bfloat16           # store in this dtype (default: the merge dtype)

Parameters must be scalars: mergekit's gradients (lists) and ``filter`` conditions are rejected
with an error, as are ``slices`` and ``modules``. ``tokenizer_source: union | base | MODEL`` and
``tokenizer: {source, tokens, pad_to_multiple_of}`` merge models whose vocabularies differ
(:mod:`slimtorch.merge.tokenizer`); without them the base's tokenizer files are copied.
``chat_template`` is ignored with a warning. Any other top-level key is an error. Method-specific shared parameters (``filter_wise``,
``nuslerp_row_wise``, ``nuslerp_flatten``, ``normalize_weights``, ``eps``, ``max_iter``, ``tol``,
``select_topk``) land in ``MergeConfig.options``; DELLA's per-model ``epsilon`` and passthrough's
``scale`` in each :class:`MergeInput`. ``rescale`` also accepts ``"density"`` (DARE's paper: divide the kept
deltas by ``density``) besides mergekit's booleans (``true`` = L1-norm rescaling).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from slimtorch.core.config import StrictModel
from slimtorch.core.errors import ConfigError
from slimtorch.core.registry import nearest
from slimtorch.merge.tokenizer_config import tokenizer_fields

MethodName = Literal[
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "model_stock",
    "nuslerp",
    "multislerp",
    "karcher",
    "sce",
    "arcee_fusion",
    "passthrough",
]
DtypeName = Literal["float32", "float16", "bfloat16", "float64"]
METHODS: tuple[str, ...] = MethodName.__args__  # type: ignore[attr-defined]
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer"}  # fmt: skip
_IGNORED_KEYS = {"chat_template"}
_UNSUPPORTED_KEYS = {"slices", "modules"}
_TASK_PARAMS = {"weight", "density", "normalize", "rescale", "lambda", "int8_mask"}
# per method: (shared parameters, per-model parameters); per-model ones may also be global
_PARAMS: dict[str, tuple[set[str], set[str]]] = {
    "linear": ({"normalize"}, {"weight"}),
    "slerp": ({"t"}, set()),
    "task_arithmetic": (_TASK_PARAMS - {"rescale", "weight", "density"}, {"weight", "density"}),
    "ties": (_TASK_PARAMS - {"weight", "density"}, {"weight", "density"}),
    "dare_linear": (_TASK_PARAMS - {"weight", "density"}, {"weight", "density"}),
    "dare_ties": (_TASK_PARAMS - {"weight", "density"}, {"weight", "density"}),
    "della": (_TASK_PARAMS - {"weight", "density"}, {"weight", "density", "epsilon"}),
    "della_linear": (_TASK_PARAMS - {"weight", "density"}, {"weight", "density", "epsilon"}),
    "model_stock": ({"filter_wise"}, set()),
    "nuslerp": ({"nuslerp_row_wise", "nuslerp_flatten"}, {"weight"}),
    "multislerp": ({"normalize_weights", "eps"}, {"weight"}),
    "karcher": ({"max_iter", "tol"}, set()),
    "sce": ({"int8_mask", "select_topk"}, set()),
    "arcee_fusion": (set(), set()),
    "passthrough": (set(), {"scale"}),
}
_OPTION_KEYS = {
    "filter_wise", "nuslerp_row_wise", "nuslerp_flatten", "normalize_weights", "eps",
    "max_iter", "tol", "select_topk",
}  # fmt: skip
# mergekit's defaults: (normalize, rescale) per method
_DEFAULTS: dict[str, tuple[bool, str | None]] = {
    "task_arithmetic": (False, None),
    "ties": (True, None),
    "dare_linear": (False, "l1"),
    "dare_ties": (False, "l1"),
    "della": (True, "l1"),
    "della_linear": (False, "l1"),
}
_NEEDS_BASE = {"task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "della_linear",
               "slerp", "model_stock", "sce", "arcee_fusion"}  # fmt: skip
_WEIGHTED = {m for m, (_, per) in _PARAMS.items() if "weight" in per}


class MergeInput(StrictModel):
    """One input model with its resolved parameters."""

    model: str
    weight: float = 1.0
    density: float = Field(default=1.0, ge=0, le=1)
    epsilon: float = Field(default=0.15, ge=0, le=1)
    scale: float | None = None  # passthrough's per-model factor


class MergeConfig(StrictModel):
    """A resolved merge: inputs in mergekit's order (the base included), parameters filled in."""

    method: MethodName
    inputs: list[MergeInput] = Field(min_length=1)
    base_model: str | None = None
    t: float = 0.5
    normalize: bool = True
    rescale: Literal["l1", "density"] | None = None
    scale: float = 1.0  # mergekit's `lambda`
    dtype: DtypeName | None = None
    out_dtype: DtypeName | None = None
    slices: list[dict[str, Any]] | None = Field(
        default=None, description="passthrough: [{model, start, end, scale}] in output order"
    )
    options: dict[str, float | int | bool] = Field(
        default_factory=dict, description="method-specific shared parameters (mergekit's names)"
    )
    tokenizer_source: str | None = Field(
        default=None, description="union, base or a model path: the output vocabulary"
    )
    tokens: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="tokenizer.tokens: {TOKEN: {source, force}}"
    )
    pad_to_multiple_of: int | None = Field(default=None, ge=1)

    @property
    def base_index(self) -> int | None:
        if self.base_model is None:
            return None
        return [i.model for i in self.inputs].index(self.base_model)


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            raise ConfigError(
                f"{where}: per-tensor `filter` conditions are unsupported; give one scalar value"
            )
        raise ConfigError(
            f"{where}: gradients (lists of values across layers) are unsupported; give one scalar"
        )
    if isinstance(value, dict):
        raise ConfigError(
            f"{where}: conditional parameters ({{value, filter}}) are unsupported; give one scalar"
        )
    if not isinstance(value, bool | int | float | str):
        raise ConfigError(f"{where}: expected a number or boolean, got {value!r}")
    return value


def _params(raw: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of parameter names to values, got {raw!r}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        hint = nearest(str(unknown[0]), sorted(allowed))
        extra = f" (did you mean {hint!r}?)" if hint else ""
        raise ConfigError(
            f"{where}: unsupported parameters {unknown}{extra}; this method takes {sorted(allowed)}"
        )
    return {k: _scalar(v, f"{where}.{k}") for k, v in raw.items()}


def _model_ref(raw: Any, where: str) -> str:
    if isinstance(raw, str) and raw:
        return raw
    raise ConfigError(
        f"{where}: a model must be a path or builtin:NAME string, got {raw!r}"
        " (mergekit's structured model references and LoRA adapters are unsupported)"
    )


def _check_keys(data: dict[str, Any]) -> None:
    unsupported = sorted(_UNSUPPORTED_KEYS & set(data))
    if unsupported == ["slices"] and data.get("merge_method") == "passthrough":
        unsupported = []
    if unsupported:
        raise ConfigError(
            f"{unsupported} are unsupported: slimtorch merges whole models of one architecture;"
            " list them under `models:` instead"
        )
    unknown = sorted(set(data) - _TOP_KEYS - _IGNORED_KEYS - {"slices"})
    if unknown:
        raise ConfigError(
            f"unknown merge config keys {unknown}; supported keys: {sorted(_TOP_KEYS)}"
            f" (ignored with a warning: {sorted(_IGNORED_KEYS)})"
        )
    for key in sorted(_IGNORED_KEYS & set(data)):
        warnings.warn(
            f"merge config key {key!r} is ignored: the chat template of the tokenizer files"
            " written is kept",
            stacklevel=3,
        )


def _method(data: dict[str, Any]) -> str:
    method = data.get("merge_method")
    if method not in METHODS:
        hint = nearest(str(method), list(METHODS))
        extra = f"; did you mean {hint!r}?" if hint else ""
        raise ConfigError(
            f"merge_method {method!r} is not supported{extra} Supported: {', '.join(METHODS)}"
        )
    return str(method)


def _inputs(data: dict[str, Any], method: str, glob: dict[str, Any]) -> list[dict[str, Any]]:
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError("`models` must be a non-empty list of {model: PATH, parameters: {...}}")
    out = []
    for i, entry in enumerate(models):
        where = f"models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{where} must be a mapping with a `model` key, got {entry!r}")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise ConfigError(f"{where}: unknown keys {extra}; use `model` and `parameters`")
        allowed = _PARAMS[method][1]
        params = _params(entry.get("parameters"), allowed, f"{where}.parameters")
        out.append({"model": _model_ref(entry["model"], f"{where}.model"), **params})
    base = data.get("base_model")
    if base is not None and base not in [m["model"] for m in out]:
        out.append({"model": _model_ref(base, "base_model")})
    for entry in out:
        for key in _PARAMS[method][1]:
            if key not in entry and key in glob:
                entry[key] = glob[key]
    return out


def _count(method: str, what: str, got: int, lo: int, hi: int | None, names: list[str]) -> None:
    if got < lo or (hi is not None and got > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}"
        raise ConfigError(f"{method} merges {want} {what}, got {got}: {names}")


def _require(method: str, base: str | None, inputs: list[dict[str, Any]]) -> None:
    names = [m["model"] for m in inputs]
    if len(set(names)) != len(names):
        raise ConfigError(f"`models` lists a model twice: {names}; list each model once")
    if method in _NEEDS_BASE and base is None:
        raise ConfigError(f"{method} needs `base_model`: the model the others are merged into")
    others = len(inputs) - (base is not None)
    limits = {
        "slerp": ("models (the base and one other)", len(inputs), 2, 2),
        "arcee_fusion": ("models (the base and one fine-tune)", len(inputs), 2, 2),
        "passthrough": ("model (use `slices` to stack layers)", len(inputs), 1, 1),
        "model_stock": ("fine-tuned models besides the base", others, 2, None),
        "nuslerp": ("models besides the base", others, 2, 2),
        "multislerp": ("models besides the base", others, 1, None),
    }
    if method in limits:
        what, got, lo, hi = limits[method]
        _count(method, what, got, lo, hi, names)
    for m in inputs if method.startswith("della") else []:
        d, e = float(m.get("density", 1.0)), float(m.get("epsilon", 0.15))
        if m["model"] != base and 0 < d < 1 and not (d - e > 0 and d + e < 1):
            raise ConfigError(
                f"{method}: density {d} +/- epsilon {e} for {m['model']} must stay inside (0, 1);"
                " lower `epsilon`"
            )
    weighted = [m for m in inputs if method == "linear" or m["model"] != base]
    needs_weight = [m["model"] for m in weighted if "weight" not in m]
    if method in _WEIGHTED and needs_weight:
        raise ConfigError(
            f"{method}: no `weight` for {needs_weight}; set it in the model's `parameters` or in"
            " the global `parameters`"
        )


def _dtype(value: Any, key: str) -> str | None:
    if value is None:
        return None
    name = _DTYPE_ALIASES.get(str(value), str(value))
    if name not in DtypeName.__args__:  # type: ignore[attr-defined]
        raise ConfigError(f"{key} {value!r} is not supported; use float32, float16 or bfloat16")
    return name


def _rescale(value: Any, default: str | None) -> str | None:
    if value is None:
        return default
    if value is True or value in ("l1", "density"):
        return "l1" if value is True else str(value)
    if value is False:
        return None
    raise ConfigError(f"parameters.rescale {value!r}: use true (L1 norm), false or 'density'")


def parse_config(data: Any) -> MergeConfig:
    """Validate a mergekit merge configuration (a parsed YAML mapping) and resolve it."""
    if not isinstance(data, dict):
        raise ConfigError(f"a merge config must be a YAML mapping, got {type(data).__name__}")
    _check_keys(data)
    method = _method(data)
    if "slices" in data:
        return _sliced(data)
    shared, per_model = _PARAMS[method]
    glob = _params(data.get("parameters"), shared | per_model, "parameters")
    if glob.pop("int8_mask", None) is not None:
        warnings.warn("parameters.int8_mask is ignored: it does not change results", stacklevel=2)
    inputs = _inputs(data, method, glob)
    base = data.get("base_model")
    _require(method, base, inputs)
    normalize, rescale = _DEFAULTS.get(method, (True, None))
    try:
        return MergeConfig(
            method=method,  # type: ignore[arg-type]
            inputs=[MergeInput(**m) for m in inputs],
            base_model=base,
            t=_slerp_t(glob) if method == "slerp" else 0.5,
            normalize=glob.get("normalize", normalize),
            rescale=_rescale(glob.get("rescale"), rescale),  # type: ignore[arg-type]
            scale=glob.get("lambda", 1.0),
            dtype=_dtype(data.get("dtype"), "dtype"),  # type: ignore[arg-type]
            out_dtype=_dtype(data.get("out_dtype"), "out_dtype"),  # type: ignore[arg-type]
            options={k: v for k, v in glob.items() if k in _OPTION_KEYS},
            **tokenizer_fields(data),
        )
    except ValidationError as exc:
        errs = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
            for e in exc.errors()
        )
        raise ConfigError(f"invalid merge config: {errs}") from None


def _sliced(data: dict[str, Any]) -> MergeConfig:
    from slimtorch.merge.slices import parse_slices  # imports the streaming half

    extra = sorted(
        set(data) & {"models", "base_model", "parameters", "tokenizer_source", "tokenizer"}
    )
    if extra:
        raise ConfigError(
            f"passthrough with `slices` takes no {extra}: the models go in the slices, which"
            " must share one vocabulary"
        )
    slices = parse_slices(data["slices"])
    models = list(dict.fromkeys(s.model for s in slices))
    return MergeConfig(
        method="passthrough",
        inputs=[MergeInput(model=m) for m in models],
        dtype=_dtype(data.get("dtype"), "dtype"),  # type: ignore[arg-type]
        out_dtype=_dtype(data.get("out_dtype"), "out_dtype"),  # type: ignore[arg-type]
        slices=[dict(s.__dict__) for s in slices],
    )


def _slerp_t(glob: dict[str, Any]) -> float:
    if "t" not in glob:
        raise ConfigError("slerp needs `parameters: {t: ...}` (0 = base_model, 1 = the other)")
    return float(glob["t"])


def load_config(source: str | Path) -> MergeConfig:
    """Read and resolve the mergekit YAML file at ``source``."""
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"merge config {path} does not exist; give a mergekit YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(data)
