"""Streaming safetensors/artifact writers: read back exactly by safetensors and read_artifact."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file, save

from slimtorch.core.errors import ArtifactError
from slimtorch.formats.artifact import read_artifact, write_artifact
from slimtorch.formats.encoding import encode_tensor
from slimtorch.formats.streaming import (
    SafetensorsStreamWriter,
    StreamingArtifactWriter,
    StreamingSafetensorsDir,
    TensorSpec,
    dense_meta,
    safetensors_size,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(5, 3, generator=g),
        "layer.bias": torch.randn(5, generator=g).to(torch.float16),
        "emb": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "ids": torch.arange(7),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
    }


def _specs(ts: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in ts.items()]


def test_stream_writer_is_a_valid_safetensors_file() -> None:
    ts = _tensors()
    buf = io.BytesIO()
    writer = SafetensorsStreamWriter(buf, _specs(ts), {"format": "pt"})
    for k, v in ts.items():
        writer.write(k, v)
    sha, size = writer.finish()
    data = buf.getvalue()
    assert size == len(data) == safetensors_size(_specs(ts), {"format": "pt"})
    header_len = int.from_bytes(data[:8], "little")
    assert header_len % 8 == 0
    assert json.loads(data[8 : 8 + header_len])["__metadata__"] == {"format": "pt"}
    back = load(data)
    assert set(back) == set(ts)
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert len(sha) == 64


def test_same_size_as_safetensors_own_writer() -> None:
    ts = {"a": torch.randn(3, 4), "b": torch.randn(7)}
    specs = sorted(_specs(ts), key=lambda s: s.name)
    assert safetensors_size(specs, None) == len(save(ts))


def test_stream_writer_checks_order_shape_and_completeness() -> None:
    ts = _tensors()
    writer = SafetensorsStreamWriter(io.BytesIO(), _specs(ts), None)
    with pytest.raises(ValueError, match=r"expected tensor 'layer\.weight' next"):
        writer.write("layer.bias", ts["layer.bias"])
    with pytest.raises(ValueError, match="announced"):
        writer.write("layer.weight", torch.zeros(3, 5))
    writer.write("layer.weight", ts["layer.weight"])
    with pytest.raises(ValueError, match="not written"):
        writer.finish()
    with pytest.raises(ValueError, match="appears twice"):
        SafetensorsStreamWriter(io.BytesIO(), [TensorSpec("a", (1,), torch.float32)] * 2, None)


def test_artifact_round_trip_matches_write_artifact(tmp_path: Path) -> None:
    ts = _tensors()
    manifest = {"architecture": {"kind": "factory", "ref": "x:y"}, "metadata": {"k": 1}}
    with StreamingArtifactWriter(tmp_path / "art", _specs(ts), manifest) as w:
        for k, v in ts.items():
            w.write(k, v)
    art = read_artifact(tmp_path / "art")
    for k, v in ts.items():
        assert art.tensors[k].dtype == v.dtype and torch.equal(art.tensors[k], v), k
    assert art.manifest["architecture"] == manifest["architecture"]
    assert art.manifest["metadata"] == {"k": 1}
    assert w.manifest == art.manifest
    ref = write_artifact(tmp_path / "ref", {"w": ts["layer.weight"]}, {}, manifest)
    assert set(ref) == set(art.manifest)  # same manifest keys as the in-memory writer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "ref"]  # no temp dirs left


def test_dense_meta_equals_encode_tensor() -> None:
    t = torch.randn(6, 4) + 10  # no zeros: encode_tensor chooses dense
    _, meta = encode_tensor(t)
    assert meta["encoding"] == "dense"
    assert dense_meta(t) == meta


def test_artifact_overwrite_rules_and_failure_leaves_nothing(tmp_path: Path) -> None:
    ts = {"a": torch.ones(2)}
    out = tmp_path / "art"
    with StreamingArtifactWriter(out, _specs(ts), {}) as w:
        w.write("a", ts["a"])
    with pytest.raises(ArtifactError, match="exists"), StreamingArtifactWriter(out, _specs(ts), {}):
        pass
    boom = pytest.raises(RuntimeError, match="boom")
    with boom, StreamingArtifactWriter(out, _specs(ts), {}, overwrite=True):
        raise RuntimeError("boom")
    assert torch.equal(read_artifact(out).tensors["a"], ts["a"])  # the old one is intact
    empty = pytest.raises(ValueError, match="not written")
    with empty, StreamingArtifactWriter(out, _specs(ts), {}, overwrite=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(ArtifactError, match="not a slimtorch artifact"):
        StreamingArtifactWriter(other, _specs(ts), {}, overwrite=True).__enter__()
    with pytest.raises(ArtifactError, match="reserved"):
        StreamingArtifactWriter(out, _specs(ts), {"tensors": {}})
    with pytest.raises(ArtifactError, match="::"):
        StreamingArtifactWriter(out, [TensorSpec("a::b", (1,), torch.float32)], {})


def test_plain_directory_writer(tmp_path: Path) -> None:
    ts = _tensors()
    out = tmp_path / "hf"
    files = {"config.json": b'{"a": 1}'}
    with StreamingSafetensorsDir(out, _specs(ts), files) as w:
        for k, v in ts.items():
            w.write(k, v)
    back = load_file(out / "model.safetensors")
    assert all(torch.equal(back[k], v) for k, v in ts.items())
    assert (out / "config.json").read_bytes() == b'{"a": 1}'
    assert w.bytes == (out / "model.safetensors").stat().st_size
    with pytest.raises(ArtifactError, match="plain file name"):
        StreamingSafetensorsDir(out, [], {"../x": b""})
