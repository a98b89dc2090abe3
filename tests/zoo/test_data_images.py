import gzip
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtorch.core.errors import UserInputError
from slimtorch.zoo import data_images as di

needs_fashion = pytest.mark.skipif(
    not di.fashion_mnist_available("train"), reason="Debian dataset-fashion-mnist not installed"
)


def _write_idx(directory: Path, stem: str, images: np.ndarray, labels: np.ndarray) -> None:
    header = b"\x00\x00\x08\x03" + np.array([len(images), 28, 28], ">u4").tobytes()
    with gzip.open(directory / f"{stem}-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(header + images.tobytes())
    with gzip.open(directory / f"{stem}-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(b"\x00\x00\x08\x01" + np.array([len(labels)], ">u4").tobytes() + labels.tobytes())


def test_idx_reader_round_trips_through_env_dir(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    _write_idx(tmp_path, "train", images, labels)
    monkeypatch.setenv(di.FASHION_DIR_ENV, str(tmp_path))
    assert di.fashion_mnist_available("train")
    assert not di.fashion_mnist_available("test")
    x, y = di.load_fashion_mnist("train")
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(images))
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))


def test_mismatched_idx_files_raise(tmp_path, monkeypatch):
    images = np.zeros((3, 28, 28), np.uint8)
    _write_idx(tmp_path, "t10k", images, np.zeros(4, np.uint8))
    monkeypatch.setenv(di.FASHION_DIR_ENV, str(tmp_path))
    with pytest.raises(UserInputError, match="corrupt or mismatched"):
        di.load_fashion_mnist("test")


def test_fallback_test_split_and_train_error(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(di.FASHION_DIR_ENV, str(tmp_path))
    assert not di.fashion_mnist_available("test")
    with caplog.at_level(logging.WARNING, logger=di.__name__):
        x, y = di.load_fashion_mnist("test")
    assert "2,000 test images bundled" in caplog.text
    assert x.shape == (2000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (2000,) and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.bincount(y).min() > 150  # every class is there
    with pytest.raises(UserInputError, match="dataset-fashion-mnist"):
        di.load_fashion_mnist("train")


def test_no_fallback_file_raises_for_test_too(tmp_path, monkeypatch):
    monkeypatch.setenv(di.FASHION_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(di, "FALLBACK_TEST_FILE", tmp_path / "missing.npz")
    with pytest.raises(UserInputError, match=di.FASHION_DIR_ENV):
        di.load_fashion_mnist("test")


@needs_fashion
def test_fashion_full_splits_and_fallback_matches():
    x, y = di.load_fashion_mnist("train")
    assert x.shape == (60000, 28, 28) and y.shape == (60000,)
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))
    xt, yt = di.load_fashion_mnist("test")
    assert xt.shape == (10000, 28, 28) and torch.equal(torch.bincount(yt), torch.full((10,), 1000))
    with np.load(di.FALLBACK_TEST_FILE, allow_pickle=False) as bundled:
        assert np.array_equal(bundled["images"], xt[:2000].numpy())
        assert np.array_equal(bundled["labels"], yt[:2000].numpy())


def test_mnist5k_splits_are_disjoint_and_deterministic():
    x, y = di.load_mnist5k("train")
    xt, yt = di.load_mnist5k("test")
    assert x.shape == (4000, 28, 28) and xt.shape == (1000, 28, 28)
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.equal(torch.bincount(torch.cat([y, yt])), torch.full((10,), 500))
    assert torch.equal(di.load_mnist5k("train")[1], y)  # same split every call
    y[0] = 99  # callers get a copy, the cache stays intact
    assert int(di.load_mnist5k("train")[1][0]) != 99


def test_load_image_dataset_npz_and_split_keys(tmp_path):
    images = np.arange(5 * 784, dtype=np.int64).reshape(5, 28, 28).astype(np.uint8)
    labels = np.array([0, 1, 2, 3, 9])
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    with pytest.warns(UserWarning, match="test_images"):  # no held-out split: said, not hidden
        x, y = di.load_image_dataset(str(tmp_path / "d.npz"), "test")
    assert torch.equal(x, torch.from_numpy(images)) and y.tolist() == [0, 1, 2, 3, 9]
    np.savez(
        tmp_path / "s.npz",
        train_images=images[:3],
        train_labels=labels[:3],
        test_images=images[3:, None],
        test_labels=labels[3:],
    )
    assert di.load_image_dataset(str(tmp_path / "s.npz"), "train")[0].shape == (3, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert di.load_image_dataset(str(tmp_path / "s.npz"), "test")[1].tolist() == [3, 9]


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.zeros((2, 28, 28), np.uint8)}, "needs `images`"),
        ({"images": np.zeros((2, 28, 28), np.float32), "labels": np.zeros(2, int)}, "uint8"),
        ({"images": np.zeros((2, 32, 32), np.uint8), "labels": np.zeros(2, int)}, "uint8"),
        ({"images": np.zeros((2, 28, 28), np.uint8), "labels": np.zeros(3, int)}, "N = 2"),
        ({"images": np.zeros((2, 28, 28), np.uint8), "labels": np.array([0, 10])}, "0..9"),
        ({"images": np.zeros((2, 28, 28), np.uint8), "labels": np.array([None, 1])}, "plain"),
    ],
)
def test_bad_npz_contents(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserInputError, match=match):
        di.load_image_dataset(str(path), "test")


def test_bad_specs_and_paths(tmp_path):
    with pytest.raises(UserInputError, match="builtin:fashion-mnist, builtin:mnist5k"):
        di.load_image_dataset("builtin:cifar10", "test")
    with pytest.raises(UserInputError, match="does not exist"):
        di.load_image_dataset(str(tmp_path / "nope.npz"), "test")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserInputError, match="cannot read"):
        di.load_image_dataset(str(tmp_path / "junk.npz"), "test")
    with pytest.raises(UserInputError, match="unknown image dataset"):
        di.load_image_dataset(str(tmp_path / "data.csv"), "test")
    with pytest.raises(UserInputError, match="unknown split"):
        di.load_image_dataset(None, "validation")


def test_to_model_input_normalisation():
    images = torch.tensor([[[0] * 28] * 28, [[255] * 28] * 28], dtype=torch.uint8)
    x = di.to_model_input(images)
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full((1, 28, 28), -di.MEAN / di.STD))
    assert torch.allclose(x[1], torch.full((1, 28, 28), (1 - di.MEAN) / di.STD))
