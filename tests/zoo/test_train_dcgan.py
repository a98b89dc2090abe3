"""The DCGAN training script whose generator bench/bench_data_free.py compresses."""

from __future__ import annotations

import pytest
import torch

from slimtorch.zoo import train_dcgan
from slimtorch.zoo.data_images import fashion_mnist_available


def test_generator_shapes_and_pixels() -> None:
    gen = train_dcgan.generator()
    images = gen(torch.randn(3, train_dcgan.LATENT))
    assert images.shape == (3, 1, 28, 28)
    assert float(images.abs().max()) <= 1.0
    pixels = train_dcgan.to_pixels(torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1))
    assert pixels.dtype == torch.uint8 and pixels.flatten().tolist() == [0, 128, 255]
    assert train_dcgan.Discriminator()(images).shape == (3,)


@pytest.mark.skipif(not fashion_mnist_available("train"), reason="needs Fashion-MNIST train")
def test_training_is_seeded() -> None:
    spec = train_dcgan.GanSpec(steps=3, batch_size=8, seed=0)
    a, losses = train_dcgan.train_dcgan(spec)
    b, _ = train_dcgan.train_dcgan(spec)
    assert len(losses) == 3
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_the_script_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        train_dcgan.main(["--help"])
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out
