"""Where models come from: ``builtin:NAME``, a local Hugging Face directory, a ``.gguf`` file,
or ``pkg.mod:factory``.

Every loaded model carries an *architecture* spec (plain JSON) from which
:func:`rebuild` constructs the same architecture without weights and without unpickling
anything; ``slimtorch.load`` uses it to rebuild a saved artifact.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from slimtorch.core.errors import UserInputError
from slimtorch.core.registry import Registry


@dataclass(frozen=True)
class BuiltinModel:
    """A model the project ships or finds in an installed package.

    ``build(pretrained)`` returns the model; with ``pretrained=False`` it must not read any
    weights (the architecture only). ``evaluator`` names an entry of
    ``slimtorch.eval.quality.EVALUATORS``; ``data`` names the default dataset (for training,
    calibration and evaluation); ``example_inputs(batch)`` gives inputs for latency runs.
    """

    name: str
    summary: str
    build: Callable[[bool], nn.Module]
    evaluator: str
    data: str
    example_inputs: Callable[[int], tuple[Any, ...]]
    task: str | None = None  # name in slimtorch.calibrate.tasks.TASKS, for fine-tuning
    # True when --data is also what the evaluator measures (image classifiers); False when the
    # training data is of another kind than ``data`` (MiniLM trains on sentences, tests on Lee)
    evaluates_training_data: bool = True
    # a Hugging Face directory of its weights (safetensors) that --max-memory reads block by block
    checkpoint: Callable[[], Path] | None = None


MODELS: Registry[BuiltinModel] = Registry("builtin model", plugins=True)


@dataclass
class LoadedModel:
    """A model and what slimtorch knows about it."""

    model: nn.Module
    source: str
    architecture: dict[str, Any]
    evaluator: str | None = None
    data: str | None = None
    task: str | None = None
    example_inputs: Callable[[int], tuple[Any, ...]] | None = None
    evaluates_training_data: bool = True
    # a causal LM's tokenizer: the tokenizer.json beside its config.json, or builtin:NAME
    tokenizer: str | None = None


def builtin_info(name: str) -> BuiltinModel:
    return MODELS.get(name)


def load_model(spec: str) -> LoadedModel:
    """Load ``builtin:NAME``, a local Hugging Face directory, a Llama-family ``.gguf`` file
    (dequantized to fp32, cached as a Hugging Face directory), or ``package.module:factory``."""
    if spec.startswith("builtin:"):
        info = builtin_info(spec.split(":", 1)[1])
        model = info.build(True).eval()
        return LoadedModel(
            model,
            spec,
            {"kind": "builtin", "name": info.name},
            info.evaluator,
            info.data,
            info.task,
            info.example_inputs,
            info.evaluates_training_data,
        )
    path = Path(spec)
    if path.is_dir():
        from slimtorch.models import hf

        return hf.load_directory(path)
    if path.suffix.lower() == ".gguf":
        from slimtorch.models import gguf

        return gguf.load_gguf(path)  # Llama-family; any other architecture: UserInputError
    if ":" in spec and not path.exists():
        module_name, _, attr = spec.partition(":")
        model = _call_factory(module_name, attr)
        return LoadedModel(model.eval(), spec, {"kind": "factory", "ref": spec})
    raise UserInputError(
        f"cannot load model {spec!r}: give builtin:NAME (one of {', '.join(_builtin_names())}),"
        " a local Hugging Face model directory, a Llama-family .gguf file, or"
        " package.module:factory"
    )


def checkpoint_dir(spec: str) -> Path | None:
    """The Hugging Face directory (config.json + safetensors) holding the weights of ``spec``:
    the directory itself, a ``.gguf`` file's cached conversion, a builtin's checkpoint; None
    for anything else (a builtin without one, a factory)."""
    if spec.startswith("builtin:"):
        find = builtin_info(spec.split(":", 1)[1]).checkpoint
        return find() if find is not None else None
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.suffix.lower() == ".gguf" and path.is_file():
        from slimtorch.models import gguf

        return gguf.cached_directory(path)
    return None


def _builtin_names() -> list[str]:
    return MODELS.names()


def _call_factory(module_name: str, attr: str) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserInputError(
            f"cannot import {module_name!r} for model factory: {exc}; check the module is on"
            " PYTHONPATH"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserInputError(f"{module_name!r} has no callable {attr!r} returning an nn.Module")
    model = factory()
    if not isinstance(model, nn.Module):
        raise UserInputError(f"{module_name}:{attr} returned {type(model).__name__}, not nn.Module")
    return model


def rebuild(architecture: dict[str, Any], trust_factory: bool = False) -> nn.Module:
    """Construct the architecture described by ``architecture``, without its trained weights.

    ``builtin`` and ``hf`` specs are data: a registered name, a transformers class and config.
    A ``factory`` spec names code (``package.module:callable``): it is imported and called only
    with ``trust_factory=True``, else a UserInputError names the ref and the two fixes.
    """
    kind = architecture.get("kind")
    if kind == "builtin":
        return builtin_info(str(architecture["name"])).build(False).eval()
    if kind == "factory":
        ref = str(architecture.get("ref"))
        if not trust_factory:
            raise UserInputError(untrusted_factory_message(ref))
        module_name, _, attr = ref.partition(":")
        return _call_factory(module_name, attr).eval()
    if kind == "hf":
        from slimtorch.models import hf

        return hf.from_config(architecture)
    raise UserInputError(
        f"unknown architecture kind {kind!r} in manifest: {json.dumps(architecture)[:200]}"
    )


def untrusted_factory_message(ref: str) -> str:
    """Why a ``factory`` architecture is not rebuilt by default, and the two ways to load it."""
    return (
        f"this artifact's architecture is the Python factory {ref[:200]!r}: loading it would"
        " import and call code named in the artifact, which slimtorch does not do unless asked."
        " Pass the model yourself (Python: slimtorch.load(dir, model=<your factory or a fresh"
        " nn.Module>); CLI: --model package.module:factory), or, if you trust this artifact,"
        " allow its factory (Python: slimtorch.load(dir, trust_factory=True); CLI:"
        " --trust-factory)"
    )
