"""The bundled evaluators, registered in :data:`slimtorch.eval.quality.EVALUATORS`.

Each binds bundled data to the generic maths of :mod:`slimtorch.eval` and follows its protocol
(``samples``: a fixed, evenly spaced subsample; ``split``: calibration or evaluation):

* ``accuracy``: top-1 percent on an image dataset (Fashion-MNIST, builtin:mnist5k, an .npz):
  the test split, or the train split for calibration. ``samples``: images (scan: 1,000).
* ``lee``: the 50 Lee & Pincombe documents embedded by the model (MiniLM's tokenizer, mean
  pooling); Pearson of every pair's cosine against the human scores (0.656 for the fp32
  all-MiniLM-L6-v2). Extras: Spearman and, on all 50, the mean cosine to the fp32 MiniLM's
  embeddings (1.0 = unchanged). One split. ``samples``: documents (scan: all 50).
* ``bpc``: bits per character of the char-lstm (textgenrnn's vocabulary, 40 characters of
  context) on the held-out text (the last 10% of each Austen novel for ``builtin:austen``, of
  the text otherwise), or the train split; :data:`SAMPLE` evenly spaced targets by default.
  ``samples``: targets (scan: 5,000).
* ``perplexity``: GPTQ's protocol (:mod:`slimtorch.eval.perplexity`) on the held-out split of
  text specs under the model's own ``tokenizer.json`` (the one its info records, else the one in
  the directory it came from), or the train split; default
  ``builtin:austen``. ``samples``: tokens, in whole context windows (at least one) cut from
  evenly spaced places of the text (scan: 2,048).

Also registered: :data:`slimtorch.calibrate.text.TOKEN_WINDOWS` ``heldout`` and ``train``
(token windows of a split of a text spec, for the LLM quality suite).
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from slimtorch.calibrate.text import TOKEN_WINDOWS, tokenizer_file
from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.core.info import model_info
from slimtorch.eval import language
from slimtorch.eval.accuracy import accuracy
from slimtorch.eval.perplexity import (
    find_tokenizer,
    model_context,
    perplexity_of_ids,
    perplexity_quality,
)
from slimtorch.eval.quality import EVALUATORS, Evaluator, Measure, Quality, Split, spaced
from slimtorch.eval.similarity import mean_cosine, pair_scores, pearson, spearman
from slimtorch.zoo import austen_lm, char_lstm, data_text, minilm
from slimtorch.zoo.data_images import load_image_dataset, to_model_input

SAMPLE = 20_000  # bpc targets of the standard protocol
PERPLEXITY_DATA = "builtin:austen"
BPC_DATA = "builtin:austen"

Images = tuple[torch.Tensor, torch.Tensor]


def _text_split(split: Split) -> Literal["train", "heldout"]:
    return "train" if split == "calibration" else "heldout"


# accuracy ----------------------------------------------------------------------------------


def image_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Percent (0-100) of uint8 ``images [N, 28, 28]`` whose top-1 prediction equals ``labels``."""
    if len(images) != len(labels):
        raise UserInputError(f"{len(images)} images but {len(labels)} labels; give one per image")
    if len(labels) == 0:
        raise UserInputError("no images to evaluate; the dataset split is empty")
    return accuracy(model, images, labels, batch_size, prepare=to_model_input)


def _images(data: str | None, split: Split) -> Images:
    if split == "evaluation":
        return load_image_dataset(data, "test")
    try:
        return load_image_dataset(data, "train")
    except UserInputError as exc:
        warnings.warn(
            f"no training images for calibration ({exc}); measuring on the test split",
            stacklevel=5,
        )
        return load_image_dataset(data, "test")


def prepare_accuracy(
    model: nn.Module, ctx: Context, data: Any, samples: int | None, split: Split
) -> Measure:
    images, labels = _images(data, split)
    if samples is not None:
        idx = spaced(len(labels), samples)
        images, labels = images[idx], labels[idx]

    def measure(m: nn.Module) -> Quality:
        value = image_accuracy(m, images, labels)
        return Quality("accuracy", value, True, extra={"images": float(len(labels))})

    return measure


# lee ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def reference_embeddings() -> torch.Tensor:
    """Lee-document embeddings of the fp32 pretrained MiniLM (computed once per process)."""
    docs, _ = data_text.load_lee()
    return minilm.embed(minilm.build(True).float(), docs)


def lee_quality(embeddings: torch.Tensor, human: np.ndarray) -> Quality:
    """Quality of ``embeddings`` of the 50 Lee documents against the ``human`` matrix."""
    if embeddings.shape[0] != len(human):
        raise UserInputError(
            f"got {embeddings.shape[0]} embeddings for {len(human)} Lee documents; embed them all"
        )
    sims, scores = pair_scores(embeddings, human)
    extra = {"lee_spearman": spearman(sims, scores)}
    ref = reference_embeddings()
    if ref.shape == embeddings.shape:
        extra["embedding_cosine"] = mean_cosine(embeddings, ref)
    return Quality("lee_pearson", pearson(sims, scores), higher_is_better=True, extra=extra)


