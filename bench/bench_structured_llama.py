"""Structured pruning of a tiny Llama with grouped-query attention, trained here on Jane Austen.

    .venv/bin/python bench/bench_structured_llama.py [--steps 1000] [--finetune 300]
        [--out bench/results/structured_llama.json]

No trained causal LM ships offline, so the bench trains one (seeded, 1 thread):
LlamaForCausalLM(hidden 128, MLP 384, 4 layers, 8 query heads sharing 2 key/value heads, RoPE)
over a character vocabulary built from the Austen text, on random 128-character windows of the
train split of builtin:austen (first 90% of each novel), batch 16, AdamW, cosine schedule.
Perplexity (per character) is measured on non-overlapping 128-character windows of the held-out
split (last 10% of each novel), every position after the first of a window predicted.

Then `prune.structured` with ratio 0.5 (L1 importance, same ratio in every group) through
`slimtorch.compress`: per layer the key/value heads go 2 -> 1 (with their 4 query heads each)
and the MLP width 384 -> 192; the hidden size is frozen. The pruned model is fine-tuned with the
same LM loss (plain loop), exported with `export_hf`, reloaded with transformers'
`AutoModelForCausalLM.from_pretrained` (local files only) and compared logit for logit with the
slimtorch model, and round-tripped through `slimtorch.save`/`slimtorch.load`.
Latency at batch 1 on 1 thread: one forward over 128 characters, and greedy decoding of 64
characters after a 64-character prompt with the key/value cache (ms per character).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import harness
import slimtorch as st
from slimtorch import api
from slimtorch.calibrate.inputs import count_flops
from slimtorch.eval.latency import measure_latency_ms
from slimtorch.eval.size import count_params
from slimtorch.graph.dependency import build_graph
from slimtorch.recipe.recipe import load_methods
from slimtorch.zoo.data_text import austen_split

SEQ = 128
PROMPT, NEW = 64, 64


def vocabulary(text: str) -> list[str]:
    return sorted(set(text))


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text], dtype=torch.int64)


def build_model(vocab_size: int, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    architecture = {
        "kind": "hf",
        "class": "LlamaForCausalLM",
        "config": config.to_dict(),
        "attn_implementation": "sdpa",
        "dtype": "float32",
    }
    api.set_architecture(model, architecture)
    return model


def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(x).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def train_lm(
    model: nn.Module, ids: torch.Tensor, steps: int, lr: float, batch: int, seed: int
) -> dict[str, Any]:
    """AdamW on random windows of ``ids``, linear warm-up (5%) then cosine; seeded."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    wall, losses = harness.stopwatch(), []
    for _ in range(steps):
        pos = torch.randint(0, ids.numel() - SEQ, (batch,), generator=gen)
        x = torch.stack([ids[p : p + SEQ] for p in pos.tolist()])
        loss = lm_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-50:]
    return {
        "steps": steps,
        "lr": lr,
        "batch": batch,
        "seq": SEQ,
        "seconds": round(wall.seconds, 1),
        "final_train_loss": round(sum(tail) / len(tail), 4),
    }


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch: int = 64) -> float:
    """exp(mean next-character loss) over non-overlapping windows of ``SEQ`` characters."""
    model.eval()
    windows = ids[: ids.numel() // SEQ * SEQ].view(-1, SEQ)
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i : i + batch]
        logits = model(x).logits[:, :-1]
        flat = logits.reshape(-1, logits.shape[-1])
        total += float(F.cross_entropy(flat, x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def decode_ms_per_token(model: nn.Module, prompt: torch.Tensor, repeats: int) -> float:
    """Median ms per generated character: greedy, ``NEW`` characters, key/value cache."""

    def generate() -> torch.Tensor:
        out = model.generate(
            prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=True
        )
        assert out.shape[1] == prompt.shape[1] + NEW
        return out

    timing = harness.interleaved({"decode": generate}, repeats, warmup=1)["decode"]
    return timing.median / NEW


def measure(
    model: nn.Module, heldout: torch.Tensor, repeats: int, path: Path | None
) -> dict[str, Any]:
    params, _ = count_params(model)
    x = heldout[:SEQ].view(1, SEQ)
    row: dict[str, Any] = {
        "params": params,
        "flops_b1x128": count_flops(model, (x,)),
        "perplexity": round(perplexity(model, heldout), 4),
        "forward_ms_b1x128": round(measure_latency_ms(model, (x,), 3, repeats), 2),
        "decode_ms_per_token": round(decode_ms_per_token(model, x[:, :PROMPT], repeats), 3),
    }
    if path is not None:
        row["bytes_on_disk"] = api.artifact_size(path)
    return row


def attention_sizes(model: nn.Module) -> list[tuple[int, int, int]]:
    from slimtorch.graph.hf_attention import find_attention

    out = []
    for module in model.modules():
        parts = find_attention(module)
        if parts is not None:
            out.append((parts.num_heads, parts.num_kv, parts.head_dim))
    return out


def describe_groups(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    graph = build_graph(model, (x,))
    return {
        "prunable": [g.describe() for g in graph.prunable],
        "frozen": [f"{g.describe()}: {g.frozen}" for g in graph.frozen],
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def hf_roundtrip(model: nn.Module, tmp: Path, heldout: torch.Tensor) -> dict[str, Any]:
    """export_hf -> AutoModelForCausalLM.from_pretrained: config, max |logit diff|, perplexity."""
    from transformers import AutoModelForCausalLM

    from slimtorch.export.hf import export_hf

    out = export_hf(model, tmp / "hf")
    cfg = json.loads((out / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, attn_implementation="sdpa"
    ).eval()
    x = heldout[: 4 * SEQ].view(4, SEQ)
    with torch.no_grad():
        diff = (reloaded(x).logits - model(x).logits).abs().max()
    keys = ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
    return {
        "config": {k: cfg.get(k) for k in keys},
        "class": type(reloaded).__name__,
        "max_abs_logit_diff": float(diff),
        "perplexity": round(perplexity(reloaded, heldout), 4),
        "bytes": dir_bytes(out),
    }


def st_roundtrip(model: nn.Module, path: Path, heldout: torch.Tensor) -> dict[str, Any]:
    st.save(model, path)
    loaded = st.load(path)
    x = heldout[: 4 * SEQ].view(4, SEQ)
    with torch.no_grad():
        diff = (loaded(x).logits - model(x).logits).abs().max()
    return {"max_abs_logit_diff": float(diff), "attention": attention_sizes(loaded)}


def base_model(
    args: argparse.Namespace, vocab_size: int, train_ids: torch.Tensor
) -> tuple[nn.Module, dict[str, Any]]:
    """The trained base LM: from ``args.cache`` when it holds one, else trained (and cached)."""
    info = args.cache / "training.json" if args.cache else None
    if info is not None and info.is_file():
        return st.load(args.cache / "model"), json.loads(info.read_text())
    model = build_model(vocab_size, args.seed)
    training = train_lm(model, train_ids, args.steps, args.lr, args.batch, args.seed)
    if info is not None:
        st.save(model, args.cache / "model")
        info.write_text(json.dumps(training))
    return model, training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=harness.result_path("structured_llama.json"))
    parser.add_argument("--steps", type=int, default=1000, help="training steps of the base LM")
    parser.add_argument("--finetune", type=int, default=300, help="fine-tuning steps after pruning")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=10, help="latency runs per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="slimtorch artifact of the trained base LM:"
        " loaded when it exists, written after training otherwise",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_methods()  # import every recipe method now, not after minutes of training
    wall = harness.stopwatch()
    train_text, held_text = austen_split("train"), austen_split("heldout")
    vocab = vocabulary(train_text + held_text)
    train_ids, heldout = encode(train_text, vocab), encode(held_text, vocab)
    model, training = base_model(args, len(vocab), train_ids)
    print(json.dumps({"training": training}), flush=True)
    api.get_metadata(model)["input"] = {"shape": [1, 64], "dtype": "int64"}
    groups = describe_groups(model, heldout[:64].view(1, 64))
    with tempfile.TemporaryDirectory(prefix="slimtorch-llama-") as tmp_name:
        tmp = Path(tmp_name)
        st.save(model, tmp / "base")
        base = measure(model, heldout, args.repeats, tmp / "base")
        print(json.dumps({"base": base}), flush=True)
        recipe = {"stages": [{"method": "prune.structured", "ratio": args.ratio}]}
        with harness.stopwatch() as sw:
            pruned = st.compress(model, recipe).model
        prune_s = sw.seconds
        st.save(pruned, tmp / "pruned")
        row_pruned = measure(pruned, heldout, args.repeats, tmp / "pruned")
        row_pruned["prune_seconds"] = round(prune_s, 2)
        row_pruned["attention"] = attention_sizes(pruned)
        print(json.dumps({"pruned": row_pruned}), flush=True)
        ft = train_lm(pruned, train_ids, args.finetune, args.ft_lr, args.batch, args.seed + 1)
        roundtrip = st_roundtrip(pruned, tmp / "tuned", heldout)
        loaded = st.load(tmp / "tuned")
        row_tuned = measure(loaded, heldout, args.repeats, tmp / "tuned")
        row_tuned["finetune"] = ft
        print(json.dumps({"tuned": row_tuned}), flush=True)
        hf = hf_roundtrip(loaded, tmp, heldout)
        print(json.dumps({"export_hf": hf, "slimtorch_roundtrip": roundtrip}), flush=True)
    x = heldout[:SEQ].view(1, SEQ)
    base_end = {
        "forward_ms_b1x128": round(measure_latency_ms(model, (x,), 3, args.repeats), 2),
        "decode_ms_per_token": round(decode_ms_per_token(model, x[:, :PROMPT], args.repeats), 3),
    }
    env = harness.environment()
    record = {
        "command": "bench/bench_structured_llama.py"
        + (f" --steps {args.steps}" if args.steps != 1000 else "")
        + (f" --finetune {args.finetune}" if args.finetune != 300 else ""),
        "torch": env["torch"],
        "slimtorch": st.__version__,
        "machine": env["machine"],
        "threads": env["threads"],
        "vocab_size": len(vocab),
        "heldout_chars": int(heldout.numel()),
        "recipe": recipe,
        "training": training,
        "groups": groups,
        "base": base,
        "base_latency_at_end": base_end,
        "pruned": row_pruned,
        "pruned_finetuned": row_tuned,
        "export_hf": hf,
        "slimtorch_roundtrip": roundtrip,
        "latency": f"median of {args.repeats} runs, batch 1, 1 thread; decode: greedy {NEW}"
        f" characters after a {PROMPT}-character prompt with the KV cache",
        "wall_seconds": round(wall.seconds),
        "environment": env,
    }
    harness.write_result(args.out, record)


if __name__ == "__main__":
    main()
