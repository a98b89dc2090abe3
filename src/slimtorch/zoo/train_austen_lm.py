"""Train ``builtin:austen-lm``: its byte-level BPE tokenizer, then the Llama model, seeded.

    python -m slimtorch.zoo.train_austen_lm --out src/slimtorch/zoo/weights/austen_lm \\
        [--steps 550 --threads 1 --vocab 2048 --seed 0]

Text: the train split of Jane Austen's novels and the Wikipedia sample (the first 90% of each
novel and article; the last 10% stay held out). The tokenizer (``tokenizers`` BPE over bytes, no
normaliser, so decoding gives back the exact text) is trained first, single-threaded so its
merges are deterministic. The model trains on random windows of the token stream with AdamW,
linear warm-up then cosine decay, gradient clipping; init, window order and dropout-free
training are seeded. The directory gets ``config.json``, ``model.safetensors`` (fp16, tied
embeddings stored once), ``tokenizer.json`` and ``training.json`` (settings, losses, held-out
perplexity, time), each written atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.zoo import austen_lm
from slimtorch.zoo.train_lenet import _atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMTrainSpec:
    """How the builtin is trained."""

    steps: int = 550
    batch_size: int = 8
    context: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    clip: float = 1.0
    vocab_size: int = 2048
    seed: int = 0
    data: str = austen_lm.DEFAULT_TRAIN_DATA


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``<|endoftext|>`` as token 0."""
    os.environ["RAYON_NUM_THREADS"] = "1"  # merges are deterministic single-threaded
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[austen_lm.EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def lr_at(step: int, spec: LMTrainSpec) -> float:
    """Learning-rate factor: linear warm-up, then cosine from 1 to ``min_lr_ratio``."""
    if step < spec.warmup:
        return (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def random_windows(ids: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` windows ``[n, length]`` of ``ids`` at uniformly random starts."""
    starts = torch.randint(0, ids.numel() - length + 1, (n,), generator=gen)
    return ids[starts.unsqueeze(1) + torch.arange(length)]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train_model(model: nn.Module, ids: torch.Tensor, spec: LMTrainSpec) -> list[float]:
    """Train on random ``context + 1`` windows of ``ids``; returns the mean loss per 50 steps."""
    opt = torch.optim.AdamW(
        _param_groups(model, spec.weight_decay), lr=spec.lr, betas=(0.9, 0.95), eps=1e-8
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, spec))
    gen = torch.Generator().manual_seed(spec.seed)
    model.train()
    curve, running, start = [], 0.0, time.perf_counter()
    for step in range(spec.steps):
        batch = random_windows(ids, spec.batch_size, spec.context + 1, gen)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip)
        opt.step()
        sched.step()
        running += float(loss.detach())
        if (step + 1) % 50 == 0 or step + 1 == spec.steps:
            curve.append(running / (step % 50 + 1))
            running = 0.0
            elapsed = time.perf_counter() - start
            log.info(
                "step %d/%d loss %.3f ppl %.1f lr %.2e (%.2f s/step)",
                step + 1, spec.steps, curve[-1], math.exp(curve[-1]),
                sched.get_last_lr()[0], elapsed / (step + 1),
            )  # fmt: skip
    model.eval()
    return curve


@torch.no_grad()
def heldout_nll(model: nn.Module, ids: torch.Tensor, context: int) -> tuple[float, int]:
    """Mean next-token NLL over non-overlapping ``context`` windows (evaluator ``perplexity``)."""
    n = ids.numel() // context
    windows = ids[: n * context].reshape(n, context)
    total = 0.0
    for start in range(0, n, 8):
        chunk = windows[start : start + 8]
        logits = model(input_ids=chunk).logits[:, :-1]
        total += float(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).double(),
                chunk[:, 1:].reshape(-1),
                reduction="sum",
            )
        )
    return total / (n * (context - 1)), n * (context - 1)


def _save_dir(out: Path, model: nn.Module, tokenizer: Any, record: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {
        k: v.detach().to(torch.float16).contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight" or not model.config.tie_word_embeddings  # type: ignore[union-attr]
    }
    config = model.config.to_dict()  # type: ignore[union-attr, operator]
    config.pop("_name_or_path", None)
    config["dtype"] = "float32"  # fp16 on disk, computed in fp32
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(
        out / austen_lm.WEIGHTS_FILE,
        lambda tmp: save_file(state, tmp, metadata={"format": "pt"}),
    )
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(out / austen_lm.CONFIG_FILE, lambda tmp: Path(tmp).write_text(config_text))
    tok_text = tokenizer.to_str(pretty=False)
    _atomic_write(out / austen_lm.TOKENIZER_FILE, lambda tmp: Path(tmp).write_text(tok_text))
    rec_text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    _atomic_write(out / "training.json", lambda tmp: Path(tmp).write_text(rec_text))


def train_and_save(spec: LMTrainSpec, out: Path) -> dict[str, Any]:
    """Tokenizer, model, held-out perplexity; writes ``out`` and returns the record."""
    torch.manual_seed(spec.seed)
    parts = [austen_lm.text_split(p, "train") for p in spec.data.split("+")]
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(parts, spec.vocab_size)
    eos = tokenizer.token_to_id(austen_lm.EOS_TOKEN)
    ids = torch.cat(
        [torch.cat([austen_lm.encode(p, tokenizer), torch.tensor([eos])]) for p in parts]
    )
    tok_seconds = time.perf_counter() - t0
    log.info("tokenizer: %d tokens for %d characters", ids.numel(), sum(map(len, parts)))
    config = austen_lm.llama_config(
        tokenizer.get_vocab_size(), max_position_embeddings=spec.context
    )
    model = austen_lm.from_config(config)
    t0 = time.perf_counter()
    curve = train_model(model, ids, spec)
    train_seconds = time.perf_counter() - t0
    heldout = austen_lm.encode(austen_lm.text_split(austen_lm.EVAL_DATA, "heldout"), tokenizer)
    nll, tokens = heldout_nll(model, heldout, spec.context)
    chars = len(austen_lm.text_split(austen_lm.EVAL_DATA, "heldout"))
    record = {
        **asdict(spec),
        "train_tokens": ids.numel(),
        "tokenizer_seconds": round(tok_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "loss_every_50_steps": [round(x, 4) for x in curve],
        "params": sum(p.numel() for p in model.parameters()),
        "heldout_austen_perplexity": round(math.exp(nll), 3),
        "heldout_austen_tokens_scored": tokens,
        # as evaluator ``perplexity``: bits per token x tokens per character
        "heldout_austen_bits_per_char": round(nll / math.log(2) * heldout.numel() / chars, 4),
        "torch_version": torch.__version__,
    }
    _save_dir(out, model, tokenizer, record)
    log.info("held-out Austen perplexity %.2f", record["heldout_austen_perplexity"])
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=austen_lm.WEIGHTS_DIR)
    defaults = LMTrainSpec()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--vocab", type=int, default=defaults.vocab_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--data", default=defaults.data)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    spec = LMTrainSpec(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        vocab_size=args.vocab,
        seed=args.seed,
        data=args.data,
    )
    train_and_save(spec, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
