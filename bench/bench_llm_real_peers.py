"""gptqmodel and llm-compressor on builtin:smollm2-135m, rows for bench_llm_real.py's table:
the same calibration windows, the same scorer, the same base logits.

    .venv/bin/python bench/bench_llm_real_peers.py [--rows KEY ...] [--work DIR] \\
        [--peers-python /tmp/peers-venv/bin/python] [--calib FILE] [--markdown FILE]

Calibration: ``--samples`` (64) windows of 512 tokens of builtin:wikipedia's training split under
the model's tokenizer, made by bench_llm_real.py's own ``make_calibration`` and saved to
``--work``/calib.safetensors (``--calib FILE`` reuses a file bench_llm_real.py saved; the run
records whether it equals a fresh draw). Every peer is fed exactly those rows, in order, in
batches of 8 (as our presets' ``calibration.batch_size``).

Each row runs in its own process in the peers' virtualenv (``--peers-python``: gptqmodel 7.6.0
and llm-compressor 0.14 installed with --no-deps next to our torch; BENCHMARKS.md), one torch
thread (``--threads``; ``OMP_NUM_THREADS`` and ``GPTQMODEL_CPU_WORKERS`` set to it), and:

1. loads the base (the builtin's cached Hugging Face directory, float32);
2. times the peer's compression call alone (gptqmodel ``quantize``, llm-compressor ``oneshot``);
3. saves the peer's output as the peer writes it (gptqmodel ``save``; llm-compressor
   ``save_pretrained(save_compressed=True)``: compressed-tensors pack-quantized) and counts the
   bytes of that directory (``bytes``; ``bytes_embedding`` says how much of it is the token
   embedding, which both peers leave in float32);
4. reads the dequantized weights back from what was saved (gptqmodel: ``GPTQModel.load`` with its
   torch backend and each ``TorchLinear.dequantize_weight()``; llm-compressor: transformers'
   compressed-tensors loader with ``run_compressed=False``), copies them into a fresh float32
   base model, and scores it with :func:`slimtorch.workflows.figures.llm_figures` against the
   base - the scorer of every bench_llm_real.py row;
5. scores it a second time with the token embedding / tied LM head quantized as our w4a16
   presets do (slimtorch's ``quantize.rtn``, 8-bit symmetric per row), so that
   ``embedding_q8`` is like for like with our ``gptq-w4`` row (same embedding, only the
   block Linears differ).

Settings (from src/slimtorch/recipe/presets/w4a16-gptq.yaml: 4 bits, asymmetric, groups of 64 -
``group_size: auto`` picks 64 on SmolLM2's 576 columns -, damp 0.01, act_order with static
groups, min-max grid, every Linear of a block sees the same block inputs). gptqmodel:
``QuantizeConfig(bits=4, group_size=64, sym=False, desc_act=True, act_group_aware=False,
static_groups=True, damp_percent=0.01, true_sequential=False, mse=0.0)``; llm-compressor:
``GPTQModifier`` int/asymmetric/group 64, ``actorder="static"``, block_size 128, dampening_frac
0.01, ignore ``re:.*lm_head``, pipeline "sequential". The ``-g32-sym`` rows: symmetric groups of
32 (Q4_0-like block size; the peers' symmetric 4-bit grids are not llama.cpp's Q4_0 grid).

Results: bench/results/llm_real_peers.json (keys as bench/results/llm_real.json's rows; after
every row); ``--markdown FILE`` writes the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import harness

RESULTS = harness.result_path("llm_real_peers.json")
PEERS_PYTHON = Path("/tmp/peers-venv/bin/python")
DAMP, BLOCK, BATCH = 0.01, 128, 8
PEER_PACKAGES = ("gptqmodel", "llmcompressor", "compressed-tensors", "transformers", "torch",
                 "accelerate")  # fmt: skip


@dataclass(frozen=True)
class PeerRow:
    key: str
    impl: str  # gptqmodel | llmcompressor
    label: str
    bits: int = 4
    group: int = 64
    sym: bool = False


ROWS: dict[str, PeerRow] = {
    r.key: r
    for r in (
        PeerRow("gptqmodel-w4", "gptqmodel", "gptqmodel 7.6.0 GPTQ w4 g64 (w4a16-gptq settings)"),
        PeerRow(
            "llmcompressor-w4",
            "llmcompressor",
            "llm-compressor 0.14 GPTQ W4A16 g64 (w4a16-gptq settings)",
        ),
        PeerRow(
            "gptqmodel-w4-g32-sym",
            "gptqmodel",
            "gptqmodel 7.6.0 GPTQ w4 g32 symmetric",
            group=32,
            sym=True,
        ),
        PeerRow(
            "llmcompressor-w4-g32-sym",
            "llmcompressor",
            "llm-compressor 0.14 GPTQ W4A16 g32 symmetric",
            group=32,
            sym=True,
        ),
    )
}


def real() -> Any:
    """bench_llm_real.py as a module (its calibration, byte count and scorer)."""
    import bench_llm_real

    return bench_llm_real


# ------------------------------------------------------------------ the peers (child process)


def _gptqmodel(row: PeerRow, calib: Any, work: Path, base_dir: Path) -> dict[str, Any]:
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig  # type: ignore[import-not-found]
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear  # type: ignore[import-not-found]

    _gptqmodel_workers(int(os.environ.get("GPTQMODEL_CPU_WORKERS", "1")))
    config = QuantizeConfig(bits=row.bits, group_size=row.group, sym=row.sym, desc_act=True,
                            act_group_aware=False, static_groups=True, damp_percent=DAMP,
                            true_sequential=False, mse=0.0)  # fmt: skip
    wrapper = GPTQModel.load(str(base_dir), config, device="cpu", dtype=torch.float32)
    rows = [{"input_ids": r.unsqueeze(0), "attention_mask": torch.ones_like(r).unsqueeze(0)}
            for r in calib]  # fmt: skip
    back = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="peer-gptqmodel-") as tmp:
        os.chdir(tmp)  # quantize writes its per-layer log under ./logs/
        os.makedirs("logs")
        try:
            with harness.stopwatch() as sw:
                wrapper.quantize(rows, batch_size=BATCH, calibration_sort=None)
        finally:
            os.chdir(back)
    out = work / row.key
    shutil.rmtree(out, ignore_errors=True)
    wrapper.save(str(out))
    del wrapper
    # its CPU kernel loads float16/bfloat16 only; scales are stored as float16 anyway
    loaded = GPTQModel.load(str(out), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    weights: dict[str, Any] = {}
    with torch.no_grad():
        for name, module in loaded.model.named_modules():
            if isinstance(module, TorchLinear):
                weights[name] = module.dequantize_weight().T.to(torch.float32).clone()
    if not weights:
        raise SystemExit("gptqmodel: no quantized Linear found in the saved model")
    return {
        "seconds": round(sw.seconds, 1),
        "out": out,
        "weights": weights,
        "readback": "GPTQModel.load(backend=TORCH, float16), TorchLinear.dequantize_weight()",
    }


def _gptqmodel_workers(workers: int) -> None:
    """gptqmodel 7.6.0 quantizes ``GPTQMODEL_CPU_WORKERS`` modules at once on CPU, and refuses
    fewer than 2 (its unused ``model_loader:cpu`` sub-pool asks for 2). For one worker its pool
    builder is replaced by the same pool with both counts 1 (the only change to the peer)."""
    if workers >= 2:
        return
    import gptqmodel
    from gptqmodel.utils.linalg_warmup import run_torch_linalg_warmup
    from gptqmodel.utils.threadx import DeviceThreadPool, WarmUpCtx, WarmupTask

    def build() -> Any:
        warm = WarmupTask(run_torch_linalg_warmup, scope=WarmUpCtx.THREAD_AND_DEVICE)
        return DeviceThreadPool(inference_mode=True, warmups={"cpu": warm},
                                workers={"cpu": 1, "model_loader:cpu": 1},
                                empty_cache_every_n=512)  # fmt: skip

    gptqmodel._build_device_thread_pool = build


def _llmcompressor(row: PeerRow, calib: Any, work: Path, base_dir: Path) -> dict[str, Any]:
    import torch
    from llmcompressor import oneshot  # type: ignore[import-not-found]
    from llmcompressor.modifiers.gptq import GPTQModifier  # type: ignore[import-not-found]
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.eval()
    weights_cfg = {"num_bits": row.bits, "type": "int", "symmetric": row.sym,
                   "strategy": "group", "group_size": row.group}  # fmt: skip
    modifier = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights_cfg}},
        ignore=["re:.*lm_head"], actorder="static", block_size=BLOCK, dampening_frac=DAMP,
    )  # fmt: skip
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in calib]
    loader = DataLoader(rows, batch_size=BATCH, shuffle=False)  # type: ignore[arg-type]
    with harness.stopwatch() as sw:
        done = oneshot(model=model, dataset=loader, recipe=[modifier], pipeline="sequential")
    model = done if isinstance(done, torch.nn.Module) else model
    # the in-memory fake-quantized weights (compared with the saved file's below)
    memory = {name: m.weight.detach().to(torch.float32).clone()
              for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and hasattr(m, "weight_scale")}  # fmt: skip
    out = work / row.key
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(str(out), save_compressed=True)
    del model
    figures: dict[str, Any] = {"seconds": round(sw.seconds, 1), "out": out}
    try:
        from transformers.utils.quantization_config import CompressedTensorsConfig

        back = AutoModelForCausalLM.from_pretrained(
            str(out), dtype=torch.float32,
            quantization_config=CompressedTensorsConfig(run_compressed=False),
        )  # fmt: skip
        weights = {name: back.get_submodule(name).weight.detach().to(torch.float32).clone()
                   for name in memory}  # fmt: skip
        diff = max(float((weights[n] - memory[n]).abs().max()) for n in memory)
        figures.update(weights=weights, readback_max_abs_vs_memory=diff,
                       readback="transformers from_pretrained, CompressedTensorsConfig("
                       "run_compressed=False) (decompressed from the saved files)")  # fmt: skip
    except Exception as exc:  # recorded; the in-memory weights are scored
        figures.update(
            weights=memory,
            readback_error=f"{type(exc).__name__}: {exc}"[:500],
            readback="in-memory weights after oneshot (saved file not read)",
        )
    return figures


PEERS = {"gptqmodel": _gptqmodel, "llmcompressor": _llmcompressor}


def _embedding_bytes(out: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                if "embed_tokens" in name or "lm_head" in name:
                    t = st.get_slice(name)
                    shape = t.get_shape()
                    size = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I8": 1, "U8": 1}
                    n = 1
                    for d in shape:
                        n *= d
                    total += n * size.get(t.get_dtype(), 4)
    return total


def _q8_embedding(model: Any) -> Any:
    """The model with its token embedding / tied LM head as our w4a16 presets store it."""
    import slimtorch as st
    from slimtorch.core.context import Context

    recipe = {
        "stages": [
            {
                "method": "quantize.rtn",
                "bits": 8,
                "symmetric": True,
                "granularity": "per_channel",
                "targets": ["Embedding", "lm_head", "embed_out"],
                "missing": "skip",
            }
        ]
    }
    return st.compress(model, recipe, ctx=Context(progress=False)).model


def run_row(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    row = ROWS[args.row]
    bench = real()
    calib = load_file(str(args.work / "calib.safetensors"))["input_ids"]
    got = PEERS[row.impl](row, calib, args.work, _base_dir())
    weights = got.pop("weights")
    out: Path = got.pop("out")
    base = bench.load_base().model
    model = bench.load_base().model
    with torch.no_grad():
        for name, weight in weights.items():
            model.get_submodule(name).weight.copy_(weight)
    head_unchanged = bool(torch.equal(model.get_output_embeddings().weight,
                                      base.get_output_embeddings().weight))  # fmt: skip
    figures: dict[str, Any] = {
        **got,
        "bytes": bench.dir_bytes(out),
        "bytes_embedding": _embedding_bytes(out),
        "checkpoint": str(out),
        "checkpoint_files": sorted(p.name for p in out.iterdir()),
        "linears_replaced": len(weights),
        "embedding_unchanged": head_unchanged,
        "settings": {
            **asdict(row),
            "damp": DAMP,
            "block_size": BLOCK,
            "batch_size": BATCH,
            "act_order": "static groups",
            "calibration_rows": int(calib.shape[0]),
            "window": int(calib.shape[1]),
        },
        "threads": torch.get_num_threads(),
    }
    figures.update(bench.score(model, base))
    q8 = bench.score(_q8_embedding(model), base)
    figures["embedding_q8"] = {k: v for k, v in q8.items() if k != "llm_suite"}
    result = {"key": row.key, "impl": row.impl, "label": row.label, **figures}
    print("RESULT " + json.dumps(result), flush=True)


def _base_dir() -> Path:
    from slimtorch.zoo.smollm2 import model_dir

    return model_dir()


# ------------------------------------------------------------------ the table (parent)


def table(result: dict[str, Any]) -> str:
    fmt = real().fmt
    header = ["method", "bytes (as the peer saves it)", "perplexity", "KLD mean", "KLD p99",
              "top-1", "compress s", "with our 8-bit embedding: perplexity", "KLD mean",
              "KLD p99", "top-1"]  # fmt: skip
    cells = []
    for r in result["rows"]:
        if "error" in r:
            cells.append([r["label"], f"failed: {r['error']}"] + [""] * 9)
            continue
        q8 = r.get("embedding_q8", {})
        cells.append(
            [r["label"], fmt(r.get("bytes"), ","), fmt(r.get("perplexity"), ".2f"),
             fmt(r.get("kld_mean"), ".4f"), fmt(r.get("kld_p99"), ".3f"),
             fmt(r.get("top1_agreement"), ".3f"), fmt(r.get("seconds"), ".1f"),
             fmt(q8.get("perplexity"), ".2f"), fmt(q8.get("kld_mean"), ".4f"),
             fmt(q8.get("kld_p99"), ".3f"), fmt(q8.get("top1_agreement"), ".3f")]
        )  # fmt: skip
    base = result.get("base_perplexity")
    head = f"base perplexity {base:.2f}\n\n" if base is not None else ""
    return head + harness.markdown_table(header, cells, "lrrrrrrrrrr") + "\n"


def prepare_calibration(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file, save_file

    fresh = real().make_calibration(args.samples)
    target = args.work / "calib.safetensors"
    info: dict[str, Any] = {"samples": int(fresh.shape[0]), "window": int(fresh.shape[1])}
    if args.calib is not None:
        given = load_file(str(args.calib))["input_ids"]
        info["calib_from"] = str(args.calib)
        info["calib_equals_fresh_draw"] = bool(given.shape == fresh.shape
                                               and torch.equal(given, fresh))  # fmt: skip
        if args.calib.resolve() != target.resolve():
            shutil.copyfile(args.calib, target)
    else:
        save_file({"input_ids": fresh.contiguous()}, str(target))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS),
                        default=["gptqmodel-w4", "llmcompressor-w4"])  # fmt: skip
    parser.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)  # one row (child)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-llm-real-peers"))
    parser.add_argument("--calib", type=Path, default=None, help="bench_llm_real's calib file")
    parser.add_argument("--peers-python", type=Path, default=PEERS_PYTHON)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--merge", action="store_true", help="keep --out's other rows")
    args = parser.parse_args()
    if args.row is not None:
        run_row(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"rows": []}
    if args.merge and args.out.exists():
        result = harness.read_result(args.out, result)
        result["rows"] = [r for r in result["rows"] if r["key"] not in args.rows]
    commands = [*result.get("commands", []), "python " + " ".join(sys.argv)]
    peers = subprocess.run(
        [str(args.peers_python), "-c", "import importlib.metadata as m, json; print(json.dumps("
         f"{{p: m.version(p) for p in {PEER_PACKAGES!r}}}))"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    result.update(
        command=commands[-1], commands=commands, **prepare_calibration(args),
        threads=args.threads, peers_python=str(args.peers_python),
        peer_versions=json.loads(peers.stdout) if peers.returncode == 0 else peers.stderr[-500:],
        environment=harness.environment(packages=("gguf",)),
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "GPTQMODEL_CPU_WORKERS": str(args.threads)}  # fmt: skip
    # the scorer's Austen text is found under sys.prefix: this venv's, not the peers' one
    austen = Path(sys.prefix) / "share/slimtorch/debian/usr/lib/R/site-library/janeaustenr"
    if austen.is_dir():
        env.setdefault("SLIMTORCH_JANEAUSTENR_DIR", str(austen))
    bench = real()
    for key in args.rows:
        cmd = [str(args.peers_python), __file__, "--row", key, "--work", str(args.work),
               "--threads", str(args.threads)]  # fmt: skip
        row = bench.child_row(cmd, key, ROWS[key].label, ROWS[key].impl, args.work, env)
        row["command"] = " ".join(cmd)
        bench.add_row(result, row, list(ROWS), args.out, args.markdown, table)
    print(table(result))


if __name__ == "__main__":
    main()
