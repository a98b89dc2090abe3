import hashlib
import itertools
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from slimtorch.core.errors import ArtifactError
from slimtorch.models.registry import MODELS, load_model
from slimtorch.zoo import lenet, resnet
from slimtorch.zoo import train_resnet as tr
from slimtorch.zoo.data_images import load_fashion_mnist
from slimtorch.zoo.evaluators import image_accuracy
from slimtorch.zoo.train_lenet import RECORD_FILE, top1_percent

NAME = "resnet18-fashion"
RECORD = json.loads(RECORD_FILE.read_text()) if RECORD_FILE.is_file() else {}


def test_resnet18_layout_and_param_count():
    model = resnet.ResNet18Small()
    assert sum(p.numel() for p in model.parameters()) == 1_574_770
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(convs) == 1 + 8 * 2 + 3  # stem, two per block, three 1x1 shortcuts
    assert (convs["conv1"].kernel_size, convs["conv1"].stride) == ((3, 3), (1, 1))
    for stage, width in zip(range(1, 5), (24, 48, 96, 192)):
        first = convs[f"layer{stage}.0.conv1"]
        assert first.out_channels == width
        assert first.stride == ((1, 1) if stage == 1 else (2, 2))
        shortcut = f"layer{stage}.0.downsample.0"
        assert (shortcut in convs) == (stage > 1)
        assert f"layer{stage}.1.downsample.0" not in convs
    assert convs["layer3.0.downsample.0"].kernel_size == (1, 1)
    assert model.fc.in_features == 192 and not any(
        isinstance(m, nn.MaxPool2d) for m in model.modules()
    )


def test_feature_map_sizes():
    model = resnet.ResNet18Small(width=4).eval()
    sizes = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[1:]))
        )
    model(torch.zeros(1, 1, 28, 28))
    assert sizes == {
        "layer1": (4, 28, 28),
        "layer2": (8, 14, 14),
        "layer3": (16, 7, 7),
        "layer4": (32, 4, 4),
    }


def test_registered_like_lenet():
    info = MODELS.get(NAME)
    assert (info.evaluator, info.data, info.task) == (
        "accuracy",
        "builtin:fashion-mnist",
        "classification",
    )
    assert info.example_inputs(3)[0].shape == (3, 1, 28, 28)
    loaded = load_model(f"builtin:{NAME}")
    assert isinstance(loaded.model, resnet.ResNet18Small) and not loaded.model.training
    assert loaded.architecture == {"kind": "builtin", "name": NAME}


def test_pretrained_accuracy_on_2000_test_images():
    model = MODELS.get(NAME).build(True)
    images, labels = load_fashion_mnist("test")
    acc = image_accuracy(model, images[:2000], labels[:2000])
    assert acc > 90.0
    assert acc == pytest.approx(RECORD[NAME]["test_accuracy_first2000"], abs=0.1)


def test_committed_weights_match_record():
    path = lenet.weights_path(NAME)
    entry = RECORD[NAME]
    assert path.stat().st_size < 7_000_000
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    tensors = load_file(str(path))
    model = resnet.ResNet18Small()
    assert set(tensors) == set(model.state_dict())
    params = {n for n, _ in model.named_parameters()}
    assert sum(t.numel() for k, t in tensors.items() if k in params) == entry["params"]
    assert all(t.dtype == torch.float32 for k, t in tensors.items() if "num_batches" not in k)
    assert entry["test_images"] == 10000 and entry["train_images"] == 60000
    assert entry["test_accuracy"] >= 91.0


def test_build_without_pretrained_reads_no_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(lenet, "WEIGHTS_DIR", tmp_path)
    info = MODELS.get(NAME)
    assert isinstance(info.build(False), resnet.ResNet18Small)
    with pytest.raises(ArtifactError, match="train_resnet --out"):
        info.build(True)


def test_augment_shifts_and_flips_seeded():
    images = torch.zeros(64, 28, 28, dtype=torch.uint8)
    images[:, 10:14, 5:9] = 255  # a 4x4 square away from the border
    out = tr.augment(images, 2, True, torch.Generator().manual_seed(0))
    again = tr.augment(images, 2, True, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and out.dtype == torch.uint8
    assert (out == 255).sum(dim=(1, 2)).tolist() == [16] * 64  # moved, never cut
    rows = (out == 255).any(dim=2).float().argmax(dim=1)
    assert set(rows.tolist()) == {8, 9, 10, 11, 12}
    cols = (out == 255).any(dim=1).float().argmax(dim=1)
    flipped = cols >= 14  # the square was on the left; a flip puts it on the right
    assert 10 < int(flipped.sum()) < 54
    assert torch.equal(tr.augment(images, 0, False, torch.Generator()), images)


def test_warmup_cosine():
    values = [tr.warmup_cosine(s, 100, 10) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))
    assert values[-1] < 0.001


def _toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 4
    images = torch.zeros(64, 28, 28, dtype=torch.uint8)
    for c in range(4):  # class c lights up row block c (invariant to flips and small shifts)
        images[labels == c, 7 * c : 7 * c + 7] = 200
    return images + torch.randint(0, 40, images.shape, generator=gen, dtype=torch.uint8), labels


def test_train_resnet_learns_and_is_seeded():
    images, labels = _toy_data()
    spec = tr.ResNetTrainSpec(epochs=10, lr=0.2, batch_size=16, width=4, label_smoothing=0.0)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = resnet.ResNet18Small(width=4)
        runs.append((tr.train_resnet(model, images, labels, spec), model))
    (losses, model), (losses2, model2) = runs
    assert losses == losses2
    assert torch.equal(model.conv1.weight, model2.conv1.weight)
    assert losses[-1] < 0.1 * losses[0]
    assert not model.training and model.conv1.weight.is_contiguous()
    assert top1_percent(model, images, labels) == 100.0


def test_train_and_save_writes_weights_and_record(tmp_path, monkeypatch):
    small = (torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8), torch.arange(32) % 10)
    monkeypatch.setattr(tr, "load_fashion_mnist", lambda split: small)
    out = tmp_path / "w" / f"{NAME}.safetensors"
    record = tmp_path / "w" / "training.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"lenet5-fashion": {"keep": 1}}))
    spec = tr.ResNetTrainSpec(epochs=1, batch_size=16, width=4)
    entry = tr.train_and_save(spec, out, record)
    saved = json.loads(record.read_text())
    assert saved["lenet5-fashion"] == {"keep": 1}
    assert saved[NAME] == entry
    assert entry["epochs"] == 1 and entry["width"] == 4 and entry["arch"] == "resnet18"
    model = resnet.ResNet18Small(width=4)
    model.load_state_dict(load_file(str(out)))
    assert image_accuracy(model, *small) == pytest.approx(entry["test_accuracy"], abs=0.01)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, "training.json"]
