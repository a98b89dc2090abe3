"""Hugging Face ``transformers`` models from a local directory; never touches the network.

A directory holding ``config.json`` (and usually ``model.safetensors``) loads with
:func:`load_directory`. Its architecture spec is plain JSON::

    {"kind": "hf", "class": "BertModel", "config": {...config.to_dict()...},
     "attn_implementation": "sdpa", "dtype": "float32"}

and :func:`from_config` builds the same class from it with fresh (untrained) weights, so a saved
artifact reloads without unpickling and without the original directory. The attention kernel
is recorded and reused so that the loaded and the rebuilt model compute the same outputs.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import UserInputError
from slimtorch.models.registry import LoadedModel

log = logging.getLogger(__name__)

EXAMPLE_SEQ_LEN = 128
ATTENTION_KERNELS = ("eager", "sdpa")  # what read_architecture records; torch's own kernels


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UserInputError(
            "Hugging Face models need transformers: `pip install 'slimtorch[hf]'`"
        ) from None
    return transformers


def _attn_implementation(model_cls: type) -> str:
    """``sdpa`` where the class supports it (fast, deterministic on CPU), else ``eager``."""
    return "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise UserInputError(f"unknown dtype {name!r} in the architecture spec; use e.g. 'float32'")
    return dtype


def _config_json(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UserInputError(
            f"{path} is not a Hugging Face model directory (no config.json); give a directory"
            " written by save_pretrained, builtin:NAME, or package.module:factory"
        )
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(
            f"{cfg_path} is not valid JSON ({exc}); fix or re-save the model"
        ) from None
    if not isinstance(data, dict):
        raise UserInputError(f"{cfg_path} must hold a JSON object; re-save the model")
    return data


def _model_class(architectures: list[str]) -> type | None:
    """The class to load: the one ``config.architectures`` names if transformers has it."""
    tf = _transformers()
    for name in architectures:
        cls = getattr(tf, name, None)
        if isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel):
            return cls
    return None


def spec(cls_name: str, config: dict[str, Any], attn: str, dtype: str) -> dict[str, Any]:
    """The ``{"kind": "hf", ...}`` architecture spec that :func:`from_config` rebuilds; an
    attention kernel outside :data:`ATTENTION_KERNELS` is recorded as ``eager``."""
    return {
        "kind": "hf",
        "class": cls_name,
        "config": config,
        "attn_implementation": attn if attn in ATTENTION_KERNELS else "eager",
        "dtype": dtype,
    }


def read_architecture(path: str | Path) -> dict[str, Any]:
    """The architecture spec of the model in ``path`` (reads only its config, no weights)."""
    path = Path(path)
    _config_json(path)
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise UserInputError(
            f"cannot read the Hugging Face config in {path}: {exc}; check config.json has a"
            " model_type this transformers version knows (custom code is not run)"
        ) from None
    archs = list(config.architectures or [])
    cls = _model_class(archs)
    if cls is None:
        auto = (
            tf.AutoModelForCausalLM
            if any(a.endswith("ForCausalLM") for a in archs)
            else tf.AutoModel
        )
        try:
            cls = auto._model_mapping[type(config)]
        except KeyError:
            raise UserInputError(
                f"transformers has no model class for {type(config).__name__} (architectures"
                f" {archs}); give a directory of a model transformers supports"
            ) from None
    config_dict = config.to_dict()
    dtype = config_dict.get("dtype") or config_dict.get("torch_dtype") or "float32"
    dtype_name = _dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype)
    return spec(cls.__name__, config_dict, _attn_implementation(cls), dtype_name)


def _config_from_dict(config: dict[str, Any]) -> Any:
    tf = _transformers()
    model_type = config.get("model_type")
    try:
        config_cls = tf.CONFIG_MAPPING[model_type]
    except KeyError:
        raise UserInputError(
            f"unknown Hugging Face model_type {model_type!r} in the architecture spec; it needs a"
            " transformers version that supports it"
        ) from None
    return config_cls.from_dict(dict(config))


def from_config(architecture: dict[str, Any]) -> nn.Module:
    """Build the ``architecture`` spec's model class from its config, with no trained weights."""
    tf = _transformers()
    name = str(architecture.get("class"))
    cls = getattr(tf, name, None) if name.isidentifier() else None
    if not (
        isinstance(cls, type)
        and issubclass(cls, tf.PreTrainedModel)
        and cls.__module__.startswith("transformers.")
    ):
        raise UserInputError(
            f"unknown Hugging Face model class {name[:100]!r} in the architecture spec; it must be"
            f" a transformers model class (installed transformers {tf.__version__})"
        )
    cfg = architecture.get("config")
    if not isinstance(cfg, dict):
        raise UserInputError("the architecture spec has no 'config' object; re-save the model")
    config = _config_from_dict(cfg)
    attn = str(architecture.get("attn_implementation", "eager"))
    if attn not in ATTENTION_KERNELS:  # others may fetch and run kernels from the Hub
        raise UserInputError(
            f"attn_implementation {attn[:100]!r} in the architecture spec is not one of"
            f" {list(ATTENTION_KERNELS)}; re-save the model with this slimtorch version"
        )
    dtype = _dtype(str(architecture.get("dtype", "float32")))
    model = cls._from_config(config, attn_implementation=attn, dtype=dtype)  # type: ignore[attr-defined]
    return model.eval()  # type: ignore[no-any-return]


