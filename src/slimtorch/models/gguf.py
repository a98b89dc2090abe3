"""Llama-family GGUF files (llama.cpp's format) as transformers models; never touches the network.

:func:`load_gguf` reads a GGUF file with the ``gguf`` package, dequantizes every tensor to fp32,
maps llama.cpp's names back to ``LlamaForCausalLM``'s (undoing the Q/K row permutation of
llama.cpp's converter), rebuilds the tokenizer (``tokenizer.json``) from the ``tokenizer.ggml.*``
metadata, and writes the lot as a plain Hugging Face directory in a cache
(``$SLIMTORCH_CACHE``, default ``~/.cache/slimtorch``, under ``gguf/``). The model then loads
from that directory through :func:`slimtorch.models.hf.load_directory`, so its architecture spec
is ``{"kind": "hf", ...}``: a saved artifact reloads without the GGUF file. The cache key hashes
the file's size, mtime and first and last MiB; the directory is written atomically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtorch.core.errors import UserInputError
from slimtorch.formats.atomic import fsync_dir, fsync_tree
from slimtorch.models import hf
from slimtorch.models.gguf_tokenizer import write_tokenizer_files
from slimtorch.models.registry import LoadedModel

log = logging.getLogger(__name__)

SUPPORTED = ("llama",)  # general.architecture values read here (Llama, Mistral, SmolLM, ...)
CONVERTER_VERSION = "1"  # part of the cache key: bump when the conversion changes
HASH_BYTES = 1 << 20
_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def gguf_module() -> Any:
    """The ``gguf`` package (UserInputError with the install line when missing)."""
    try:
        import gguf
    except ImportError:
        raise UserInputError(
            "GGUF files need the gguf package: `pip install 'slimtorch[hf]'`"
        ) from None
    return gguf


def cache_root() -> Path:
    """``$SLIMTORCH_CACHE`` or ``~/.cache/slimtorch``."""
    env = os.environ.get("SLIMTORCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slimtorch"


def open_reader(path: str | Path) -> Any:
    """A ``gguf.GGUFReader`` on ``path`` (a clear error when it is not a readable GGUF file)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"no GGUF file at {path}; give the path of a .gguf file")
    try:
        return gguf_module().GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as exc:
        raise UserInputError(f"{path} is not a readable GGUF file ({exc})") from None


