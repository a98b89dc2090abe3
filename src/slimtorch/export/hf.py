"""Export a structurally pruned Hugging Face model as a plain transformers directory.

A Hugging Face config holds one size per kind of layer, so a pruned model exports only when
every layer kept the same sizes. :func:`hf_config_for` reads the actual sizes from the modules
(attention heads from :func:`slimtorch.graph.hf_attention.find_attention`, MLP widths from the
Linear shapes) and writes them into the config dict; it then builds the model class from that
config on the ``meta`` device and checks every parameter shape against the real one, so a
config that cannot express the pruned model (non-uniform layers; BERT with pruned heads: its
config has no ``head_dim`` and derives the head size as ``hidden_size / num_attention_heads``)
raises :class:`UnsupportedModelError` instead of writing a directory that would not load.
Such models are saved with ``slimtorch.save`` and loaded with ``slimtorch.load``.

:func:`export_hf` writes ``config.json`` + ``model.safetensors`` (transformers' own
``save_pretrained``, then the pruned config) atomically: into a hidden sibling, fsynced, renamed.
"""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from slimtorch.calibrate.text import tokenizer_file
from slimtorch.core.errors import UnsupportedModelError, UserInputError
from slimtorch.core.info import model_info
from slimtorch.export.checks import refuse_runtime_modules
from slimtorch.formats.atomic import check_target, fsync_tree, swap_into_place, temp_sibling
from slimtorch.formats.state import iter_states
from slimtorch.graph.hf_attention import find_attention
from slimtorch.models import hf
from slimtorch.runtime.conv1d import Conv1DLinear
from slimtorch.runtime.moe import UnfusedExperts, fused_state

log = logging.getLogger(__name__)

HEAD_KEYS: tuple[str, ...] = ("num_attention_heads", "n_head", "n_heads")
KV_KEYS: tuple[str, ...] = ("num_key_value_heads",)
WIDTH_KEYS: tuple[str, ...] = ("intermediate_size", "ffn_dim", "n_inner", "d_ff")
H = TypeVar("H", bound=Hashable)
_LOADER = "save it with slimtorch.save and load it with slimtorch.load instead"


def _pretrained(model: nn.Module) -> Any:
    tf = hf._transformers()
    if not isinstance(model, tf.PreTrainedModel):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a Hugging Face transformers model; export_hf writes"
            f" transformers directories only ({_LOADER})"
        )
    return model


def _uniform(sizes: Mapping[str, H], what: str) -> H:
    """The one value of ``sizes`` (layer -> size), or an error naming the layers that differ."""
    by_value: dict[H, list[str]] = defaultdict(list)
    for layer, size in sizes.items():
        by_value[size].append(layer)
    if len(by_value) == 1:
        return next(iter(by_value))
    parts = []
    for size, layers in by_value.items():
        shown = ", ".join(layers[:4]) + (f" (+{len(layers) - 4} more)" if len(layers) > 4 else "")
        parts.append(f"{size} in {shown}")
    raise UnsupportedModelError(
        f"{what} differ across layers ({'; '.join(parts)}): a Hugging Face config holds one size"
        f" for every layer, so this pruned model cannot be exported; prune the same amount in"
        f" every layer, or {_LOADER}"
    )


def _set(cfg: dict[str, Any], keys: tuple[str, ...], value: int) -> None:
    for key in keys:
        if isinstance(cfg.get(key), int):
            cfg[key] = value


