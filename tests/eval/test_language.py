"""eval.language: bits per character of a next-character model over windows."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimtorch.core.errors import UserInputError
from slimtorch.eval import language


def test_sample_positions_even_and_deterministic() -> None:
    cand = torch.arange(100, 200)
    assert language.sample_positions(cand, 5).tolist() == [100, 125, 150, 174, 199]
    assert torch.equal(language.sample_positions(cand, 1000), cand)


def test_nll_bits_uniform() -> None:
    logits = torch.zeros(4, 465)
    bits = language.nll_bits(logits, torch.tensor([1, 2, 3, 4]))
    assert float(bits) == pytest.approx(4 * math.log2(465))


class NextIsPrevious(nn.Module):
    """Puts probability 1/2 on the id before the target (the last of its window), the rest
    spread evenly over the other 3 of a 4-id vocabulary."""

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        assert not self.training
        probs = torch.full((len(windows), 4), 1 / 6)
        probs[torch.arange(len(windows)), windows[:, -1]] = 0.5
        return probs.log()


def _previous(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return ids[positions - 1].unsqueeze(1)


def test_bits_per_char_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    positions = torch.arange(1, 7)  # repeats at 1, 3, 5 (1 bit); changes at 2, 4, 6
    monkeypatch.setattr(language, "BATCH", 4)  # batches of 4 and 2 give the same sum
    model = NextIsPrevious().train()
    bpc = language.bits_per_char(model, ids, positions, _previous)
    assert bpc == pytest.approx((3 * 1.0 + 3 * math.log2(6)) / 6)
    assert model.training  # mode restored


def test_bits_per_char_without_positions() -> None:
    with pytest.raises(UserInputError, match="no characters"):
        language.bits_per_char(
            NextIsPrevious(), torch.tensor([1, 2]), torch.tensor([], dtype=torch.int64), _previous
        )
