import json

import pytest
import torch
from safetensors.torch import load_file

from slimtorch.core.errors import ArtifactError
from slimtorch.models.registry import MODELS
from slimtorch.zoo import lenet
from slimtorch.zoo import train_lenet as tl
from slimtorch.zoo.data_images import load_fashion_mnist
from slimtorch.zoo.evaluators import image_accuracy

RECORD = json.loads(tl.RECORD_FILE.read_text()) if tl.RECORD_FILE.is_file() else {}


@pytest.mark.parametrize(("cls", "params"), [(lenet.LeNet300, 266_610), (lenet.LeNet5, 431_080)])
def test_shapes_and_param_counts(cls, params):
    model = cls()
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_lenet5_caffe_layout():
    model = lenet.LeNet5()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.endswith("weight")}
    assert shapes == {
        "conv1.weight": (20, 1, 5, 5),
        "conv2.weight": (50, 20, 5, 5),
        "fc1.weight": (500, 800),
        "fc2.weight": (10, 500),
    }


@pytest.mark.parametrize(("name", "floor"), [("lenet5-fashion", 88.0), ("lenet300-fashion", 86.0)])
def test_pretrained_accuracy_on_2000_test_images(name, floor):
    info = MODELS.get(name)
    assert (info.evaluator, info.data, info.task) == (
        "accuracy",
        "builtin:fashion-mnist",
        "classification",
    )
    model = info.build(True)
    assert not model.training
    assert info.example_inputs(2)[0].shape == (2, 1, 28, 28)
    images, labels = load_fashion_mnist("test")
    acc = image_accuracy(model, images[:2000], labels[:2000])
    assert acc > floor
    assert acc == pytest.approx(RECORD[name]["test_accuracy_first2000"], abs=0.1)


@pytest.mark.parametrize("name", ["lenet5-fashion", "lenet300-fashion"])
def test_committed_weights_match_record(name):
    import hashlib

    path = lenet.weights_path(name)
    entry = RECORD[name]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    tensors = load_file(str(path))
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert sum(t.numel() for t in tensors.values()) == entry["params"]
    assert entry["test_images"] == 10000 and entry["train_images"] == 60000


def test_build_without_pretrained_reads_no_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(lenet, "WEIGHTS_DIR", tmp_path)
    info = MODELS.get("lenet5-fashion")
    assert isinstance(info.build(False), lenet.LeNet5)
    with pytest.raises(ArtifactError, match="train_lenet --model lenet5"):
        info.build(True)


def test_train_classifier_learns_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 4
    images = torch.zeros(64, 28, 28, dtype=torch.uint8)
    for c in range(4):  # class c lights up row block c, plus noise
        images[labels == c, 7 * c : 7 * c + 7] = 200
    images = images + torch.randint(0, 40, images.shape, generator=gen, dtype=torch.uint8)
    spec = tl.TrainSpec("lenet300", epochs=3, lr=3e-3, batch_size=16)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = lenet.LeNet300()
        runs.append((tl.train_classifier(model, images, labels, spec), model))
    (losses, model), (losses2, model2) = runs
    assert losses == losses2
    assert torch.equal(model.fc1.weight, model2.fc1.weight)
    assert losses[-1] < 0.2 * losses[0]
    assert tl.top1_percent(model, images, labels) == 100.0


def test_train_and_save_writes_weights_and_record(tmp_path, monkeypatch):
    small = (torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8), torch.arange(40) % 10)
    monkeypatch.setattr(tl, "load_fashion_mnist", lambda split: small)
    out = tmp_path / "w" / "lenet300-fashion.safetensors"
    record = tmp_path / "w" / "training.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"other": {"keep": 1}}))
    entry = tl.train_and_save(tl.TrainSpec("lenet300", epochs=1, batch_size=20), out, record)
    saved = json.loads(record.read_text())
    assert saved["other"] == {"keep": 1}
    assert saved["lenet300-fashion"] == entry
    assert (
        entry["epochs"] == 1 and entry["seed"] == 0 and entry["torch_version"] == torch.__version__
    )
    model = lenet.LeNet300()
    model.load_state_dict(load_file(str(out)))
    assert image_accuracy(model, *small) == pytest.approx(entry["test_accuracy"], abs=0.01)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, "training.json"]
