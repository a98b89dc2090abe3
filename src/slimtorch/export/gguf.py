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
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from slimtorch.core.errors import ArtifactError, UnsupportedModelError, UserInputError
from slimtorch.core.info import model_info
from slimtorch.export.checks import refuse_runtime_modules
from slimtorch.export.gguf_mix import MIXES, PRESET_MIXES, read_imatrix
from slimtorch.export.gguf_plan import (  # noqa: F401 (re-exported)
    _FILE_TYPES,
    Planned,
    _get,
    _rope,
    gguf_name,
    permute_rows,
    plan_tensors,
)
from slimtorch.export.gguf_verify import (
    _as_written,
    _example_ids,
    _fallbacks,
    llama_cpp_check,
    verify_file,
)
from slimtorch.export.gguf_vocab import (  # noqa: F401 (re-exported)
    find_tokenizer,
    pre_tokenizer_name,
    tokenizer_metadata,
)
from slimtorch.export.gguf_write import QUANTIZATION_VERSION, _write  # noqa: F401
from slimtorch.formats.atomic import fsync_dir, temp_sibling
from slimtorch.models.gguf import gguf_module

log = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
REQUANTIZE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
INSTALL_LLAMA_CPP = "pip install llama-cpp-python==0.3.36"
# llama.cpp must agree with the model on the example ids within these (mean KL divergence,
# top-1 agreement). llama.cpp quantizes the activations of Q4/Q5/Q8 matmuls to 8 bits (F16 ones
# to fp16), so it never matches exactly. Measured on builtin:smollm2-135m, 128 random ids, 1
# thread: our RTN Q4_0 export KLD 0.0082 / top-1 0.84; llama.cpp's own Q4_1 file against its
# exact dequantization 0.0069 / 0.84; our dense F16 export 1.4e-5 / 0.98; the same export with
# the Q/K permutation left out 1.05 / 0.14 (what the check exists to catch).
MAX_KLD = 0.05
MIN_TOP1 = 0.5


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
    refuse_runtime_modules(model)
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


def _gguf_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:  # pragma: no cover
        return None
