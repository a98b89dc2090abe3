"""eval.perplexity: GPTQ's non-overlapping-window protocol on any HF causal LM."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.core.errors import UnsupportedModelError, UserInputError
from slimtorch.eval import perplexity
from slimtorch.zoo.austen_lm import from_config, llama_config

VOCAB = 300
CONTEXT = 32


def tiny_llama(vocab: int = VOCAB) -> nn.Module:
    torch.manual_seed(0)
    cfg = llama_config(
        vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
    )
    return from_config(cfg)


def gptq_reference(model: nn.Module, ids: torch.Tensor, seqlen: int) -> float:
    """IST-DASLab/gptq's llama_eval loop, verbatim in spirit: nll_i = loss_i * seqlen."""
    nsamples = ids.numel() // seqlen
    nlls = []
    for i in range(nsamples):
        batch = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
        logits = model(batch).logits.float()
        loss = F.cross_entropy(logits[0, :-1], batch[0, 1:])
        nlls.append(loss * seqlen)
    return math.exp(float(torch.stack(nlls).sum()) / (nsamples * seqlen))


def test_random_llama_is_near_uniform() -> None:
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (10 * CONTEXT + 7,), generator=torch.Generator().manual_seed(1))
    nll, tokens = perplexity.perplexity_of_ids(model, ids, CONTEXT, batch=3)
    assert tokens == 10 * (CONTEXT - 1)  # the partial last window is dropped
    assert math.exp(nll) == pytest.approx(VOCAB, rel=0.03)


def test_matches_gptq_reference_loop() -> None:
    model = tiny_llama()
    # a learnable pattern so the numbers differ from uniform: train a few steps on it
    ids = (torch.arange(8 * CONTEXT) * 7 % 50).to(torch.int64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train = ids[: 4 * CONTEXT].reshape(4, CONTEXT)
    for _ in range(5):
        logits = model(train).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), train[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    nll, _ = perplexity.perplexity_of_ids(model, ids, CONTEXT, batch=3)
    with torch.no_grad():
        ref = gptq_reference(model, ids, CONTEXT)
    assert math.exp(nll) == pytest.approx(ref, rel=1e-5)
    assert math.exp(nll) < VOCAB / 2


def test_window_nll_uniform() -> None:
    logits = torch.zeros(2, 5, 10)
    ids = torch.zeros(2, 5, dtype=torch.int64)
    assert float(perplexity.window_nll(logits, ids)) == pytest.approx(8 * math.log(10))


def test_model_context_reads_config_and_caps() -> None:
    model = tiny_llama()
    assert perplexity.model_context(model) == CONTEXT
    assert perplexity.model_context(model, cap=16) == 16
    assert perplexity.model_context(nn.Linear(2, 2)) == perplexity.MAX_CONTEXT


def test_bad_inputs() -> None:
    model = tiny_llama()
    with pytest.raises(UserInputError, match="fewer than one window"):
        perplexity.perplexity_of_ids(model, torch.arange(10), CONTEXT)
    with pytest.raises(UserInputError, match=">= 2"):
        perplexity.perplexity_of_ids(model, torch.arange(10), 1)
    with pytest.raises(UnsupportedModelError, match="logits"):
        flat = nn.Sequential(nn.Embedding(VOCAB, 4), nn.Flatten()).eval()  # 2-D output
        perplexity.perplexity_of_ids(flat, torch.arange(64), 8)


def test_window_nll_in_row_chunks_equals_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(1))
    whole = F.cross_entropy(logits[:, :-1].reshape(-1, 11).double(), ids[:, 1:].reshape(-1),
                            reduction="sum")  # fmt: skip
    monkeypatch.setattr(perplexity, "LOGIT_BUDGET", 11 * 4)  # 4 rows a chunk
    assert perplexity.window_nll(logits, ids).item() == pytest.approx(whole.item(), rel=1e-12)