def metadata(reader: Any) -> dict[str, Any]:
    """Every scalar and string-array metadata value of ``reader`` (large arrays included)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except (ValueError, IndexError, TypeError):  # pragma: no cover - exotic value types
            continue
    return out


def _architecture_name(meta: dict[str, Any], path: Path) -> str:
    arch = str(meta.get("general.architecture", "?"))
    if arch not in SUPPORTED:
        raise UserInputError(
            f"{path} holds a GGUF model of architecture {arch!r}; slimtorch reads Llama-family"
            f" GGUF files (general.architecture {' or '.join(map(repr, SUPPORTED))}: Llama,"
            " Mistral, SmolLM, TinyLlama, ...). For other models give their Hugging Face"
            " directory (--model DIR)"
        )
    if int(meta.get(f"{arch}.expert_count", 0) or 0) > 0:
        raise UserInputError(
            f"{path} is a mixture-of-experts {arch!r} GGUF model, which slimtorch does not read;"
            " give its Hugging Face directory (--model DIR)"
        )
    return arch


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(f"{float(value):.7g}")


def llama_config(meta: dict[str, Any], tensor_names: set[str], path: Path) -> dict[str, Any]:
    """``LlamaConfig`` fields from the ``llama.*`` / ``tokenizer.ggml.*`` metadata."""
    a = _architecture_name(meta, path) + "."

    def need(key: str) -> Any:
        if a + key not in meta:
            raise UserInputError(f"{path} lacks the GGUF metadata key {a + key!r}; re-convert it")
        return meta[a + key]

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(a + "vocab_size") or (len(tokens) if tokens is not None else None)
    head_dim = int(
        meta.get(a + "attention.key_length") or meta.get(a + "rope.dimension_count") or 0
    )
    fields: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab or 32000),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(a + "attention.head_count_kv") or heads),
        "max_position_embeddings": int(meta.get(a + "context_length") or 2048),
        "rms_norm_eps": _f32(meta.get(a + "attention.layer_norm_rms_epsilon") or 1e-5),
        "rope_theta": _f32(meta.get(a + "rope.freq_base") or 10000.0),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if head_dim and head_dim != hidden // heads:
        fields["head_dim"] = head_dim
    scaling = str(meta.get(a + "rope.scaling.type", "none"))
    factor = float(meta.get(a + "rope.scaling.factor") or 1.0)
    if scaling == "linear" and factor != 1.0:
        fields["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif scaling == "yarn":
        orig = int(meta.get(a + "rope.scaling.original_context_length") or 0)
        fields["rope_scaling"] = {"rope_type": "yarn", "factor": factor}
        if orig:
            fields["rope_scaling"]["original_max_position_embeddings"] = orig
    elif scaling not in ("none", "linear"):
        raise UserInputError(
            f"{path}: rope scaling {scaling!r} is not supported (none, linear, yarn)"
        )
    return fields


def llama3_rope(factors: np.ndarray, theta: float, head_dim: int, path: Path) -> dict[str, Any]:
    """The ``llama3`` rope scaling that llama.cpp baked into ``rope_freqs`` (Llama 3.1/3.2):
    its converter's formula, with the factor read off and Meta's published constants
    (low 1, high 4, original context 8192) checked against every value."""
    factor, low, high, orig = float(factors.max()), 1.0, 4.0, 8192
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (orig / wavelen - low) / (high - low)
    want = np.where(
        wavelen < orig / high,
        1.0,
        np.where(wavelen > orig / low, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    if want.shape != factors.shape or not np.allclose(want, factors, rtol=1e-4, atol=0):
        raise UserInputError(
            f"{path} carries llama.cpp's per-frequency rope factors (rope_freqs) that are not"
            " Llama 3's rope scaling; give the model's Hugging Face directory (--model DIR)"
        )
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig,
    }


def read_config(reader: Any, path: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """``LlamaConfig`` fields of the GGUF file open in ``reader`` (no weights dequantized)."""
    tensors = {t.name: t for t in reader.tensors}
    fields = llama_config(metadata(reader) if meta is None else meta, set(tensors), path)
    if "rope_freqs.weight" in tensors:
        factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64).reshape(-1)
        head_dim = fields.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]
        fields["rope_scaling"] = llama3_rope(factors, fields["rope_theta"], head_dim, path)
    return fields


def unpermute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``LlamaModel.permute`` of Q/K rows (interleaved -> half-split rotary)."""
    shape = weight.shape
    return (
        weight.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def hf_name(name: str) -> str:
    """The transformers name of the llama.cpp tensor ``name`` (UserInputError if unknown)."""
    stem, _, kind = name.rpartition(".")
    if stem in _GLOBAL and kind == "weight":
        return f"{_GLOBAL[stem]}.weight"
    match = _BLOCK.fullmatch(name)
    if match and match.group(2) in _LAYER:
        return f"model.layers.{match.group(1)}.{_LAYER[match.group(2)]}.{match.group(3)}"
    raise UserInputError(
        f"GGUF tensor {name!r} has no place in a LlamaForCausalLM; this file is not a plain"
        " Llama-family model"
    )


def read_state_dict(reader: Any, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 under its transformers name (Q/K un-permuted)."""
    dequantize = gguf_module().quants.dequantize
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":  # rope scaling, in the config (read_config)
            continue
        name = hf_name(tensor.name)
        shape = [int(d) for d in reversed(tensor.shape.tolist())]  # GGUF lists ne0 first
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        value = torch.from_numpy(array.reshape(shape).copy())
        if ".self_attn.q_proj." in name:
            value = unpermute(value, heads)
        elif ".self_attn.k_proj." in name:
            value = unpermute(value, kv)
        state[name] = value
    return state


def _check_keys(state: dict[str, torch.Tensor], config: Any, path: Path) -> None:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        expected = LlamaForCausalLM(config).state_dict()
    want = {k for k in expected if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing, extra = sorted(want - set(state)), sorted(set(state) - want)
    bad = [k for k in want & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or extra or bad:
        raise UserInputError(
            f"{path} does not hold a complete Llama model for its own metadata (missing"
            f" {missing[:4]}, unexpected {extra[:4]}, wrong shapes {bad[:4]})"
        )


def cache_key(path: Path) -> str:
    """Hash of the file's size, mtime and first/last MiB, and of this converter's version."""
    stat = path.stat()
    digest = hashlib.sha256(f"{CONVERTER_VERSION}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(HASH_BYTES))
        f.seek(max(0, stat.st_size - HASH_BYTES))
        digest.update(f.read(HASH_BYTES))
    return digest.hexdigest()[:20]


def convert(path: str | Path, out: str | Path) -> None:
    """Write the GGUF file ``path`` as a Hugging Face directory ``out`` (fp32 safetensors,
    ``config.json``, ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    path, out = Path(path), Path(out)
    reader = open_reader(path)
    meta = metadata(reader)
    fields = read_config(reader, path, meta)
    config = LlamaConfig(**fields)
    state = read_state_dict(reader, fields)
    _check_keys(state, config, path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    write_tokenizer_files(meta, out, path)


def cached_directory(path: str | Path) -> Path:
    """The cached Hugging Face directory of the GGUF file ``path`` (converted on a miss)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise UserInputError(f"no GGUF file at {path}; give the path of a .gguf file")
    cached = _cached(path)
    if cached is not None:
        return cached
    root = cache_root() / "gguf"
    final = root / f"{path.stem}-{cache_key(path)}"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(
            f"cannot create the GGUF cache {root} ({exc}); point SLIMTORCH_CACHE at a writable"
            " directory"
        ) from None
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        log.info("converting %s to a Hugging Face directory in %s (once)", path, final)
        convert(path, tmp)
        fsync_tree(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not another process that won the race
                raise
        fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _cached(path: Path) -> Path | None:
    """The cached directory of ``path`` if it was converted already."""
    found = cache_root() / "gguf" / f"{path.stem}-{cache_key(path)}"
    return found if (found / "config.json").is_file() else None


def architecture(path: str | Path) -> dict[str, Any]:
    """The ``{"kind": "hf", ...}`` spec of the GGUF file's model, without reading its tensors
    (from the cached directory's config.json, else from the GGUF metadata)."""
    from transformers import LlamaConfig

    path = Path(path).resolve()
    if not path.is_file():
        raise UserInputError(f"no GGUF file at {path}; give the path of a .gguf file")
    cached = _cached(path)
    if cached is not None:
        return hf.read_architecture(cached)
    fields = read_config(open_reader(path), path)
    return hf.spec("LlamaForCausalLM", LlamaConfig(**fields).to_dict(), "sdpa", "float32")


def load_gguf(path: str | Path) -> LoadedModel:
    """Load a Llama-family GGUF file as an fp32 ``LlamaForCausalLM`` (through the cache)."""
    loaded = hf.load_directory(cached_directory(path))
    loaded.source = str(path)
    return loaded


def tokenizer_path(path: str | Path) -> Path:
    """``tokenizer.json`` rebuilt from the GGUF file's metadata (in its cached directory)."""
    file = cached_directory(path) / "tokenizer.json"
    if not file.is_file():
        raise UserInputError(
            f"{path} has no tokenizer slimtorch can rebuild (see the log); give one with"
            " --tokenizer tokenizer.json"
        )
    return file
