"""slimtorch's own k-quant GGUF files against llama.cpp's Q4_K_M (+ imatrix) on
builtin:smollm2-135m: the same calibration windows, the same scorer, the same llama.cpp.

    .venv-bench/bin/python bench/bench_kquants.py [--rows KEY ...] [--samples 64] --work DIR

Rows (each in its own process, as bench_llm_real.py's):

- ``ours-q4_k_m``: the base's float weights written by ``export_gguf(requantize="Q4_K_M")``
  (llama.cpp's tensor-type mix and fallbacks, slimtorch's k-quant / Q5_0 / Q8_0 encoders, no
  importance: llama.cpp's default rounding weights);
- ``ours-q4_k_m-imatrix``: the same with llama.cpp's own imatrix file (``llama-imatrix`` on the
  calibration windows, as bench_llm_real.py's ``llama-q4_k_m-imatrix`` row uses);
- ``ours-q4_k_m-own``: the same with the importance from slimtorch's calibration (mean squared
  input of every Linear over the calibration windows, forward hooks), as a safetensors file;
- ``gptq-q4_k_m``: preset ``gguf-q4_k_m-gptq`` (GPTQ onto the exact Q5_0 grid where the mix
  falls back to Q5_0, 8-bit round-to-nearest where it gives Q8_0; ``--gptq-windows`` of the
  calibration rows), then the export writes those codes unchanged and encodes ``ffn_down`` as
  Q4_K / Q6_K with llama.cpp's imatrix;
- ``llama-q4_k_m`` / ``llama-q4_k_m-imatrix``: bench_llm_real.py's rows, re-run here.

Every file is scored twice as in bench_llm_real.py: dequantized by the ``gguf`` package into
PyTorch, and in llama.cpp itself (KLD against the base, perplexity, tokens/s); ``--llama-only``
skips the PyTorch scoring (on a loaded machine). Results: --out
(default bench/results/kquants.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import bench_llm_real as blr
import harness

RESULTS = harness.result_path("kquants.json")
ROWS: dict[str, tuple[str, str | None, str | None]] = {  # key: (label, importance, recipe)
    "ours-q4_k_m": ("slimtorch Q4_K_M mix, no imatrix", None, None),
    "ours-q4_k_m-imatrix": ("slimtorch Q4_K_M mix + llama.cpp's imatrix", "llama", None),
    "ours-q4_k_m-own": ("slimtorch Q4_K_M mix + slimtorch importance", "own", None),
    "gptq-q4_k_m": ("gguf-q4_k_m-gptq + llama.cpp's imatrix", "llama", "gguf-q4_k_m-gptq"),
    "llama-q4_k_m": ("llama.cpp Q4_K_M", None, None),
    "llama-q4_k_m-imatrix": ("llama.cpp Q4_K_M + imatrix", None, None),
}


def own_importance(args: argparse.Namespace, calib: Any) -> Path:
    """Mean squared input of every Linear of the base over the calibration windows, by GGUF
    tensor name, as safetensors (computed once)."""
    out = args.work / "importance.safetensors"
    if out.exists():
        return out
    import torch
    from safetensors.torch import save_file

    from slimtorch.export.gguf import gguf_name

    model = blr.load_base().model.eval()
    sums: dict[str, torch.Tensor] = {}
    count = [0]

    def hook(name: str) -> Any:
        def record(_m: Any, inputs: tuple[torch.Tensor, ...], _o: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + (x * x).sum(0)

        return record

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            key = "token_embd.weight" if name == "lm_head" else gguf_name(f"{name}.weight")
            handles.append(module.register_forward_hook(hook(key)))
    with torch.inference_mode():
        for row in calib:
            model(row[None], use_cache=False)
            count[0] += row.numel()
    for h in handles:
        h.remove()
    save_file({k: (v / count[0]).to(torch.float32) for k, v in sums.items()}, str(out))
    return out


def run_row(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    calib = load_file(str(args.work / "calib.safetensors"))["input_ids"]
    label, importance, recipe = ROWS[args.row]
    if args.row.startswith("llama-"):
        figures = blr.run_llama(blr.ROWS[args.row], args, calib)
    else:
        figures = run_ours(args, calib, importance, recipe)
    print("RESULT " + json.dumps({"key": args.row, "impl": "slimtorch", "label": label,
                                  **figures}), flush=True)  # fmt: skip


def run_ours(
    args: argparse.Namespace, calib: Any, importance: str | None, recipe: str | None
) -> dict[str, Any]:
    import slimtorch as st
    from slimtorch.core.context import Context
    from slimtorch.core.info import update_info
    from slimtorch.export.gguf import export_gguf
    from slimtorch.models.registry import load_model

    imatrix = None
    if importance == "llama":
        imatrix = blr.imatrix_file(args, calib)
    elif importance == "own":
        imatrix = own_importance(args, calib)
    loaded = blr.load_base()
    model = loaded.model
    update_info(model, architecture=loaded.architecture, source=blr.MODEL, tokenizer=blr.MODEL)
    out = args.work / f"{args.row}.gguf"
    with harness.stopwatch() as sw:
        if recipe is not None:
            data = blr.fixed_task(calib[: args.gptq_windows])
            model = st.compress(model, recipe, data=data, ctx=Context(progress=False)).model
        report = export_gguf(model.eval(), (calib[:1, :128],), out, overwrite=True,
                             requantize="Q4_K_M", imatrix=imatrix)  # fmt: skip
    figures: dict[str, Any] = {"seconds": round(sw.seconds, 1), "bytes": out.stat().st_size}
    figures["gguf_export"] = {k: v for k, v in report.items() if k != "tokenizer"}
    cache = args.work / f"cache-{args.row}"
    os.environ["SLIMTORCH_CACHE"] = str(cache)
    base = blr.load_base().model
    if args.llama_only:  # no PyTorch figures (None, not an error row)
        figures.update(kld_mean=None, perplexity=None, top1_agreement=None)
    else:
        figures.update(blr.score(load_model(str(out)).model, base))
    figures.update(blr.llama_cpp_figures(out, base, args.llama_threads))
    shutil.rmtree(cache, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--llama-threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-kquants"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--gptq-windows", type=int, default=64, help="GPTQ's calibration rows")
    parser.add_argument("--llama-only", action="store_true", help="score in llama.cpp only")
    args = parser.parse_args()
    if args.row is not None:
        run_row(args)
        return
    from safetensors.torch import save_file

    args.work.mkdir(parents=True, exist_ok=True)
    calib = blr.make_calibration(args.samples)
    save_file({"input_ids": calib.contiguous()}, str(args.work / "calib.safetensors"))
    result: dict[str, Any] = harness.read_result(args.out, {"rows": []})
    result.update(
        command="python " + " ".join(sys.argv), samples=int(calib.shape[0]),
        threads=args.threads, llama_threads=args.llama_threads,
        base_bytes=blr.dir_bytes(blr.source_gguf()),
        environment=harness.environment(packages=("gguf", "llama_cpp_python")),
    )  # fmt: skip
    for key in args.rows:
        cmd = [sys.executable, __file__, "--row", key, "--work", str(args.work),
               "--threads", str(args.threads), "--llama-threads", str(args.llama_threads),
               "--gptq-windows", str(args.gptq_windows)]  # fmt: skip
        cmd += ["--llama-only"] if args.llama_only else []
        row = blr.child_row(cmd, key, ROWS[key][0], "slimtorch", args.work)
        blr.add_row(result, row, list(ROWS), args.out, args.markdown, blr.table)
    print(blr.table(result))


if __name__ == "__main__":
    main()
