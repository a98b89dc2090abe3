"""Export a Llama-family model as a GGUF file (llama.cpp, ollama, LM Studio), verified.

    slimtorch export out/smollm2-q4 --to gguf --out smollm2-q4_0.gguf
    slimtorch export out/smollm2-w4 --to gguf --out smollm2.gguf --requantize Q8_0

What is written (the ``gguf`` package's ``GGUFWriter``), as llama.cpp's ``convert_hf_to_gguf.py``
(``LlamaModel``) writes it:

- tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ... ``output_norm``,
  ``output``; the inverse of :mod:`slimtorch.models.gguf`'s maps), the rows of ``attn_q`` /
  ``attn_k`` permuted as llama.cpp's rotary embedding wants them (a row permutation, so
  quantized codes and block scales move with their rows); a tied LM head is written once as
  ``token_embd`` (llama.cpp uses it as the output when ``output.weight`` is absent);
- quantized weights as GGUF blocks holding slimtorch's own codes, never re-rounded
  (:mod:`slimtorch.export.gguf_blocks`: Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0); a grid with no exact
  block type (groups that are not a multiple of 32 columns, 6-8 bit asymmetric grids,
  codebooks, ...) is refused naming the layer, unless ``requantize`` names a GGUF type: its
  dequantized values are then quantized again by ``gguf.quants.quantize`` (reported);
- k-quants: ``requantize`` naming a k-quant mix (``Q4_K_M``, ``Q4_K_S``, ``Q5_K_M``, ``Q5_K_S``,
  or one type for all: ``Q4_K``, ``Q5_K``, ``Q6_K``) encodes every weight without exact codes
  (float weights, and grids with no block type) into the type llama.cpp's mix gives that tensor
  (:mod:`slimtorch.export.gguf_mix`: ``Q6_K`` head, ``Q6_K`` ``attn_v`` / ``ffn_down`` in the
  ``use_more_bits`` layers, llama.cpp's fallback ``Q5_0`` / ``Q5_1`` / ``Q8_0`` for rows that
  256 does not divide) with slimtorch's encoders (:mod:`slimtorch.export.gguf_kquants`),
  rounding weighted by ``imatrix`` (llama-imatrix's file, or per-input importances) when
  given; weights with exact codes keep them (a GPTQ preset's Q5_0 codes, say). An artifact of
  a k-quant preset (``gguf-q4_k_m-gptq``) gets its mix without ``requantize``;
- unquantized 2-D weights as F16 (llama.cpp's ``--outtype f16`` convention; the change is
  reported), norms and other 1-D tensors as F32 (llama.cpp's convention); pruned weights dense;
- metadata: ``general.*``, ``llama.*`` (context and embedding length, block count, feed-forward
  length, heads, KV heads, rope base and dimension, RMS norm epsilon, vocabulary size, linear /
  llama3 rope scaling), ``general.file_type`` (the most common type of the block weights),
  ``general.quantization_version`` and ``tokenizer.ggml.*`` from the model's ``tokenizer.json``
  and ``tokenizer_config.json`` (byte-level BPE ``gpt2`` vocabularies: tokens, types, merges,
  special token ids, ``add_bos_token``, chat template, and the pre-tokenizer name llama.cpp
  uses for the same splitting rule: ``smollm``, ``gpt-2`` or ``llama-bpe``, else ``default``).

Scales: a block stores ``d`` (and ``m``) as fp16. slimtorch's quantizers keep scales fp16-exact
whenever fp16 holds them to 1e-3 (``scale_dtype: float16``), and then ``d`` is exact; otherwise
``d`` is rounded to nearest fp16 and the largest change of a weight is reported
(``scale_rounding_max_abs``). Q4_1 / Q5_1's ``m = -zero_point * d`` needs more bits than fp16
holds and is rounded to nearest: every weight of the block moves by the same amount, at most
half an fp16 step of ``m`` (reported as ``offset_rounding_max_abs``).

Verification, before the file is moved into place (a failing file is never left behind): the
file is read back with ``gguf.GGUFReader`` and every tensor dequantized and compared with the
values intended (bit-exact) and with the model's own weights (the difference reported per
tensor type); when ``llama_cpp`` (llama-cpp-python) is importable, llama.cpp loads the file and
its logits on the example token ids are compared with the model's (top-1 agreement, max / mean
abs difference, mean KL divergence); where weights were quantized again (``requantize``, a
k-quant mix) with a copy of the model computing with the values the file holds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.core.errors import ArtifactError, UnsupportedModelError, UserInputError
from slimtorch.core.info import model_info
from slimtorch.export.gguf_blocks import BLOCK, NotRepresentable, grid_blocks
from slimtorch.export.gguf_mix import MIXES, PRESET_MIXES, KMix, encode_weight, read_imatrix
from slimtorch.formats.atomic import fsync_dir, temp_sibling
from slimtorch.formats.state import get_state
from slimtorch.models.gguf import _GLOBAL, _LAYER, gguf_module

log = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
REQUANTIZE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
INSTALL_LLAMA_CPP = "pip install llama-cpp-python==0.3.36"
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION: the block layouts written here
# llama.cpp must agree with the model on the example ids within these (mean KL divergence,
# top-1 agreement). llama.cpp quantizes the activations of Q4/Q5/Q8 matmuls to 8 bits (F16 ones
# to fp16), so it never matches exactly. Measured on builtin:smollm2-135m, 128 random ids, 1
# thread: our RTN Q4_0 export KLD 0.0082 / top-1 0.84; llama.cpp's own Q4_1 file against its
# exact dequantization 0.0069 / 0.84; our dense F16 export 1.4e-5 / 0.98; the same export with
# the Q/K permutation left out 1.05 / 0.14 (what the check exists to catch).
MAX_KLD = 0.05
MIN_TOP1 = 0.5
_HF_LAYER = {v: k for k, v in _LAYER.items()}
_HF_GLOBAL = {v: k for k, v in _GLOBAL.items()}
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_FILE_TYPES = {
    "F32": "ALL_F32",
    "F16": "MOSTLY_F16",
    "BF16": "MOSTLY_BF16",
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0",
    "Q5_1": "MOSTLY_Q5_1",
    "Q8_0": "MOSTLY_Q8_0",
    "Q4_K": "MOSTLY_Q4_K_S",
    "Q5_K": "MOSTLY_Q5_K_S",
    "Q6_K": "MOSTLY_Q6_K",
    "Q4_K_M": "MOSTLY_Q4_K_M",
    "Q4_K_S": "MOSTLY_Q4_K_S",
    "Q5_K_M": "MOSTLY_Q5_K_M",
    "Q5_K_S": "MOSTLY_Q5_K_S",
    "MXFP4": "MOSTLY_MXFP4_MOE",
}


@dataclass
class Planned:
    """One tensor of the file: its data as written, its GGUF type, the float32 values that
    data decodes to, and the model's own values (both in the file's row order)."""

    name: str
    data: np.ndarray
    ggml_type: str
    values: np.ndarray
    reference: np.ndarray
    how: str  # "codes" (slimtorch's codes, kept) | "f16" | "f32" | "requantized" | "encoded"
    scale_change: float = 0.0
    offset_change: float = 0.0


# --- the model ---------------------------------------------------------------------------


def _get(config: Any, key: str, default: Any = None) -> Any:
    value = getattr(config, key, None)
    return default if value is None else value


def _rope(config: Any) -> tuple[float, dict[str, Any]]:
    """``(rope_theta, rope scaling)`` of a transformers 4 or 5 config."""
    params = dict(_get(config, "rope_parameters", {}) or {})
    scaling = dict(_get(config, "rope_scaling", {}) or {}) or params
    theta = float(_get(config, "rope_theta", params.get("rope_theta", 10000.0)))
    return theta, scaling


def check_model(model: nn.Module) -> Any:
    """The config of a Llama-family causal LM that GGUF's ``llama`` architecture describes;
    :class:`UnsupportedModelError` naming the architecture and what does not fit otherwise."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if name not in ARCHITECTURES or config is None:
        raise UnsupportedModelError(
            f"--to gguf writes Llama-family models ({', '.join(ARCHITECTURES)}); this model is"
            f" a {name}: use --to hf, --to onnx or --to compressed-tensors"
        )
    problems = []
    if _get(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {config.hidden_act!r} (llama.cpp's llama uses silu)")
    if _get(config, "attention_bias", False) or _get(config, "mlp_bias", False):
        problems.append("attention or MLP biases")
    window = _get(config, "sliding_window", None)
    if window is not None and window < _get(config, "max_position_embeddings", 0):
        problems.append(
            f"a sliding attention window of {window} tokens (set sliding_window to null if the"
            " model does not need it)"
        )
    _, scaling = _rope(config)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        problems.append(f"rope scaling {kind!r} (written: none, linear, llama3)")
    if problems:
        raise UnsupportedModelError(
            f"{name} has {'; '.join(problems)}, which GGUF's llama architecture does not"
            " describe; export it with --to hf or --to onnx"
        )
    return config


def gguf_name(hf: str) -> str:
    """llama.cpp's name of the transformers parameter ``hf`` (UnsupportedModelError if none)."""
    owner, _, kind = hf.rpartition(".")
    if owner in _HF_GLOBAL and kind == "weight":
        return f"{_HF_GLOBAL[owner]}.weight"
    match = _HF_BLOCK.fullmatch(hf)
    if match and match.group(2) in _HF_LAYER:
        return f"blk.{match.group(1)}.{_HF_LAYER[match.group(2)]}.{match.group(3)}"
    raise UnsupportedModelError(
        f"parameter {hf!r} has no place in GGUF's llama architecture; export with --to hf"
    )


def permute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of Q/K rows (half-split -> interleaved rotary);
    rows of packed blocks permute the same way as rows of values."""
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _requantize(values: np.ndarray, ggml_type: str) -> tuple[np.ndarray, np.ndarray]:
    """``values`` quantized by ``gguf.quants.quantize`` and what they decode to."""
    gguf = gguf_module()
    qtype = gguf.GGMLQuantizationType[ggml_type]
    data = gguf.quants.quantize(values, qtype)
    decoded = np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)
    return data, decoded.reshape(values.shape)


class _Refused(Exception):
    """A quantized weight with no exact GGUF block type (collected, then reported together)."""


def _plan_weight(
    hf: str,
    owner: str,
    module: nn.Module,
    weight: torch.Tensor,
    requantize: str | None,
    kmix: KMix | None = None,
) -> Planned:
    name = gguf_name(hf)
    reference = weight.detach().to(torch.float32).cpu().numpy()
    state = get_state(module, "weight")
    if state is not None and state.quant is not None:
        try:
            blocks = grid_blocks(state.quant, state.mask, tuple(weight.shape))
        except NotRepresentable as exc:
            q = state.quant
            if kmix is not None:  # a k-quant mix: the grid's values, encoded by the mix
                ggml_type, data, decoded = encode_weight(name, reference, kmix)
                return Planned(name, data, ggml_type, decoded, reference, "requantized")
            if requantize is None:
                group = f" {q.group_size}" if q.granularity == "per_group" else ""
                raise _Refused(
                    f"{owner} ({type(module).__name__}, {q.bits}-bit {q.scheme}"
                    f" {q.granularity.replace('_', '-')}{group}): {exc}"
                ) from None
            if requantize not in ("F32", "F16", "BF16") and weight.shape[-1] % BLOCK:
                raise UnsupportedModelError(
                    f"{owner} has {weight.shape[-1]} input features, not a multiple of 32: it"
                    f" cannot be requantized to {requantize}; use --requantize F16"
                ) from None
            data, decoded = _requantize(reference, requantize)
            return Planned(name, data, requantize, decoded, reference, "requantized")
        return Planned(
            name,
            blocks.data,
            blocks.ggml_type,
            blocks.values,
            reference,
            "codes",
            blocks.scale_change,
            blocks.offset_change,
        )
    if weight.dim() >= 2 and kmix is not None:  # a float weight, encoded by the mix
        ggml_type, data, decoded = encode_weight(name, reference, kmix)
        return Planned(name, data, ggml_type, decoded, reference, "encoded")
    if weight.dim() >= 2:
        half = reference.astype(np.float16)
        return Planned(name, half, "F16", half.astype(np.float32), reference, "f16")
    return Planned(name, reference.copy(), "F32", reference.copy(), reference, "f32")


def _kmix(model: nn.Module, config: Any, mix: str, importance: dict[str, Any] | None) -> KMix:
    embed = model.get_input_embeddings()  # type: ignore[operator]
    head = model.get_output_embeddings()  # type: ignore[operator]
    tied = head is None or head.weight is embed.weight
    name = "token_embd.weight" if tied else "output.weight"
    return KMix(mix, int(config.num_hidden_layers), name, dict(importance or {}))


def plan_tensors(
    model: nn.Module,
    config: Any,
    requantize: str | None,
    importance: dict[str, Any] | None = None,
) -> list[Planned]:
    """Every tensor of the GGUF file, in llama.cpp's order and layout; ``requantize`` a k-quant
    mix (:data:`MIXES`): every weight without exact codes encoded by the mix, rounding weighted
    by ``importance`` (per-input, by GGUF name: :func:`read_imatrix`)."""
    kmix = _kmix(model, config, requantize, importance) if requantize in MIXES else None
    heads = int(config.num_attention_heads)
    kv = int(_get(config, "num_key_value_heads", heads))
    modules = dict(model.named_modules())
    embed = model.get_input_embeddings()  # type: ignore[operator]
    planned: list[Planned] = []
    seen: set[int] = set()
    refused: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}
    for hf, param in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = hf.rpartition(".")
        module = modules[owner]
        if param.data_ptr() in seen and param.numel():  # the tied LM head: token_embd only
            continue
        seen.add(param.data_ptr())
        if leaf == "weight" and module is embed and get_state(module, "weight") is None:
            head = model.get_output_embeddings()  # type: ignore[operator]
            if head is not None and head.weight is param and get_state(head, "weight"):
                module = head  # a tied pair whose state the LM head holds
        try:
            item = _plan_weight(hf, names[id(module)], module, param, requantize, kmix)
        except _Refused as exc:
            refused.append(str(exc))
            continue
        if ".self_attn.q_proj." in hf or ".self_attn.k_proj." in hf:
            n = heads if ".q_proj." in hf else kv
            item.data = permute_rows(item.data, n)
            item.values = permute_rows(item.values, n)
            item.reference = permute_rows(item.reference, n)
        planned.append(item)
    if refused:
        more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
        raise UnsupportedModelError(
            f"{len(refused)} quantized weights have no exact GGUF block type: "
            + "; ".join(refused[:3])
            + f"{more}. GGUF stores groups of 32 columns (or whole rows / multiples of 32) at"
            " 2-5 bits (Q4_0, Q4_1, Q5_0, Q5_1) and symmetric 6-8 bits (Q8_0). Re-compress with"
            " a GGUF preset (gguf-q4_0-gptq, gguf-q4_1-gptq, gguf-q8_0-rtn), or pass"
            " --requantize TYPE (Q8_0, Q5_1, Q4_0, F16, ...) to quantize their values again"
        )
    return planned


# --- metadata ------------------------------------------------------------------------------

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def _looks_special(token: str) -> bool:
    """llama.cpp's ``does_token_look_special``: added tokens marked non-special that are."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a ``tokenizer.json`` pre-tokenizer: the name of
    the rule that splits the same way (``smollm``: digits one by one then GPT-2's byte-level
    regex; ``gpt-2``; ``llama-bpe``: Llama 3's regex), else ``default``."""
    if not pre:
        return "default"
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or byte_level.get("add_prefix_space"):
        return "default"
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and byte_level.get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        from slimtorch.models.gguf_tokenizer import LLAMA3_REGEX

        if steps[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX:
            return "llama-bpe"
    return "default"


def find_tokenizer(model: nn.Module, given: str | Path | None = None) -> Path | None:
    """``tokenizer.json`` of the model: ``given``, the one its info records, or the one in the
    directory it was loaded from; None if there is none."""
    from slimtorch.calibrate.text import tokenizer_file

    spec = str(given) if given else model_info(model).tokenizer
    if spec:
        return tokenizer_file(spec)
    where = getattr(getattr(model, "config", None), "_name_or_path", None)
    path = Path(str(where)) / "tokenizer.json" if where else None
    return path if path is not None and path.is_file() else None


def _token_id(entry: Any, ids: dict[str, int]) -> int | None:
    content = entry.get("content") if isinstance(entry, dict) else entry
    return ids.get(content) if isinstance(content, str) else None


def tokenizer_metadata(path: Path, vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` values of a byte-level BPE ``tokenizer.json`` (and the
    ``tokenizer_config.json`` beside it), as llama.cpp's ``_set_vocab_gpt2`` and
    ``SpecialVocab`` write them: ids the vocabulary lacks up to ``vocab_size`` become
    ``[PAD<i>]`` tokens of type UNUSED."""
    import json

    spec = json.loads(path.read_text(encoding="utf-8"))
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise UnsupportedModelError(
            f"{path} is not a byte-level BPE tokenizer (model {bpe.get('type')!r}); --to gguf"
            " writes GPT-2-style BPE vocabularies (llama.cpp's gpt2 tokenizer model) only"
        )
    ids: dict[str, int] = dict(bpe.get("vocab") or {})
    added = {a["content"]: a for a in spec.get("added_tokens") or []}
    for content, a in added.items():
        ids[content] = int(a["id"])
    if ids and max(ids.values()) >= vocab_size:
        raise UnsupportedModelError(
            f"{path} has token id {max(ids.values())}, beyond the model's {vocab_size}-token"
            " vocabulary: it is not this model's tokenizer"
        )
    by_id = {i: t for t, i in ids.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif token in added:
            special = bool(added[token].get("special")) or _looks_special(token)
            tokens.append(token)
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges") or []]
    meta: dict[str, Any] = {
        "model": "gpt2",
        "pre": pre_tokenizer_name(spec.get("pre_tokenizer")),
        "tokens": tokens,
        "token_type": types,
        "merges": merges,
    }
    config_file = path.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        found = _token_id(config.get(f"{role}_token"), ids)
        if found is not None:
            meta[f"{key}_token_id"] = found
    if "add_bos_token" in config:
        meta["add_bos_token"] = bool(config["add_bos_token"])
    if "add_eos_token" in config:
        meta["add_eos_token"] = bool(config["add_eos_token"])
    if "add_prefix_space" in config:
        meta["add_space_prefix"] = bool(config["add_prefix_space"])
    template = config.get("chat_template")
    jinja = path.parent / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, str) and template:
        meta["chat_template"] = template
    if vocab_size == 49152:  # llama.cpp's LlamaModel.set_vocab does this for 49,152-token vocabs
        meta["add_bos_token"] = False
    return meta


def _file_type(planned: list[Planned]) -> str:
    counts = Counter(p.ggml_type for p in planned if p.name.startswith("blk.") and p.data.ndim == 2)
    return counts.most_common(1)[0][0] if counts else "F32"


def _write_metadata(
    writer: Any,
    config: Any,
    name: str,
    planned: list[Planned],
    tok: dict[str, Any] | None,
    mix: str | None = None,
) -> str:
    gguf = gguf_module()
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = int(_get(config, "head_dim", hidden // heads))
    theta, scaling = _rope(config)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(_get(config, "num_key_value_heads", heads)))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    file_type = mix or _file_type(planned)
    writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[file_type]]))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(head_dim)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if tok is not None:
        writer.add_tokenizer_model(tok["model"])
        writer.add_tokenizer_pre(tok["pre"])
        writer.add_token_list(tok["tokens"])
        writer.add_token_types(tok["token_type"])
        if tok["merges"]:
            writer.add_token_merges(tok["merges"])
        for key, add in (
            ("bos_token_id", writer.add_bos_token_id),
            ("eos_token_id", writer.add_eos_token_id),
            ("unknown_token_id", writer.add_unk_token_id),
            ("padding_token_id", writer.add_pad_token_id),
            ("add_bos_token", writer.add_add_bos_token),
            ("add_eos_token", writer.add_add_eos_token),
            ("add_space_prefix", writer.add_add_space_prefix),
            ("chat_template", writer.add_chat_template),
        ):
            if key in tok:
                add(tok[key])
    writer.add_quantization_version(QUANTIZATION_VERSION)
    return file_type


def _llama3_factors(config: Any, scaling: dict[str, Any]) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` tensor for a ``llama3`` rope scaling (its converter's loop)."""
    import math

    theta, _ = _rope(config)
    heads = int(config.num_attention_heads)
    dim = int(_get(config, "head_dim", int(config.hidden_size) // heads))
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(scaling.get("factor", 8.0))
    low, high = (
        float(scaling.get("low_freq_factor", 1.0)),
        float(scaling.get("high_freq_factor", 4.0)),
    )
    orig = float(scaling.get("original_max_position_embeddings", 8192))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# --- writing and checking ------------------------------------------------------------------


def _write(
    path: Path,
    model: nn.Module,
    config: Any,
    planned: list[Planned],
    tok: Any,
    mix: str | None = None,
) -> str:
    gguf = gguf_module()
    writer = gguf.GGUFWriter(str(path), "llama")
    try:
        name = str(model_info(model).source or type(model).__name__)
        file_type = _write_metadata(writer, config, name, planned, tok, mix)
        _, scaling = _rope(config)
        if scaling.get("rope_type", scaling.get("type")) == "llama3":
            factors = _llama3_factors(config, scaling)
            planned.append(Planned("rope_freqs.weight", factors, "F32", factors, factors, "f32"))
        for p in planned:
            raw = None if p.ggml_type in ("F32", "F16") else gguf.GGMLQuantizationType[p.ggml_type]
            writer.add_tensor(p.name, p.data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        raise
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return file_type


def verify_file(path: Path, planned: list[Planned]) -> dict[str, Any]:
    """Read ``path`` back with ``gguf.GGUFReader``: every tensor must decode to exactly the
    values intended; returns the largest difference from the model's weights per GGUF type."""
    gguf = gguf_module()
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    if (
        set(tensors) != {p.name for p in planned}
        or reader.fields["general.architecture"].contents() != "llama"
    ):
        raise UnsupportedModelError(f"{path} does not hold the tensors written; report this bug")
    diff: dict[str, float] = {}
    for p in planned:
        t = tensors[p.name]
        if t.tensor_type.name != p.ggml_type:
            raise UnsupportedModelError(
                f"{p.name} reads back as {t.tensor_type.name}, not {p.ggml_type}"
            )
        got = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        got = got.reshape(p.values.shape)
        if not np.array_equal(got, p.values):
            raise UnsupportedModelError(
                f"{p.name} ({p.ggml_type}) decodes to other values than written (up to"
                f" {float(np.abs(got - p.values).max()):.3g}); report this bug"
            )
        key = f"{p.ggml_type} ({p.how})"
        change = float(np.abs(got - p.reference).max()) if got.size else 0.0
        diff[key] = max(diff.get(key, 0.0), change)
    return diff


def llama_cpp_check(path: Path, model: nn.Module, ids: Sequence[int]) -> dict[str, Any]:
    """Load ``path`` in llama.cpp (llama-cpp-python) and compare its logits on ``ids`` with
    ``model``'s: top-1 agreement, max / mean abs difference, mean KL divergence (model || llama.cpp)."""
    from llama_cpp import Llama

    ids = [int(i) for i in ids]
    llm = Llama(
        model_path=str(path),
        logits_all=True,
        n_ctx=max(len(ids), 32),
        n_batch=max(len(ids), 32),
        n_threads=1,
        verbose=False,
    )
    try:
        llm.eval(ids)
        got = torch.tensor(np.asarray(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        close = getattr(llm, "close", None)
        if callable(close):
            close()
    with torch.inference_mode():
        want = model.eval()(torch.tensor([ids]), use_cache=False).logits[0].to(torch.float32)
    logp, logq = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
    kld = (logp.exp() * (logp - logq)).sum(-1)
    return {
        "tokens": len(ids),
        "top1_agreement": float((want.argmax(-1) == got.argmax(-1)).float().mean()),
        "max_abs_logit_diff": float((want - got).abs().max()),
        "mean_abs_logit_diff": float((want - got).abs().mean()),
        "kld_mean": float(kld.mean()),
        "kld_max": float(kld.max()),
        "logit_scale": float(want.abs().max()),
    }


def _example_ids(inputs: Sequence[Any]) -> list[int]:
    first = inputs[0] if inputs else None
    if not isinstance(first, torch.Tensor) or first.dtype not in (torch.int64, torch.int32):
        raise UserInputError("--to gguf checks the file on token ids: give inputs=(ids,)")
    return [int(i) for i in first.reshape(-1, first.shape[-1])[0].tolist()]


def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory; give the path of the .gguf file to write")
    if os.path.lexists(path) and not overwrite:
        raise ArtifactError(f"{path} exists; pass --force / overwrite=True to replace it")


def export_gguf(
    model: nn.Module,
    inputs: Sequence[Any],
    out: str | Path,
    overwrite: bool = False,
    requantize: str | None = None,
    tokenizer: str | Path | None = None,
    imatrix: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``model`` (a Llama-family causal LM) as the GGUF file ``out``, check it (see the
    module docstring) and move it into place; returns a JSON-able report. ``requantize`` may
    name a k-quant mix (``Q4_K_M``, ``Q4_K_S``, ``Q5_K_M``, ``Q5_K_S``, ``Q4_K``, ``Q5_K``,
    ``Q6_K``: :mod:`slimtorch.export.gguf_mix`), ``imatrix`` the importance file that weights
    its rounding (llama-imatrix's ``.gguf``, or ``.safetensors`` of per-input importances)."""
    gguf = gguf_module()
    recipe = model_info(model).recipe_name or ""
    if requantize is None and recipe in PRESET_MIXES:  # a k-quant preset: its mix
        requantize = PRESET_MIXES[recipe]
    if requantize is not None:
        requantize = requantize.upper()
        if requantize not in REQUANTIZE_TYPES + MIXES:
            raise UserInputError(
                f"--requantize {requantize!r} is not a type the gguf package quantizes to nor a"
                f" k-quant mix; use one of {', '.join(REQUANTIZE_TYPES + MIXES)}"
            )
    if imatrix is not None and requantize not in MIXES:
        raise UserInputError(
            "--imatrix weights the rounding of a k-quant mix: give --requantize with one of"
            f" {', '.join(MIXES)} too"
        )
    importance = read_imatrix(imatrix) if imatrix is not None else None
    config = check_model(model)
    path = Path(out)
    _check_target(path, overwrite)
    ids = _example_ids(inputs)
    tok_path = find_tokenizer(model, tokenizer)
    if tok_path is None:
        raise UserInputError(
            f"--to gguf writes the tokenizer into the file, and {type(model).__name__} has none:"
            " compress it with --tokenizer PATH (its tokenizer.json), or load it from a"
            " directory that holds tokenizer.json"
        )
    tok = tokenizer_metadata(tok_path, int(config.vocab_size))
    planned = plan_tensors(model, config, requantize, importance)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        mix = requantize if requantize in MIXES else None
        file_type = _write(tmp, model, config, planned, tok, mix)
        diff = verify_file(tmp, planned)
        runtime: dict[str, Any] | str
        if importlib.util.find_spec("llama_cpp") is None:
            runtime = f"not installed ({INSTALL_LLAMA_CPP})"
        else:
            runtime = llama_cpp_check(tmp, _as_written(model, config, planned), ids)
            if runtime["top1_agreement"] < MIN_TOP1 or runtime["kld_mean"] > MAX_KLD:
                raise UnsupportedModelError(
                    f"llama.cpp computes other logits from the GGUF file than slimtorch's model"
                    f" (top-1 agreement {runtime['top1_agreement']:.3f}, mean KLD"
                    f" {runtime['kld_mean']:.3g}); keep the slimtorch artifact and report this"
                )
        _check_target(path, overwrite)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    types = Counter(p.ggml_type for p in planned)
    how = Counter(p.how for p in planned)
    report: dict[str, Any] = {
        "format": "gguf",
        "out": str(path),
        "class": type(model).__name__,
        "bytes": path.stat().st_size,
        "file_type": file_type,
        "tensors": dict(sorted(types.items())),
        "codes_kept": how.get("codes", 0),
        "f16": how.get("f16", 0),
        "f32": how.get("f32", 0),
        "requantized": [p.name for p in planned if p.how == "requantized"],
        "requantize": requantize,
        "encoded": how.get("encoded", 0),
        "imatrix": None if imatrix is None else str(imatrix),
        "fallback": _fallbacks(planned, requantize),
        "scale_rounding_max_abs": max((p.scale_change for p in planned), default=0.0),
        "offset_rounding_max_abs": max((p.offset_change for p in planned), default=0.0),
        "max_abs_diff_by_type": diff,
        "tokenizer": {"path": str(tok_path), "pre": tok["pre"], "tokens": len(tok["tokens"])},
        "verified": "gguf reader" + ("" if isinstance(runtime, str) else " + llama.cpp"),
        "llama_cpp": runtime,
        "gguf_version": getattr(gguf, "__version__", None) or _gguf_version(),
    }
    log.info("exported %s to %s (%s)", type(model).__name__, path, file_type)
    return report


def _as_written(model: nn.Module, config: Any, planned: list[Planned]) -> nn.Module:
    """``model``, or a copy computing with the values the file holds where weights were
    quantized again (``requantized`` / ``encoded``): what llama.cpp's logits should match."""
    changed = {p.name: p for p in planned if p.how in ("requantized", "encoded")}
    if not changed:
        return model
    import copy

    from slimtorch.models.gguf import unpermute

    heads = int(config.num_attention_heads)
    kv = int(_get(config, "num_key_value_heads", heads))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for hf, param in twin.named_parameters(remove_duplicate=False):
            p = changed.get(gguf_name(hf))
            if p is None:
                continue
            values = torch.from_numpy(np.ascontiguousarray(p.values))
            if ".self_attn.q_proj." in hf or ".self_attn.k_proj." in hf:
                values = unpermute(values, heads if ".q_proj." in hf else kv)
            param.copy_(values.reshape(param.shape).to(param.dtype))
    return twin


def _fallbacks(planned: list[Planned], mix: str | None) -> dict[str, int]:
    """How many weights of a k-quant mix took llama.cpp's fallback type (rows not a multiple
    of 256), by ``"wanted->written"``."""
    if mix not in MIXES:
        return {}
    from slimtorch.export.gguf_mix import mix_type

    out: Counter[str] = Counter()
    layers = max((int(p.name.split(".")[1]) + 1 for p in planned if p.name.startswith("blk.")),
                 default=0)  # fmt: skip
    head = (
        "output.weight" if any(p.name == "output.weight" for p in planned) else "token_embd.weight"
    )
    for p in planned:
        if p.how in ("encoded", "requantized") and p.data.ndim == 2:
            wanted = mix_type(mix, p.name, layers, p.name == head)
            if wanted != p.ggml_type:
                out[f"{wanted}->{p.ggml_type}"] += 1
    return dict(sorted(out.items()))


def _gguf_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:  # pragma: no cover
        return None
