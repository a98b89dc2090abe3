"""Builtin ``char-lstm``: textgenrnn's pretrained character language model, in PyTorch.

Embedding(465, 100) -> LSTM(100, 128) -> LSTM(128, 128) -> attention-weighted average over time
of concat[emb, h1, h2] (356 dims) -> Linear(356, 465) logits of the next character. The
attention is textgenrnn's ``AttentionWeightedAverage``: one score per timestep ``x_t . w`` (no
bias, no tanh), softmax over time, weighted sum of ``x_t``.

Weights come from ``textgenrnn/textgenrnn_weights.hdf5`` (Keras CuDNNLSTM, read with h5py; the
package itself is never imported: it pulls TensorFlow). The vocabulary has 464 characters with
indices 1..464; index 0 is padding and stands for unknown characters on input. The input is the
last :data:`CONTEXT` characters, left-padded with 0.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from slimtorch.core.errors import UserInputError
from slimtorch.models.registry import MODELS, BuiltinModel

CONTEXT = 40
NUM_CLASSES = 465
EMBED_DIM = 100
HIDDEN = 128
PAD = 0


class CharLSTM(nn.Module):
    """textgenrnn's architecture: ``forward(ids [B, T] int64) -> logits [B, 465]``."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(NUM_CLASSES, EMBED_DIM)
        self.rnn_1 = nn.LSTM(EMBED_DIM, HIDDEN, batch_first=True)
        self.rnn_2 = nn.LSTM(HIDDEN, HIDDEN, batch_first=True)
        concat = EMBED_DIM + 2 * HIDDEN
        self.attention = nn.Linear(concat, 1, bias=False)
        self.output = nn.Linear(concat, NUM_CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(ids)
        h1, _ = self.rnn_1(emb)
        h2, _ = self.rnn_2(h1)
        seq = torch.cat([emb, h1, h2], dim=-1)
        weights = torch.softmax(self.attention(seq).squeeze(-1), dim=1)
        pooled = (seq * weights.unsqueeze(-1)).sum(dim=1)
        return self.output(pooled)  # type: ignore[no-any-return]


def package_dir() -> Path:
    """textgenrnn's installed files (found without importing it)."""
    spec = importlib.util.find_spec("textgenrnn")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            "builtin:char-lstm needs textgenrnn's data files: `pip install --no-deps textgenrnn h5py`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def vocab() -> dict[str, int]:
    """Character -> index (1..464)."""
    path = package_dir() / "textgenrnn_vocab.json"
    if not path.is_file():
        raise UserInputError(
            f"{path} is missing; reinstall textgenrnn (`pip install --no-deps textgenrnn`)"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    return {str(k): int(v) for k, v in data.items()}


def encode(text: str) -> torch.Tensor:
    """Character indices of ``text`` (int64); characters outside the vocabulary become 0."""
    table = vocab()
    return torch.tensor([table.get(ch, PAD) for ch in text], dtype=torch.int64)


def context_windows(
    ids: torch.Tensor, positions: torch.Tensor, context: int = CONTEXT
) -> torch.Tensor:
    """For each target position ``p``: ``ids[p-context:p]``, left-padded with 0 -> ``[N, context]``."""
    padded = torch.cat([torch.full((context,), PAD, dtype=ids.dtype), ids])
    offsets = torch.arange(context, dtype=torch.int64)
    # ids[p - context + k] sits at padded[p + k].
    return padded[positions.to(torch.int64).unsqueeze(1) + offsets]


def target_positions(ids: torch.Tensor) -> torch.Tensor:
    """Positions usable as next-character targets: ``p >= 1`` and ``ids[p]`` in the vocabulary."""
    positions = torch.arange(ids.numel(), dtype=torch.int64)
    return positions[(ids != PAD) & (positions >= 1)]


def lstm_from_cudnn(
    kernel: np.ndarray, recurrent: np.ndarray, bias: np.ndarray
) -> dict[str, torch.Tensor]:
    """PyTorch LSTM parameters from Keras CuDNNLSTM arrays ``K [in, 4u]``, ``R [u, 4u]``, ``b [8u]``.

    Gate order i, f, c, o is shared, but each gate block is stored in cuDNN's layout: block g of
    ``K`` (``K[:, g*u:(g+1)*u]``) *reshaped* (not transposed) to ``[u, in]`` is PyTorch's rows
    ``g*u:(g+1)*u`` of ``weight_ih``; likewise ``R``. ``b`` holds the input bias then the
    recurrent bias.
    """
    units = recurrent.shape[0]
    if (
        kernel.shape[1] != 4 * units
        or recurrent.shape != (units, 4 * units)
        or bias.shape != (8 * units,)
    ):
        raise UserInputError(
            f"not a CuDNNLSTM weight set: kernel {kernel.shape}, recurrent {recurrent.shape},"
            f" bias {bias.shape}"
        )
    n_in = kernel.shape[0]
    w_ih = [kernel[:, g * units : (g + 1) * units].reshape(units, n_in) for g in range(4)]
    w_hh = [recurrent[:, g * units : (g + 1) * units].reshape(units, units) for g in range(4)]
    return {
        "weight_ih_l0": torch.from_numpy(np.concatenate(w_ih).astype(np.float32)),
        "weight_hh_l0": torch.from_numpy(np.concatenate(w_hh).astype(np.float32)),
        "bias_ih_l0": torch.from_numpy(bias[: 4 * units].astype(np.float32)),
        "bias_hh_l0": torch.from_numpy(bias[4 * units :].astype(np.float32)),
    }


def state_dict_from_keras(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map textgenrnn's HDF5 arrays (``layer/layer/name:0``) to :class:`CharLSTM` parameters."""

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(arrays[name], dtype=np.float32))

    state = {
        "embedding.weight": t("embedding/embedding/embeddings:0"),
        "attention.weight": t("attention/attention/attention_W:0").T.contiguous(),
        "output.weight": t("output/output/kernel:0").T.contiguous(),
        "output.bias": t("output/output/bias:0"),
    }
    for layer in ("rnn_1", "rnn_2"):
        lstm = lstm_from_cudnn(
            arrays[f"{layer}/{layer}/kernel:0"],
            arrays[f"{layer}/{layer}/recurrent_kernel:0"],
            arrays[f"{layer}/{layer}/bias:0"],
        )
        state.update({f"{layer}.{k}": v for k, v in lstm.items()})
    return state


def read_hdf5(path: Path) -> dict[str, np.ndarray]:
    """Every dataset in an HDF5 file, by its path."""
    try:
        import h5py
    except ImportError:
        raise UserInputError(
            "reading textgenrnn's weights needs h5py: `pip install h5py`"
        ) from None
    arrays: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                arrays[name] = obj[()]

        f.visititems(visit)
    return arrays


def build(pretrained: bool) -> nn.Module:
    """The model; ``pretrained=True`` loads textgenrnn's weights, else random initialisation."""
    model = CharLSTM()
    if pretrained:
        path = package_dir() / "textgenrnn_weights.hdf5"
        if not path.is_file():
            raise UserInputError(
                f"{path} is missing; reinstall textgenrnn (`pip install --no-deps textgenrnn`)"
            )
        try:
            state = state_dict_from_keras(read_hdf5(path))
        except KeyError as exc:
            raise UserInputError(
                f"{path} lacks the array {exc}; it is not textgenrnn's weight file"
            ) from None
        model.load_state_dict(state, strict=True)
    return model.eval()


_EXAMPLE_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,"
    " must be in want of a wife."
)


def example_inputs(batch: int) -> tuple[torch.Tensor]:
    """``(ids,)`` int64 ``[batch, 40]``: full windows of a fixed English sentence."""
    ids = encode(_EXAMPLE_TEXT)
    positions = torch.arange(batch, dtype=torch.int64) % (ids.numel() - CONTEXT) + CONTEXT
    return (context_windows(ids, positions),)


MODELS.add(
    "char-lstm",
    BuiltinModel(
        name="char-lstm",
        summary="textgenrnn character LSTM language model (2x LSTM-128 + attention, 0.46M params)",
        build=build,
        evaluator="bpc",
        data="builtin:austen",
        example_inputs=example_inputs,
        task="charlm",
    ),
)


@functools.lru_cache(maxsize=8)
def encoded_split(data: str, split: Literal["train", "heldout"]) -> torch.Tensor:
    """Encoded ``split`` ("train" | "heldout") of the text dataset spec ``data`` (cached)."""
    from slimtorch.calibrate.text import load_text
    from slimtorch.zoo import data_text

    if data == "builtin:austen":
        text = data_text.austen_split(split)
    else:
        text = data_text.split_text(load_text(data), split)
    return encode(text)
