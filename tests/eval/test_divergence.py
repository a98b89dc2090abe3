"""eval.divergence: per-position KLD, top-1 agreement, percentiles, and the two-model run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtorch.core.errors import UserInputError
from slimtorch.eval.divergence import (
    DivergenceStats,
    compare,
    divergence,
    percentile,
    token_kld,
    token_nll,
    top1_agrees,
)
from slimtorch.eval.perplexity import perplexity_of_ids


def test_kld_by_hand() -> None:
    base = torch.tensor([[0.0, 0.0], [2.0, -1.0]], dtype=torch.float64)
    model = torch.tensor([[math.log(3.0), 0.0], [2.0, -1.0]], dtype=torch.float64)
    kld = token_kld(base, model)
    # p = (1/2, 1/2), q = (3/4, 1/4): 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    assert kld.dtype == torch.float64
    assert kld[0].item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)
    assert kld[1].item() == 0.0
    # not symmetric: KL(q || p) = 3/4 ln(3/2) + 1/4 ln(1/2)
    assert token_kld(model, base)[0].item() == pytest.approx(
        0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-12
    )


def test_kld_is_float64_safe_and_zero_for_identical_logits() -> None:
    logits = torch.randn(3, 5, 1000) * 30  # large logits: float32 softmax would underflow
    assert torch.equal(token_kld(logits, logits.clone()), torch.zeros(15, dtype=torch.float64))
    assert top1_agrees(logits, logits.clone()).all()


def test_top1_and_percentile_and_nll_by_hand() -> None:
    base = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    model = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0]])
    assert top1_agrees(base, model).tolist() == [False, True, True]
    assert percentile(torch.arange(101.0), 99) == pytest.approx(99.0)
    assert percentile(torch.tensor([0.0, 1.0]), 99) == pytest.approx(0.99)
    uniform = torch.zeros(2, 4)
    assert token_nll(uniform, torch.tensor([0, 3])).tolist() == pytest.approx([math.log(4)] * 2)


def test_stats_summary_by_hand() -> None:
    stats = DivergenceStats()
    ids = torch.tensor([[0, 1, 2]])
    base = torch.zeros(1, 3, 4, dtype=torch.float64)  # uniform over 4 tokens: NLL ln 4
    model = torch.zeros(1, 3, 4, dtype=torch.float64)
    model[0, 0, 1] = math.log(3.0)  # q(1) = 3/6 = 1/2 at position 0; position 1 uniform
    stats.add(base, model, ids)
    out = stats.summary()
    # position 0: KL(uniform || (1/6, 1/2, 1/6, 1/6)) = 1/4 (3 ln(3/2) + ln(1/2)); position 1: 0
    k0 = 0.25 * (3 * math.log(1.5) + math.log(0.5))
    assert out["positions"] == 2.0
    assert out["kld_mean"] == pytest.approx(k0 / 2, abs=1e-12)
    assert out["kld_p99"] == pytest.approx(0.99 * k0, abs=1e-12)
    assert out["top1_agreement"] == 0.5  # uniform base: argmax 0; model's argmax 1 at position 0
    assert out["baseline_perplexity"] == pytest.approx(4.0)
    # model NLL: -ln(1/2) at position 0 (target 1), ln 4 at position 1
    assert out["perplexity"] == pytest.approx(math.exp((math.log(2) + math.log(4)) / 2))
    with pytest.raises(UserInputError, match="one shape"):
        token_kld(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(UserInputError, match="no positions"):
        DivergenceStats().summary()


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_compare_identical_and_perturbed_models() -> None:
    base = _tiny_llama()
    windows = torch.randint(0, 96, (5, 16), generator=torch.Generator().manual_seed(1))
    same = divergence(copy.deepcopy(base), base, windows, batch=2)
    assert same["kld_mean"] == 0.0 and same["kld_p99"] == 0.0
    assert same["top1_agreement"] == 1.0 and same["positions"] == 5 * 15
    assert same["perplexity"] == same["baseline_perplexity"]
    nll, _ = perplexity_of_ids(base, windows.reshape(-1), 16)  # GPTQ's protocol, same windows
    assert same["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    noisy = copy.deepcopy(base)
    with torch.no_grad():
        for p in noisy.model.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stats = compare(noisy, base, windows, batch=3)
    out = stats.summary()
    assert 0 < out["kld_mean"] <= out["kld_p99"] and out["top1_agreement"] < 1.0
    assert out["baseline_perplexity"] == same["baseline_perplexity"]
    assert len(stats.kld) == 2  # batch-wise: per-position values only, no logits kept
    with pytest.raises(UserInputError, match="int64"):
        compare(noisy, base, windows.float())
