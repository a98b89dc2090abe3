"""Fast quality functions for sensitivity scans: the model's own metric on a fixed subsample.

A scan evaluates the model hundreds of times, so each evaluation reads a fixed, evenly spaced
subsample (the same items every time, so differences between trials are paired) of the
*calibration* split by default (the training split where the metric has one: Fashion-MNIST
train images, the first 90% of each Austen novel), so choices tuned on it are not tuned on the
test set. ``samples`` counts, per metric:

* ``accuracy``: images (default 1,000);
* ``lee``: Lee documents, out of 50 (default all 50; Pearson over their pairs);
* ``bpc``: next-character targets (default 5,000);
* ``perplexity``: tokens, in whole context windows (at least one) cut from evenly spaced
  places of the text (default 2,048).

Other evaluators run whole, through :func:`slimtorch.eval.quality.get_evaluator`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.models.registry import LoadedModel

log = logging.getLogger(__name__)

Evaluate = Callable[[nn.Module], float]
Split = Literal["calibration", "evaluation"]
DEFAULT_SAMPLES = {"accuracy": 1000, "lee": 50, "bpc": 5000, "perplexity": 2048}


def spaced(n_total: int, n: int) -> torch.Tensor:
    """``min(n, n_total)`` evenly spaced indices into ``range(n_total)`` (int64, ascending)."""
    if n_total < 1:
        raise UserInputError("nothing to evaluate on: the dataset is empty")
    if n < 1:
        raise UserInputError(f"samples must be at least 1, got {n}")
    if n >= n_total:
        return torch.arange(n_total, dtype=torch.int64)
    return torch.linspace(0, n_total - 1, n).round().to(torch.int64)


def _accuracy(data: str | None, samples: int, split: Split) -> tuple[Evaluate, str, bool]:
    from slimtorch.eval.accuracy import accuracy
    from slimtorch.zoo.data_images import load_image_dataset

    name = "train" if split == "calibration" else "test"
    try:
        images, labels = load_image_dataset(data, name)
    except UserInputError as exc:
        if name != "train":
            raise
        warnings.warn(
            f"no training images for the sensitivity scan ({exc}); measuring on the test split",
            stacklevel=3,
        )
        images, labels = load_image_dataset(data, "test")
    idx = spaced(len(labels), samples)
    x, y = images[idx], labels[idx]
    return (lambda model: accuracy(model, x, y)), "accuracy", True


def _lee(data: str | None, samples: int, split: Split) -> tuple[Evaluate, str, bool]:
    from slimtorch.eval.similarity import pair_scores, pearson
    from slimtorch.zoo import data_text, minilm

    if data not in (None, "builtin:lee"):
        raise UserInputError(
            f"the 'lee' metric runs on builtin:lee only, got data={data!r}; drop --data"
        )
    docs, human = data_text.load_lee()
    idx = spaced(len(docs), samples).numpy()
    if len(idx) < 3:
        raise UserInputError(f"lee needs at least 3 documents for a correlation, got {len(idx)}")
    sub_docs = [docs[i] for i in idx]
    sub_human = np.asarray(human)[np.ix_(idx, idx)]

    def evaluate(model: nn.Module) -> float:
        return pearson(*pair_scores(minilm.embed(model, sub_docs), sub_human))

    return evaluate, "lee_pearson", True


def _bpc(data: str | None, samples: int, split: Split, ctx: Context) -> tuple[Evaluate, str, bool]:
    from slimtorch.eval.language import bits_per_char, sample_positions
    from slimtorch.zoo.char_lstm import encoded_split, target_positions

    ids = encoded_split(data or "builtin:austen", "train" if split == "calibration" else "heldout")
    positions = sample_positions(target_positions(ids), samples)

    def evaluate(model: nn.Module) -> float:
        return bits_per_char(model, ids, positions, ctx.device)

    return evaluate, "bits_per_char", False


def token_windows(text: str, tokenizer: Any, n: int, context: int) -> torch.Tensor:
    """``[n', context]`` token windows from ``n`` evenly spaced places in ``text``.

    Only the text around each place is tokenized (a scan of a 4M-character split would
    otherwise tokenize it all); windows start at the first token of their chunk.
    """
    from slimtorch.zoo.austen_lm import encode

    chars = context * 16  # byte-level BPE averages 3-5 characters a token: ample
    rows = []
    for start in spaced(max(1, len(text) - chars), n).tolist():
        ids = encode(text[start : start + chars], tokenizer)
        if ids.numel() >= context:
            rows.append(ids[:context])
    if not rows:
        raise UserInputError(
            f"the text has fewer than {context} tokens in any stretch of {chars} characters;"
            " give more text with --data"
        )
    return torch.stack(rows)


def _perplexity(
    model: nn.Module, data: str | None, samples: int, split: Split, ctx: Context
) -> tuple[Evaluate, str, bool]:
    from slimtorch.eval.perplexity import (
        DEFAULT_DATA,
        find_tokenizer,
        model_context,
        perplexity_of_ids,
    )
    from slimtorch.zoo.austen_lm import load_tokenizer, text_split

    which: Literal["train", "heldout"] = "train" if split == "calibration" else "heldout"
    text = text_split(data or DEFAULT_DATA, which)
    tokenizer = load_tokenizer(find_tokenizer(model))
    context = model_context(model)
    chosen = token_windows(text, tokenizer, max(1, samples // context), context).reshape(-1)

    def evaluate(m: nn.Module) -> float:
        nll, _ = perplexity_of_ids(m, chosen, context, ctx.device)
        return math.exp(nll)

    return evaluate, "perplexity", False


def _whole(
    name: str, model: nn.Module, data: str | None, ctx: Context
) -> tuple[Evaluate, str, bool]:
    """Any other registered evaluator, on its full data (no subsampling)."""
    from slimtorch.eval.quality import get_evaluator

    fn = get_evaluator(name)
    first = fn(model, ctx, data)  # tells the metric's name and direction

    def evaluate(m: nn.Module) -> float:
        return float(fn(m, ctx, data).value)

    return evaluate, first.metric, first.higher_is_better


def task_evaluator(
    loaded: LoadedModel,
    data: str | None = None,
    samples: int | None = None,
    *,
    split: Split = "calibration",
    ctx: Context | None = None,
) -> tuple[Evaluate, str, bool]:
    """``(evaluate, metric, higher_is_better)`` for a scan of ``loaded``: its own metric on a
    fixed subsample of ``samples`` items (``None``: the metric's default, see module doc).

    ``data`` overrides the model's dataset as in ``slimtorch compress --data`` (ignored for
    models whose training data differs from their evaluation data, such as MiniLM).
    """
    if split not in ("calibration", "evaluation"):
        raise UserInputError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    ctx = ctx or Context(progress=False)
    name = loaded.evaluator
    if name is None:
        raise UserInputError(
            f"slimtorch knows no quality metric for {loaded.source}: call"
            " slimtorch.search.sensitivity.scan with your own evaluate(model) -> float"
        )
    spec = (data if loaded.evaluates_training_data else None) or loaded.data
    n = DEFAULT_SAMPLES.get(name, 0) if samples is None else samples
    if name == "accuracy":
        return _accuracy(spec, n, split)
    if name == "lee":
        return _lee(spec, n, split)
    if name == "bpc":
        return _bpc(spec, n, split, ctx)
    if name == "perplexity":
        return _perplexity(loaded.model, spec, n, split, ctx)
    if samples is not None:
        warnings.warn(f"evaluator {name!r} cannot be subsampled; using all its data", stacklevel=2)
    return _whole(name, loaded.model, spec, ctx)
