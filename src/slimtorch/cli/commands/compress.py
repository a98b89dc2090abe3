"""``slimtorch compress``: compress a model with a recipe and save the artifact."""

from __future__ import annotations

import argparse
from typing import Any

from slimtorch.cli.options import add_common, context
from slimtorch.cli.render import before_after


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "compress", help="compress a model with a recipe and save the artifact"
    )
    p.add_argument(
        "--model",
        required=True,
        help="builtin:NAME, a local HF directory, a Llama-family .gguf file, or pkg.mod:factory",
    )
    p.add_argument(
        "--recipe", required=True, help="a preset name (see `slimtorch recipes`) or a YAML file"
    )
    p.add_argument(
        "--data", help="builtin:NAME or a path: training/calibration and evaluation data"
    )
    p.add_argument("--out", required=True, help="output directory for the artifact")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--latency-batch", type=int, default=1)
    p.add_argument(
        "--input-shape",
        help="input shape for latency runs of models slimtorch does"
        " not know, e.g. 1,3,224,224 (recorded in the artifact)",
    )
    p.add_argument("--input-dtype", default="float32", choices=["float32", "int64"])
    p.add_argument(
        "--max-memory",
        help="memory budget, e.g. 1GB (each process's, with --nproc): a Hugging Face checkpoint"
        " bigger than half of it is compressed block by block (layer-wise stages only),"
        " resumable",
    )
    p.add_argument(
        "--work-dir", help="progress of an offloaded run (default: beside --out); rerun to resume"
    )
    p.add_argument(
        "--tokenizer",
        help="a causal LM's tokenizer: tokenizer.json (or a directory holding it) or"
        " builtin:NAME; default: the one beside the model's config.json",
    )
    p.add_argument(
        "--llm-windows",
        type=int,
        default=8,
        help="LLM quality suite (perplexity, KL divergence from the original): held-out windows"
        " per text (builtin:wikipedia, builtin:austen); 0 skips it",
    )
    p.add_argument("--llm-window-tokens", type=int, default=512, help="tokens per LLM suite window")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="calibrate on N processes of this machine (starts torchrun; layer-wise stages;"
        " docs/distributed.md). Under torchrun itself leave it out",
    )
    add_common(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from slimtorch.workflows import compress_distributed as dist
    from slimtorch.workflows.compress import CompressOptions, compress_to_dir

    options = CompressOptions(
        data=args.data,
        force=args.force,
        latency_batch=args.latency_batch,
        input_shape=args.input_shape,
        input_dtype=args.input_dtype,
        max_memory=args.max_memory,
        work_dir=args.work_dir,
        tokenizer=args.tokenizer,
        llm_windows=args.llm_windows,
        llm_window_tokens=args.llm_window_tokens,
    )
    if args.nproc != 1:
        return dist.launch(getattr(args, "argv", []), args.nproc, args.out, args.recipe, options)
    ctx = context(args)
    if dist.distributed.launched():  # a rank of a torchrun job
        return dist.as_rank(
            lambda: compress_to_dir(args.model, args.recipe, args.out, options, ctx), ctx.device
        )
    return compress_to_dir(args.model, args.recipe, args.out, options, ctx)


def render(r: dict[str, Any]) -> str:
    if r.get("out") is None:  # a torchrun rank other than 0: rank 0 reports and writes
        return f"{r['model']}: this rank's calibration shard done (rank 0 writes the artifact)"
    return f"{r['model']} -> {r['out']} (recipe {r['recipe']})\n" + before_after(r)