def hf_architecture(model: nn.Module) -> dict[str, Any] | None:
    """The ``{"kind": "hf", ...}`` spec of a live transformers model (None for other models):
    what :func:`from_config` rebuilds it from, without its weights."""
    config = getattr(model, "config", None)
    module = type(model).__module__
    if config is None or not module.startswith("transformers.") or not hasattr(config, "to_dict"):
        return None
    attn = str(getattr(config, "_attn_implementation", None) or "eager")
    dtype = _dtype_name(next(model.parameters()).dtype)
    return spec(type(model).__name__, config.to_dict(), attn, dtype)


def token_inputs(vocab_size: int, seq_len: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    """``example_inputs`` for a token model: fixed pseudo-random ids ``[batch, seq_len]``."""

    def make(batch: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(0)
        return (torch.randint(0, vocab_size, (batch, seq_len), generator=gen),)

    return make


@contextlib.contextmanager
def _quiet_loading(tf: Any) -> Iterator[None]:
    """No transformers progress bar while loading (slimtorch reports its own progress)."""
    logging_ = tf.utils.logging
    was = logging_.is_progress_bar_enabled()
    logging_.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging_.enable_progress_bar()


def load_directory(path: str | Path) -> LoadedModel:
    """Load the model saved in the local Hugging Face directory ``path`` (weights included)."""
    path = Path(path)
    architecture = read_architecture(path)
    tf = _transformers()
    cls = getattr(tf, architecture["class"])
    extra = _dequantizing(tf, architecture)
    try:
        with _quiet_loading(tf):
            model = cls.from_pretrained(
                path,
                local_files_only=True,
                attn_implementation=architecture["attn_implementation"],
                dtype="auto",
                use_safetensors=True,  # never unpickle a user's pytorch_model.bin
                **extra,
            )
    except OSError as exc:
        raise UserInputError(
            f"cannot load the weights in {path}: {exc}; the directory needs model.safetensors"
            " written by save_pretrained (slimtorch never unpickles pytorch_model.bin: convert"
            " it once with `model.save_pretrained(dir, safe_serialization=True)` where you trust"
            " it)"
        ) from None
    if extra:  # the weights are float now: nothing may claim they are still MXFP4
        architecture["config"].pop("quantization_config", None)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    architecture["dtype"] = _dtype_name(next(model.parameters()).dtype)
    cfg = architecture["config"]
    seq = min(EXAMPLE_SEQ_LEN, int(cfg.get("max_position_embeddings") or EXAMPLE_SEQ_LEN))
    vocab = int(cfg.get("vocab_size") or 2)
    log.info("loaded %s from %s", architecture["class"], path)
    causal = str(architecture["class"]).endswith(("ForCausalLM", "LMHeadModel"))  # GPT2LMHeadModel
    return LoadedModel(
        model.eval(),
        str(path),
        architecture,
        example_inputs=token_inputs(vocab, seq),
        task="causal-lm" if causal else None,  # next-token loss on --data text
        tokenizer=_tokenizer_beside(path),
    )


def _dequantizing(tf: Any, architecture: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` arguments that load a checkpoint stored in MXFP4 (gpt-oss on the Hub:
    experts as ``*_blocks`` / ``*_scales``) as float weights: slimtorch compresses the float
    model (transformers' own MXFP4 path needs Accelerate and GPU kernels)."""
    quant = architecture["config"].get("quantization_config") or {}
    if quant.get("quant_method") != "mxfp4":
        return {}
    log.info("%s: MXFP4 experts dequantized on load", architecture["class"])
    return {"quantization_config": tf.Mxfp4Config(dequantize=True)}


def _tokenizer_beside(path: Path) -> str | None:
    """The ``tokenizer.json`` saved beside ``config.json`` (save_pretrained of a tokenizer)."""
    found = path / "tokenizer.json"
    return str(found.resolve()) if found.is_file() else None