def _meta_shapes(model: nn.Module, cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of ``type(model)`` built from ``cfg`` (on the meta device, no memory)."""
    try:
        config = hf._config_from_dict(cfg)
        with torch.device("meta"):
            built = type(model)._from_config(config)  # type: ignore[attr-defined]
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UnsupportedModelError(
            f"the {type(model).__name__} config cannot express the pruned sizes ({exc}); {_LOADER}"
        ) from None
    return {n: tuple(t.shape) for n, t in built.state_dict().items()}


def _real_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in hf_state_dict(model).items()}


def _update_heads(model: nn.Module, cfg: dict[str, Any]) -> None:
    sizes: dict[str, tuple[int, int, int]] = {}
    for name, module in model.named_modules():
        parts = find_attention(module)
        if parts is not None:
            sizes[name] = (parts.num_heads, parts.num_kv, parts.head_dim)
    if not sizes:
        return
    heads, kv, head_dim = _uniform(sizes, "attention sizes (heads, key/value heads, head_dim)")
    _set(cfg, HEAD_KEYS, heads)
    _set(cfg, KV_KEYS, kv)
    _set(cfg, ("head_dim",), head_dim)


def _update_width(model: nn.Module, cfg: dict[str, Any], key: str) -> None:
    """Set ``cfg[key]`` (an MLP width) to the size the model's Linears actually have."""
    base = _meta_shapes(model, cfg)
    bumped = _meta_shapes(model, {**cfg, key: cfg[key] + 1})
    real = _real_shapes(model)
    sizes: dict[str, int] = {}
    for name, shape in base.items():
        other = bumped.get(name, shape)
        for axis, (a, b) in enumerate(zip(shape, other, strict=True)):
            if a != b and name in real:  # axis = m * width + c (m = 2: fused gate_up_proj)
                m, c = b - a, a - (b - a) * cfg[key]
                width, rest = divmod(real[name][axis] - c, m)
                sizes[f"{name}[{axis}]"] = real[name][axis] if rest else width
    if sizes:
        cfg[key] = _uniform(sizes, f"MLP widths ({key})")


def _check_expressible(model: nn.Module, cfg: dict[str, Any]) -> None:
    built, real = _meta_shapes(model, cfg), _real_shapes(model)
    wrong = [n for n in real if n in built and built[n] != real[n]]
    if not wrong:
        return
    shown = ", ".join(f"{n} is {list(real[n])} (config builds {list(built[n])})" for n in wrong[:3])
    hint = ""
    if "head_dim" not in cfg and any(find_attention(m) for m in model.modules()):
        hint = (
            f" {type(model.config).__name__} has no head_dim: it derives the head size from"  # type: ignore[union-attr]
            " hidden_size / num_attention_heads, so pruned attention heads cannot be expressed."
        )
    raise UnsupportedModelError(
        f"the pruned model does not fit its Hugging Face config: {shown}.{hint} To keep it,"
        f" {_LOADER}"
    )


def hf_config_for(model: nn.Module) -> dict[str, Any]:
    """``model.config`` as a dict, with the sizes the (pruned) modules actually have.

    Raises :class:`UnsupportedModelError` when the layers differ in size or the config type
    cannot express them (``slimtorch.load`` is then the loader)."""
    cfg: dict[str, Any] = _pretrained(model).config.to_dict()
    _update_heads(model, cfg)
    for key in WIDTH_KEYS:
        if isinstance(cfg.get(key), int) and not isinstance(cfg[key], bool):
            _update_width(model, cfg, key)
    _check_expressible(model, cfg)
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = hf._dtype_name(next(model.parameters()).dtype)
    return cfg


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict as transformers stores it: the weight of every Conv1D that
    slimtorch ran as a Linear (runtime.conv1d) transposed back to ``[in, out]``, and the
    experts slimtorch ran as one Linear each (runtime.moe) fused back into transformers'
    3-D ``gate_up_proj`` / ``down_proj``."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, Conv1DLinear):
            key = f"{name}.weight" if name else "weight"
            state[key] = state[key].t().contiguous()
        elif isinstance(module, UnfusedExperts):
            prefix = f"{name}." if name else ""
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]
            state.update({prefix + k: v for k, v in fused_state(module).items()})
    return state


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _copy_tokenizer(model: nn.Module, out: Path) -> list[str]:
    """Copy the tokenizer the model's info records (``tokenizer.json`` and the small files
    transformers reads beside it) into ``out``, so the directory is complete; returns what was
    copied. A recorded tokenizer that cannot be found is a warning, not an error: the weights
    are still right."""
    spec = model_info(model).tokenizer
    if not spec:
        return []
    try:
        source = tokenizer_file(spec)
    except UserInputError as exc:
        log.warning("export_hf: the recorded tokenizer %r is not copied: %s", spec, exc)
        return []
    copied = []
    for name in TOKENIZER_FILES:
        found = source if name == "tokenizer.json" else source.parent / name
        if found.is_file():
            shutil.copyfile(found, out / name)
            copied.append(name)
    return copied


def export_hf(model: nn.Module, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` to ``out_dir`` so that ``from_pretrained(out_dir)`` loads it; atomic.

    Compressed weights (masks, quantization states) are written as their effective float
    values: the directory is a plain transformers model."""
    refuse_runtime_modules(model)
    cfg = hf_config_for(model)
    path = Path(out_dir)
    check_target(path, overwrite)
    if iter_states(model):
        log.warning("export_hf writes dense float weights; compression states are not kept")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        model.save_pretrained(tmp, state_dict=hf_state_dict(model))  # type: ignore[operator]
        hf._config_from_dict(cfg).save_pretrained(tmp)  # the pruned sizes replace config.json
        _copy_tokenizer(model, tmp)
        fsync_tree(tmp)
        swap_into_place(tmp, path, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s", type(model).__name__, path)
    return path
