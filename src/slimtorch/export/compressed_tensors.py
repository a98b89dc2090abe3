"""Export a quantized Hugging Face model in the compressed-tensors ``pack-quantized`` layout.

transformers (with the ``compressed-tensors`` package), vLLM and llm-compressor read this
layout. For every ``nn.Linear`` whose weight carries an affine :class:`QuantState`, the
``model.safetensors`` holds, instead of ``<layer>.weight``:

- ``weight_packed`` int32 ``[out, ceil(in * bits / 32)]``: signed codes ``c`` in
  ``[-2**(bits-1), 2**(bits-1) - 1]``, stored as ``c + 2**(bits-1)``, ``32 // bits`` per word,
  element ``j`` of a row in word ``j // (32 // bits)`` at bit ``bits * (j % (32 // bits))``;
- ``weight_scale`` in the weight's dtype: ``[out, in / group_size]`` (group), ``[out, 1]``
  (channel) or ``[1]`` (tensor);
- ``weight_zero_point`` (asymmetric only), signed like the codes: for group and channel
  grids packed like the codes but along the output axis (int32 ``[ceil(out * bits / 32),
  groups]``), for a tensor grid one int8 ``[1]``;
- ``weight_shape`` int64 ``[out, in]``.

The reader computes ``w = (c - zero_point) * scale`` in the scale's dtype, which is
slimtorch's ``(codes - zero_point) * scale`` once unsigned codes and zero points are shifted
by ``2**(bits-1)``: a float32 model reloads with bit-identical weights. Layers with the same
grid (bits, strategy, group size, symmetry) form one entry of ``config_groups``; Linear
layers left unquantized are listed in ``ignore``. Token embeddings and the output head (the
LM head, tied or not) are written dense, dequantized to the checkpoint dtype, even when
quantized (8-bit rows in the w4a16 presets): compressed-tensors readers quantize Linear layers
only, and a second grid for the head would stop transformers loading asymmetric groups; the
report lists them under ``dequantized``. A pruning mask on a quantized weight is kept
by setting the pruned codes to the zero point (exact). Float-quantized layers (quantize.fp8,
quantize.nvfp4, quantize.mxfp4, and the Fp8Linear layers of quantize.fp8 with dynamic
activations) are written in compressed-tensors' ``float-quantized``, ``nvfp4-pack-quantized``
and ``mxfp4-pack-quantized`` formats (:mod:`slimtorch.export.ct_floats`). What the layout cannot express raises
:class:`UnsupportedModelError`: codebooks, binary/ternary grids, bit widths that do not divide
32 (readers disagree on how those are packed), ragged last groups, quantized non-Linear
layers, masks without quantization (compressed-tensors 0.20 dropped its sparse formats).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.core.info import model_info
from slimtorch.export.checks import refuse_runtime_modules
from slimtorch.export.ct_floats import FP8_FORMAT, float_codes
from slimtorch.export.ct_layout import (  # noqa: F401  (pack_int32/unpack_int32 re-exported)
    FORMAT,
    SUPPORTED_BITS,
    Grid,
    grid_of,
    layer_tensors,
    pack_int32,
    quantization_config,
    signed_grid,
    unpack_int32,
)
from slimtorch.export.hf import hf_config_for
from slimtorch.formats.atomic import (
    MODEL_FILE,
    check_target,
    fsync_tree,
    swap_into_place,
    temp_sibling,
)
from slimtorch.formats.state import QuantState, iter_states
from slimtorch.runtime.fp8 import Fp8Linear

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    *("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"),
    *("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja"),
)


def dense_heads(model: nn.Module) -> set[str]:
    """Modules written dense whatever their state: every ``nn.Embedding`` and the output head
    (``get_output_embeddings()``) with any Linear sharing its weight."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), torch.Tensor):
        shared.add(id(head.weight))
    return {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Embedding)
        or m is head
        or (isinstance(m, nn.Linear) and id(m.weight) in shared)
    }