def prepare_lee(
    model: nn.Module, ctx: Context, data: Any, samples: int | None, split: Split
) -> Measure:
    if data not in (None, "builtin:lee"):
        raise UserInputError(
            f"evaluator 'lee' runs on builtin:lee only, got data={data!r}; drop --data or pass"
            " builtin:lee"
        )
    docs, human = data_text.load_lee()
    if samples is None:
        return lambda m: lee_quality(minilm.embed(m, docs), human)
    idx = spaced(len(docs), samples).numpy()
    if len(idx) < 3:
        raise UserInputError(f"lee needs at least 3 documents for a correlation, got {len(idx)}")
    sub_docs = [docs[i] for i in idx]
    sub_human = np.asarray(human)[np.ix_(idx, idx)]

    def measure(m: nn.Module) -> Quality:
        sims, scores = pair_scores(minilm.embed(m, sub_docs), sub_human)
        extra = {"lee_spearman": spearman(sims, scores), "documents": float(len(idx))}
        return Quality("lee_pearson", pearson(sims, scores), True, extra=extra)

    return measure


# bpc ---------------------------------------------------------------------------------------


def char_lstm_bpc(
    model: nn.Module, ids: torch.Tensor, positions: torch.Tensor, device: str = "cpu"
) -> float:
    """Mean bits per character predicting ``ids[p]`` from the 40 before (char-lstm windows)."""
    if positions.numel() == 0:
        raise UserInputError(
            "no characters to score: the held-out text has no in-vocabulary targets"
        )
    return language.bits_per_char(model, ids, positions, char_lstm.context_windows, device)


def prepare_bpc(
    model: nn.Module, ctx: Context, data: Any, samples: int | None, split: Split
) -> Measure:
    spec = BPC_DATA if data is None else str(data)
    ids = char_lstm.encoded_split(spec, _text_split(split))
    n = SAMPLE if samples is None else samples
    positions = language.sample_positions(char_lstm.target_positions(ids), n)

    def measure(m: nn.Module) -> Quality:
        bpc = char_lstm_bpc(m, ids, positions, ctx.device)
        extra = {"positions": float(positions.numel())}
        return Quality("bits_per_char", bpc, higher_is_better=False, extra=extra)

    return measure


# perplexity --------------------------------------------------------------------------------


def token_windows(text: str, tokenizer: Any, n: int, context: int) -> torch.Tensor:
    """``[n', context]`` token windows from ``n`` evenly spaced places in ``text``.

    Only the text around each place is tokenized (a scan of a 4M-character split would
    otherwise tokenize it all); windows start at the first token of their chunk.
    """
    chars = context * 16  # byte-level BPE averages 3-5 characters a token: ample
    rows = []
    for start in spaced(max(1, len(text) - chars), n).tolist():
        ids = austen_lm.encode(text[start : start + chars], tokenizer)
        if ids.numel() >= context:
            rows.append(ids[:context])
    if not rows:
        raise UserInputError(
            f"the text has fewer than {context} tokens in any stretch of {chars} characters;"
            " give more text with --data"
        )
    return torch.stack(rows)


def model_tokenizer_path(model: nn.Module) -> Path:
    """``tokenizer.json`` of a causal LM: the one its info records (``--tokenizer`` or the one
    found beside its config.json), else the one in the directory it was loaded from."""
    recorded = model_info(model).tokenizer
    return tokenizer_file(recorded) if recorded else find_tokenizer(model)


def prepare_perplexity(
    model: nn.Module, ctx: Context, data: Any, samples: int | None, split: Split
) -> Measure:
    spec = PERPLEXITY_DATA if data is None else str(data)
    which = _text_split(split)
    tokenizer_path = model_tokenizer_path(model)
    context = model_context(model)
    if samples is None:
        ids = austen_lm.encoded_split(spec, which, str(tokenizer_path))
        chars = len(austen_lm.text_split(spec, which))

        def whole(m: nn.Module) -> Quality:
            nll, tokens = perplexity_of_ids(m, ids, context, ctx.device)
            # bits per character: mean bits per token times this tokenizer's tokens per character
            bpc = nll / math.log(2.0) * ids.numel() / chars
            return perplexity_quality(
                nll, tokens, {"context": float(context), "bits_per_char": bpc}
            )

        return whole
    text = austen_lm.text_split(spec, which)
    tokenizer = austen_lm.load_tokenizer(tokenizer_path)
    chosen = token_windows(text, tokenizer, max(1, samples // context), context).reshape(-1)

    def measure(m: nn.Module) -> Quality:
        nll, tokens = perplexity_of_ids(m, chosen, context, ctx.device)
        return perplexity_quality(nll, tokens, {"context": float(context)})

    return measure


def split_windows(split: Literal["train", "heldout"]) -> Any:
    """``(spec, tokenizer.json, n, length) -> [<= n, length]`` windows of ``split`` of the text."""

    def windows(spec: str, tokenizer_path: Path, n: int, length: int) -> torch.Tensor:
        text = austen_lm.text_split(spec, split)
        return token_windows(text, austen_lm.load_tokenizer(tokenizer_path), n, length)

    return windows


evaluate_accuracy = Evaluator("accuracy", True, prepare_accuracy, scan_samples=1000)
evaluate_lee = Evaluator("lee_pearson", True, prepare_lee, scan_samples=50)
evaluate_bpc = Evaluator("bits_per_char", False, prepare_bpc, scan_samples=5000)
evaluate_perplexity = Evaluator("perplexity", False, prepare_perplexity, scan_samples=2048)

EVALUATORS.add("accuracy", evaluate_accuracy)
EVALUATORS.add("lee", evaluate_lee)
EVALUATORS.add("bpc", evaluate_bpc)
EVALUATORS.add("perplexity", evaluate_perplexity)
TOKEN_WINDOWS.add("heldout", split_windows("heldout"))
TOKEN_WINDOWS.add("train", split_windows("train"))
