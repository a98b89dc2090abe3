"""Streaming model merges: one tensor name at a time from every input, merged, written, dropped.

Inputs (:func:`open_source`): ``builtin:NAME`` (its state_dict, in memory: builtins are small), a
slimtorch artifact directory (checksum verified in chunks, then each tensor decoded on demand), a
Hugging Face directory (every ``*.safetensors`` shard read through ``safe_open``), or a directory
or file of ``*.safetensors``. Memory is therefore about one tensor per input plus the output
tensor, except for builtins.

Output (:func:`merge_to_dir`) follows the kind of the reference model (the base, else the first):

- builtin or artifact -> a slimtorch artifact carrying the reference's architecture, which the
  artifact loader and ``slimtorch eval OUT`` read (metadata ``source`` is the reference);
- Hugging Face directory -> a Hugging Face directory: ``model.safetensors`` (one file, the input
  tensor names), the reference's ``config.json``, tokenizer and other small files copied, and
  ``slimtorch_merge.json`` recording the merge; ``transformers`` and ``slimtorch compress
  --model OUT`` load it;
- plain safetensors -> a directory with ``model.safetensors``.

Tensors that are not floating point (position ids, counters) are copied from the reference.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from slimtorch.core.errors import ArtifactError, ChecksumError, ConfigError
from slimtorch.formats.artifact import MODEL_FILE, PART_SEP, read_manifest
from slimtorch.formats.encoding import decode_tensor
from slimtorch.formats.quant_parts import dtype_from_name
from slimtorch.formats.streaming import (
    TORCH_DTYPES,
    StreamingArtifactWriter,
    StreamingSafetensorsDir,
    TensorSpec,
    safetensors_size,
)
from slimtorch.merge import methods as M
from slimtorch.merge.extra import EXTRA_METHODS, kernel_dtype, merge_extra
from slimtorch.merge.mergekit import MergeConfig
from slimtorch.merge.tokenizer import VocabPlan, aligned, patch_files, sources_plan

log = logging.getLogger(__name__)

Info = tuple[tuple[int, ...], torch.dtype]
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
_TASK_OPTIONS = {
    "task_arithmetic": M.TASK_ARITHMETIC,
    "ties": M.TIES,
    "dare_linear": M.DARE_LINEAR,
    "dare_ties": M.DARE_TIES,
}
_VOCAB_HINTS = ("embed", "wte", "lm_head", "word_embeddings", "shared", "output.weight")


@dataclass
class TensorSource:
    """One input model: tensor names, shapes and dtypes up front, each tensor read on demand."""

    spec: str
    kind: str  # builtin | artifact | hf | safetensors
    infos: dict[str, Info]
    read: Callable[[str], torch.Tensor]
    root: Path | None = None
    architecture: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    stack: ExitStack = field(default_factory=ExitStack)

    def close(self) -> None:
        self.stack.close()


def _from_state_dict(spec: str) -> TensorSource:
    from slimtorch.models.registry import load_model

    loaded = load_model(spec)
    sd = {k: v.detach() for k, v in loaded.model.state_dict().items()}
    meta = {"source": spec, "evaluator": loaded.evaluator, "data": loaded.data}
    infos = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    return TensorSource(spec, "builtin", infos, sd.__getitem__, None, loaded.architecture, meta)


def _from_safetensors(spec: str, files: list[Path], kind: str, root: Path) -> TensorSource:
    stack = ExitStack()
    handles: dict[str, Any] = {}
    infos: dict[str, Info] = {}
    try:
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                if key in handles:
                    raise ConfigError(f"{spec}: tensor {key!r} appears in two shards; re-save it")
                sl = handle.get_slice(key)
                infos[key] = (tuple(sl.get_shape()), TORCH_DTYPES[sl.get_dtype()])
                handles[key] = handle
    except (SafetensorError, OSError, KeyError) as exc:
        stack.close()
        raise ConfigError(
            f"{spec}: cannot read its safetensors files ({exc}); re-save it"
        ) from None
    except BaseException:
        stack.close()
        raise
    return TensorSource(spec, kind, infos, lambda k: handles[k].get_tensor(k), root, stack=stack)


def _verify_checksum(path: Path, info: dict[str, Any]) -> None:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha.update(block)
    if path.stat().st_size != info["bytes"] or sha.hexdigest() != info["sha256"]:
        raise ChecksumError(f"{path} does not match the checksum in its manifest; re-create it")


def _from_artifact(spec: str, root: Path) -> TensorSource:
    manifest = read_manifest(root)
    if manifest.get("modules"):
        raise ConfigError(
            f"{spec} holds runtime modules (packed low-bit layers); merge the models before"
            " quantizing them with a runtime format"
        )
    _verify_checksum(root / MODEL_FILE, manifest["files"][MODEL_FILE])
    src = _from_safetensors(spec, [root / MODEL_FILE], "artifact", root)
    handle_read, metas, aliases = src.read, manifest["tensors"], manifest["aliases"]

    def read(name: str) -> torch.Tensor:
        target = aliases.get(name, name)
        meta = metas[target]
        parts = {p: handle_read(f"{target}{PART_SEP}{p}") for p in meta["parts"]}
        return decode_tensor(meta, parts)[0]

    names = list(metas) + list(aliases)
    src.infos = {
        n: (
            tuple(metas[aliases.get(n, n)]["shape"]),
            dtype_from_name(metas[aliases.get(n, n)]["dtype"]),
        )
        for n in names
    }
    src.read, src.architecture = read, manifest.get("architecture")
    src.metadata = {
        k: v
        for k, v in manifest.get("metadata", {}).items()
        if k in ("source", "evaluator", "data", "input")
    }
    return src


def _resolve(spec: str, config_dir: Path | None) -> Path:
    path = Path(spec).expanduser()
    if not path.exists() and config_dir is not None and not path.is_absolute():
        path = config_dir / spec
    if not path.exists():
        raise ConfigError(
            f"model {spec!r} not found: give builtin:NAME, a Hugging Face directory, a slimtorch"
            " artifact, or a directory/file of *.safetensors (relative paths are tried from the"
            " current directory, then the config's directory)"
        )
    return path


def open_source(spec: str, config_dir: Path | None = None) -> TensorSource:
    """Open the model ``spec`` (``builtin:NAME`` or a path) for tensor-by-tensor reading."""
    if spec.startswith("builtin:"):
        return _from_state_dict(spec)
    path = _resolve(spec, config_dir)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ConfigError(f"{spec}: only .safetensors files can be merged (no pickle)")
        return _from_safetensors(spec, [path], "safetensors", path.parent)
    if (path / "manifest.json").is_file():
        return _from_artifact(spec, path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"{spec} has no *.safetensors files; re-save the model with safetensors"
            " (save_pretrained(..., safe_serialization=True)): pickle files are not read"
        )
    kind = "hf" if (path / "config.json").is_file() else "safetensors"
    return _from_safetensors(spec, files, kind, path)


def _mismatch(
    name: str, a: TensorSource, sa: tuple[int, ...], b: TensorSource, sb: tuple[int, ...]
) -> ConfigError:
    vocab = (
        len(sa) == len(sb) == 2
        and sa[1:] == sb[1:]
        and any(h in name.lower() for h in _VOCAB_HINTS)
    )
    if vocab:
        return ConfigError(
            f"vocabularies differ: {name} has {sa[0]} rows in {a.spec} and {sb[0]} in {b.spec};"
            " set `tokenizer_source: union` (or base, or a model) to align their vocabularies"
        )
    return ConfigError(
        f"tensor {name!r} has shape {list(sa)} in {a.spec} but {list(sb)} in {b.spec}; all models"
        " must have the same architecture"
    )


def check_compatible(
    sources: list[TensorSource], ref: TensorSource, vocab: set[str] | None = None
) -> list[str]:
    """The tensor names to merge (the reference's order); errors on missing or mismatched ones
    (the rows of the token tensors in ``vocab`` may differ: they are aligned first)."""
    names = list(ref.infos)
    for src in sources:
        if src is ref:
            continue
        missing = [n for n in names if n not in src.infos]
        extra = [n for n in src.infos if n not in ref.infos]
        if missing or extra:
            raise ConfigError(
                f"{src.spec} and {ref.spec} hold different tensors: {len(missing)} missing from"
                f" {src.spec} (e.g. {missing[:3]}), {len(extra)} not in {ref.spec}"
                f" (e.g. {extra[:3]}); merge models of one architecture"
            )
        for n in names:
            skip = 1 if vocab and n in vocab else 0
            if src.infos[n][0][skip:] != ref.infos[n][0][skip:]:
                raise _mismatch(n, ref, ref.infos[n][0], src, src.infos[n][0])
    return names


def output_dtype(config: MergeConfig, infos: list[Info], ref: int) -> torch.dtype:
    """The stored dtype of one merged tensor (mergekit: out_dtype, else dtype, else promoted)."""
    dtypes = [d for _, d in infos]
    if not all(d.is_floating_point for d in dtypes):
        return dtypes[ref]
    if config.out_dtype:
        return dtype_from_name(config.out_dtype)
    if config.dtype:
        return kernel_dtype(config, dtype_from_name(config.dtype))
    return kernel_dtype(config, functools.reduce(torch.promote_types, dtypes))


def merge_tensor(
    config: MergeConfig, name: str, tensors: list[torch.Tensor], seed: int
) -> torch.Tensor:
    """Merge the ``tensors`` of one name (in ``config.inputs`` order) as ``config`` says."""
    ref = config.base_index if config.base_index is not None else 0
    if not all(t.is_floating_point() for t in tensors):
        if any(t.dtype != tensors[ref].dtype or not torch.equal(t, tensors[ref]) for t in tensors):
            log.warning(
                "%s: non-float tensor differs between models; copying the reference's", name
            )
        return tensors[ref].clone()
    dtype = (
        dtype_from_name(config.dtype)
        if config.dtype
        else functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    )
    xs = [t.to(dtype) for t in tensors]
    weights = [i.weight for i in config.inputs]
    if config.method in EXTRA_METHODS:
        out = merge_extra(config, name, xs, seed)
    elif config.method == "linear":
        out = M.linear(xs, weights, config.normalize)
    else:
        base, bi = xs[ref], ref
        others = [x for i, x in enumerate(xs) if i != bi]
        rest = [inp for i, inp in enumerate(config.inputs) if i != bi]
        if config.method == "slerp":
            out = M.slerp(config.t, base, others[0])
        else:
            options = replace(
                _TASK_OPTIONS[config.method],
                normalize=config.normalize,
                rescale=config.rescale,
                lam=config.scale,
            )
            gen = M.tensor_generator(seed, name) if options.sparsify == "random" else None
            dens = [i.density for i in rest]
            out = M.task_merge(base, others, [i.weight for i in rest], dens, options, gen)
    return out.to(dtype_from_name(config.out_dtype)) if config.out_dtype else out


def _hf_files(root: Path, out_dtype: str | None, record: dict[str, Any]) -> dict[str, bytes]:
    """The reference directory's small files (config, tokenizer), config dtype updated."""
    files: dict[str, bytes] = {}
    for f in sorted(root.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if f.name.endswith(".index.json") or f.name in ("manifest.json", "slimtorch_merge.json"):
            continue
        files[f.name] = f.read_bytes()
    skipped = [d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if skipped:
        log.warning("subdirectories %s of %s are not copied to the merged model", skipped, root)
    if out_dtype and "config.json" in files:
        cfg = json.loads(files["config.json"])
        for key in ("torch_dtype", "dtype"):
            if key in cfg:
                cfg[key] = out_dtype
        files["config.json"] = json.dumps(cfg, indent=2).encode("utf-8")
    files["slimtorch_merge.json"] = json.dumps(record, indent=1).encode("utf-8")
    return files


def _writer(
    ref: TensorSource,
    config: MergeConfig,
    out: Path,
    specs: list[TensorSpec],
    force: bool,
    plan: VocabPlan | None = None,
) -> StreamingArtifactWriter | StreamingSafetensorsDir:
    record = {"merge": config.model_dump(mode="json"), "inputs": [i.model for i in config.inputs]}
    if ref.kind in ("builtin", "artifact"):
        if ref.architecture is None:
            raise ArtifactError(f"{ref.spec}: its manifest has no architecture; re-create it")
        dense = [
            TensorSpec(s.name, s.shape, torch.float32 if s.dtype.is_floating_point else s.dtype)
            for s in specs
        ]
        meta = {
            **ref.metadata,
            "dense_bytes": safetensors_size(sorted(dense, key=lambda s: s.name), None),
            **record,
        }
        manifest = {"architecture": ref.architecture, "modules": [], "metadata": meta}
        return StreamingArtifactWriter(out, specs, manifest, overwrite=force)
    files = (
        _hf_files(ref.root, config.out_dtype or config.dtype, record)
        if ref.kind == "hf" and ref.root
        else {}
    )
    return StreamingSafetensorsDir(out, specs, patch_files(files, plan) if plan else files, force)


def merge_to_dir(
    config: MergeConfig,
    out: str | Path,
    force: bool = False,
    seed: int = 0,
    config_dir: Path | None = None,
) -> dict[str, Any]:
    """Merge the models of ``config`` tensor by tensor into ``out``; returns facts about it."""
    out = Path(out)
    if config.slices is not None:
        from slimtorch.merge.slices import Slice, slice_to_dir  # it imports this module

        parts = [Slice(**s) for s in config.slices]
        return slice_to_dir(parts, out, (config.dtype, config.out_dtype), force, config_dir)
    with ExitStack() as stack:
        sources = []
        for inp in config.inputs:
            src = open_source(inp.model, config_dir)
            stack.callback(src.close)
            sources.append(src)
        ref_index = config.base_index if config.base_index is not None else 0
        ref = sources[ref_index]
        plan, vocab = sources_plan(config, sources, config_dir)
        names = check_compatible(sources, ref, vocab)
        specs = [
            TensorSpec(
                n,
                (plan.size, *ref.infos[n][0][1:]) if plan and n in vocab else ref.infos[n][0],
                output_dtype(config, [s.infos[n] for s in sources], ref_index),
            )
            for n in names
        ]
        merged = 0
        with _writer(ref, config, out, specs, force, plan) as writer:
            for n in names:
                tensors = [s.read(n) for s in sources]
                if plan and n in vocab:
                    tensors = aligned(config, plan, tensors)
                merged += all(t.is_floating_point() for t in tensors)
                writer.write(n, merge_tensor(config, n, tensors, seed))
                del tensors
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {
        "method": config.method,
        "models": [i.model for i in config.inputs],
        "base_model": config.base_model,
        "output_format": "slimtorch" if ref.kind in ("builtin", "artifact") else ref.kind,
        "tensors": len(names),
        "tensors_merged": merged,
        "tensors_copied": len(names) - merged,
        "out": str(out),
        "bytes_on_disk": size,
        **({"vocab_size": plan.size, "tokenizer_source": config.tokenizer_source} if plan else {}),
    }