def _collect(
    model: nn.Module,
) -> tuple[dict[str, tuple[QuantState, Any, Any, Grid]], list[str], list[str]]:
    """Per quantized Linear: (state, signed codes, signed zero points, grid); ``ignore``; and
    the quantized embeddings / output head written dense (dequantized)."""
    layers: dict[str, tuple[QuantState, Any, Any, Grid]] = {}
    dense = dense_heads(model)
    dequantized: list[str] = []
    for name, module, param, state in iter_states(model):
        if param != "weight" or (state.quant is None and state.mask is None):
            continue
        if name in dense:
            dequantized.append(name)
            continue
        grid = grid_of(name, module, state)
        assert state.quant is not None
        if grid.fmt != FORMAT:
            codes, zp = float_codes(state.quant, state.mask), torch.zeros(1, dtype=torch.int32)
        else:
            codes, zp = signed_grid(state.quant, state.mask)
        layers[name] = (state.quant, codes, zp, grid)
    fp8 = _fp8_linears(model)
    layers.update(fp8)
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no quantized Linear weight; quantize it first (e.g. the"
            " w4a16-rtn preset) or export dense weights with --to hf"
        )
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    params = dict(model.named_parameters(remove_duplicate=False))
    owners: dict[int, list[str]] = defaultdict(list)
    for pname, p in params.items():
        owners[p.data_ptr()].append(pname)
    for name in layers:
        if name in fp8:
            continue
        tied = owners[params[f"{name}.weight"].data_ptr()]
        if len(tied) > 1:
            raise UnsupportedModelError(
                f"{name}.weight is quantized but tied to {[t for t in tied if t != name + '.weight']};"
                f" untie them (tie_word_embeddings=False) or leave the tied layer unquantized"
                f" (ignore: [{name}])"
            )
    return layers, ignore, dequantized


def _fp8_linears(model: nn.Module) -> dict[str, tuple[QuantState, Any, Any, Grid]]:
    """The :class:`Fp8Linear` layers (quantize.fp8 activations: dynamic), as FP8 grids."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, Fp8Linear):
            continue
        scale = module.weight_scale.detach().to(torch.float32).reshape(-1, 1).cpu()
        codes = module.weight_fp8.detach().cpu()
        q = QuantState(
            scheme="float",
            bits=8,
            signed=True,
            granularity="per_channel",
            codes=codes,
            scale=scale,
            zero_point=torch.zeros(scale.shape, dtype=torch.int32),
            element="e4m3",
        )
        dynamic = module.activations == "dynamic"
        grid = Grid(8, "channel", None, FP8_FORMAT, dynamic)
        out[name] = (q, codes, torch.zeros(1, dtype=torch.int32), grid)
    return out


_WEIGHT_LEAVES = ("weight", "weight_fp8", "weight_scale")


def _state_dict(
    model: nn.Module, layers: dict[str, tuple[QuantState, Any, Any, Grid]]
) -> tuple[dict[str, torch.Tensor], dict[Grid, list[str]], dict[Grid, bool]]:
    groups: dict[Grid, list[str]] = defaultdict(list)
    for name, (_, _, _, grid) in layers.items():
        groups[grid].append(name)
    symmetric = {g: all(not bool(layers[n][2].any()) for n in names) for g, names in groups.items()}
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf in _WEIGHT_LEAVES:
            if f"{owner}.weight_packed" in tensors or f"{owner}.weight_scale" in tensors:
                continue  # an Fp8Linear's second buffer
            q, codes, zp, grid = layers[owner]
            for sub, t in layer_tensors(q, codes, zp, grid, symmetric[grid], value.dtype).items():
                tensors[f"{owner}.{sub}"] = t
            continue
        ptr = value.data_ptr()
        if ptr in seen and value.numel():  # a tied weight is stored once, under its first name
            continue
        seen[ptr] = key
        tensors[key] = value.detach().contiguous()
    return tensors, dict(groups), symmetric


def tokenizer_dir(model: nn.Module) -> Path | None:
    """Where ``model``'s tokenizer files are: its source directory, if it has one."""
    config = getattr(model, "config", None)
    for where in (getattr(config, "_name_or_path", None), model_info(model).source):
        if (
            where
            and Path(str(where)).is_dir()
            and any((Path(str(where)) / f).is_file() for f in TOKENIZER_FILES)
        ):
            return Path(str(where))
    return None


def _copy_tokenizer(source: Path | None, tmp: Path) -> list[str]:
    names = [n for n in TOKENIZER_FILES if source is not None and (source / n).is_file()]
    for name in names:
        shutil.copyfile(Path(str(source)) / name, tmp / name)
    return names


def _write(
    model: nn.Module, tmp: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]
) -> None:
    from slimtorch.models import hf

    qc = cfg["quantization_config"]
    hf._config_from_dict(cfg).save_pretrained(tmp)
    written = json.loads((tmp / "config.json").read_text())
    if written.get("quantization_config") != json.loads(json.dumps(qc)):
        raise UnsupportedModelError(
            f"{type(model.config).__name__} did not keep the quantization_config"  # type: ignore[union-attr]
            " block in config.json; this transformers version cannot express it"
        )
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(tmp)


