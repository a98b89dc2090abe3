"""Builtin char-lstm: textgenrnn's weights in PyTorch, its vocabulary and context windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slimtorch.core.errors import UserInputError
from slimtorch.eval.language import sample_positions
from slimtorch.models.registry import MODELS
from slimtorch.zoo import char_lstm
from slimtorch.zoo.evaluators import char_lstm_bpc


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return char_lstm.build(True)


def test_registered() -> None:
    info = MODELS.get("char-lstm")
    assert (info.evaluator, info.data, info.task) == ("bpc", "builtin:austen", "charlm")


def test_architecture_shapes() -> None:
    fresh = char_lstm.build(False)
    assert sum(p.numel() for p in fresh.parameters()) == 462_717
    (ids,) = char_lstm.example_inputs(3)
    assert ids.shape == (3, 40) and ids.dtype == torch.int64 and bool((ids > 0).all())
    assert fresh(ids).shape == (3, 465)


def test_vocab_and_encode() -> None:
    table = char_lstm.vocab()
    assert len(table) == 464 and sorted(table.values()) == list(range(1, 465))
    ids = char_lstm.encode("ab\u2603")
    assert ids.tolist()[:2] == [table["a"], table["b"]] and ids.tolist()[2] == 0


def test_context_windows_left_pad() -> None:
    ids = torch.arange(1, 8)
    win = char_lstm.context_windows(ids, torch.tensor([1, 3, 6]), context=4)
    assert win.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3], [3, 4, 5, 6]]


def test_target_positions_skip_padding_and_start() -> None:
    ids = torch.tensor([5, 0, 7, 8, 0, 9])
    assert char_lstm.target_positions(ids).tolist() == [2, 3, 5]


def test_cudnn_conversion_inverts_the_layout() -> None:
    lstm = nn.LSTM(3, 2)
    units, n_in = 2, 3
    w_ih, w_hh = lstm.weight_ih_l0.detach().numpy(), lstm.weight_hh_l0.detach().numpy()
    # The layout Keras' CuDNNLSTM stores: gate block g of the kernel is W_g reshaped to [in, u].
    kernel = np.concatenate(
        [w_ih[g * units : (g + 1) * units].reshape(n_in, units) for g in range(4)], 1
    )
    rec = np.concatenate(
        [w_hh[g * units : (g + 1) * units].reshape(units, units) for g in range(4)], 1
    )
    bias = np.concatenate([lstm.bias_ih_l0.detach().numpy(), lstm.bias_hh_l0.detach().numpy()])
    state = char_lstm.lstm_from_cudnn(kernel, rec, bias)
    for name, value in state.items():
        assert torch.equal(value, getattr(lstm, name).detach()), name
    with pytest.raises(UserInputError, match="CuDNNLSTM"):
        char_lstm.lstm_from_cudnn(kernel, rec, bias[:-1])


def test_pretrained_bits_per_char_on_heldout_austen(model: nn.Module) -> None:
    ids = char_lstm.encoded_split("builtin:austen", "heldout")
    positions = sample_positions(char_lstm.target_positions(ids), 2_000)
    bpc = char_lstm_bpc(model, ids, positions)
    assert 2.2 < bpc < 3.2  # uniform would be log2(465) = 8.86; a wrong layout gives ~69


def test_zero_attention_scores_average_uniformly() -> None:
    model = char_lstm.build(False)
    with torch.no_grad():
        model.attention.weight.zero_()
        (ids,) = char_lstm.example_inputs(2)
        emb = model.embedding(ids)
        h1, _ = model.rnn_1(emb)
        h2, _ = model.rnn_2(h1)
        expected = model.output(torch.cat([emb, h1, h2], dim=-1).mean(dim=1))
        assert torch.allclose(model(ids), expected, atol=1e-5)
