"""The teacher-forced chunked feed that measures a quantized KV cache: through the float cache it
is the plain forward pass; quantized caches diverge, more at fewer bits; nothing quantized
(window longer than the windows) is exact."""

from __future__ import annotations

import pytest
import torch

from slimtorch.core.errors import UserInputError
from slimtorch.eval.kv_quality import compare_cached, fed_logits, new_cache
from slimtorch.runtime.kv_cache import KVQuantConfig
from slimtorch.testing.models import tiny_llama


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama(layers=2, heads=2, kv_heads=1, std=0.1, max_positions=256)


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(0))


def test_the_float_cache_feed_is_the_forward_pass(
    model: torch.nn.Module, windows: torch.Tensor
) -> None:
    ids = windows[:1]
    with torch.no_grad():
        whole = model(ids).logits
        pieces = list(fed_logits(model, ids, new_cache(model, None), 16, 8))
    assert [a for a, _ in pieces] == [0, *range(16, 96, 8)]
    fed = torch.cat([logits for _, logits in pieces], dim=1)
    torch.testing.assert_close(fed, whole, atol=1e-4, rtol=1e-4)
    stats, _ = compare_cached(model, model, windows, None, (16, 8))
    summary = stats.summary()
    assert summary["kld_mean"] == 0.0 and summary["top1_agreement"] == 1.0
    assert summary["positions"] == 2 * (95 - 16)  # positions 16..94 of each window


def test_quantized_caches_diverge_more_at_fewer_bits(
    model: torch.nn.Module, windows: torch.Tensor
) -> None:
    kld = {}
    for bits in (8, 4, 2):
        stats, held = compare_cached(model, model, windows, KVQuantConfig(bits, 8, 4), (16, 8))
        kld[bits] = stats.summary()["kld_mean"]
        assert held < 512  # float32 cache: 2 layers x 2 x 32 channels x 4 bytes
    assert 0 < kld[8] < kld[4] < kld[2]
    assert kld[8] < 1e-4


def test_nothing_quantized_is_exact(model: torch.nn.Module, windows: torch.Tensor) -> None:
    stats, held = compare_cached(model, model, windows, KVQuantConfig(2, 8, 128), (16, 8))
    assert stats.summary()["kld_mean"] == 0.0 and held == 512


def test_bad_feeds_are_refused(model: torch.nn.Module, windows: torch.Tensor) -> None:
    with pytest.raises(UserInputError, match="prefill"):
        compare_cached(model, model, windows, None, (95, 8))
    with pytest.raises(UserInputError, match="chunk"):
        compare_cached(model, model, windows, None, (16, 0))