def export_compressed_tensors(
    model: nn.Module,
    out_dir: str | Path,
    overwrite: bool = False,
    tokenizer: str | Path | None = None,
) -> dict[str, Any]:
    """Write the quantized transformers ``model`` to ``out_dir`` in the compressed-tensors
    ``pack-quantized`` layout (``from_pretrained(out_dir)`` loads it); atomic.

    Tokenizer files are copied from ``tokenizer`` (a directory), else from the directory the
    model came from when it has them. Returns a JSON-able report."""
    refuse_runtime_modules(model)
    cfg = hf_config_for(model)  # raises for models transformers cannot rebuild
    layers, ignore, dequantized = _collect(model)
    tensors, groups, symmetric = _state_dict(model, layers)
    qc = cfg["quantization_config"] = quantization_config(groups, symmetric, ignore)
    path = Path(out_dir)
    check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    tmp.mkdir()
    try:
        _write(model, tmp, tensors, cfg)
        copied = _copy_tokenizer(Path(tokenizer) if tokenizer else tokenizer_dir(model), tmp)
        fsync_tree(tmp)
        swap_into_place(tmp, path, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %d quantized layers of %s to %s", len(layers), type(model).__name__, path)
    if dequantized:
        log.info("written dense (dequantized): %s", ", ".join(dequantized))
    return {
        "format": "compressed-tensors",
        "out": str(path),
        "class": type(model).__name__,
        "files": sorted(f.name for f in path.iterdir()),
        "bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "quantized_layers": len(layers),
        "config_groups": {
            k: {**v["weights"], "layers": len(v["targets"]) if len(groups) > 1 else len(layers)}
            for k, v in qc["config_groups"].items()
        },
        "ignore": ignore,
        "dequantized": dequantized,
        "tokenizer_files": copied,
    }


def verify_reload(
    model: nn.Module, path: str | Path, inputs: tuple[torch.Tensor, ...]
) -> dict[str, Any]:
    """Load ``path`` with transformers' ``from_pretrained`` (which needs the compressed-tensors
    package) and compare its outputs on ``inputs`` with ``model``'s (``ATOL + RTOL * |value|``
    of :mod:`slimtorch.export.onnx.export`). Raises :class:`UnsupportedModelError` when they differ."""
    from slimtorch.export.onnx.export import ATOL, RTOL, compare_outputs, tensor_leaves
    from slimtorch.models import hf

    cls = getattr(hf._transformers(), type(model).__name__)
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    reloaded = cls.from_pretrained(path, local_files_only=True, attn_implementation=attn)
    kwargs = {"use_cache": False}
    with torch.inference_mode():
        expected = [t.numpy() for t in tensor_leaves(model.eval()(*inputs, **kwargs))]
        actual = [t.numpy() for t in tensor_leaves(reloaded.eval()(*inputs, **kwargs))]
    check = compare_outputs(expected, actual, ATOL, RTOL)
    if not check["ok"]:
        raise UnsupportedModelError(
            f"{path} loaded by transformers computes different outputs (up to"
            f" {check['max_abs_diff']:.3g}; {check.get('reason') or ''}); keep the model as a"
            " slimtorch artifact and report this as a bug"
        )
    return {"max_abs_diff": check["max_abs_diff"], "atol": ATOL, "rtol": RTOL}


def reader_reference(model: nn.Module) -> tuple[nn.Module, str | None]:
    """What transformers' compressed-tensors reader computes: ``model`` itself, or for NVFP4
    layers (which compressed-tensors 0.20 dequantizes in bfloat16) a copy with those weights
    rounded to bfloat16, and a note saying so."""
    names = [
        name
        for name, module, param, state in iter_states(model)
        if param == "weight"
        and isinstance(module, nn.Linear)
        and state.quant is not None
        and state.quant.scheme == "float"
        and state.quant.global_scale is not None
    ]
    if not names:
        return model, None
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            w = twin.get_submodule(name).weight
            assert isinstance(w, torch.Tensor)
            w.copy_(w.to(torch.bfloat16).to(w.dtype))
    return twin, (
        f"{len(names)} NVFP4 layers compared with their weights rounded to bfloat16:"
        " compressed-tensors 0.20 dequantizes FP4 in bfloat16 (vLLM's kernels do not)"
    )


def export_checked(
    model: nn.Module, inputs: Sequence[torch.Tensor], out_dir: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """:func:`export_compressed_tensors`, then :func:`verify_reload` when the compressed-tensors
    package is installed (else the report says the check was skipped); a directory that does
    not reload the same is removed."""
    result = export_compressed_tensors(model, out_dir, overwrite)
    if importlib.util.find_spec("compressed_tensors") is None:
        return {**result, "verified": "skipped: `pip install compressed-tensors` to check it"}
    try:
        reference, note = reader_reference(model)
        return {
            **result,
            **verify_reload(reference, out_dir, tuple(inputs)),
            "verified": "transformers",
            **({"verified_note": note} if note else {}),
        }
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
