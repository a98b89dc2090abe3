import ast
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import slimtorch.formats.artifact as artifact
from slimtorch.core.errors import ArtifactError, ChecksumError
from slimtorch.formats.artifact import read_artifact, read_manifest, write_artifact
from slimtorch.formats.sizes import artifact_bytes, dense_safetensors_bytes, describe
from slimtorch.formats.state import QuantState, WeightState, apply_state, iter_states, to_matrix

GEN = torch.Generator().manual_seed(0)


def quant(
    shape: torch.Size,
    bits: int,
    scheme: str = "affine",
    granularity: str = "per_channel",
    group_size: int | None = None,
    signed: bool = True,
    zp: bool = False,
    scale_dtype: str = "float32",
) -> QuantState:
    rows, cols = to_matrix(torch.empty(shape)).shape
    sshape = (rows, math.ceil(cols / group_size)) if group_size else (rows, 1)
    hi = {"binary": 1, "ternary": 2}.get(scheme, 2**bits - 1)
    lo = -(2 ** (bits - 1)) if scheme == "affine" and signed else 0
    hi = hi + lo
    codes = torch.randint(lo, hi + 1, tuple(shape), generator=GEN, dtype=torch.int32)
    scale = (torch.rand(sshape, generator=GEN) * 0.1 + 0.01).half().float()
    zero = (
        torch.randint(lo, hi + 1, sshape, generator=GEN, dtype=torch.int32)
        if zp
        else torch.zeros(sshape, dtype=torch.int32)
    )
    return QuantState(
        scheme, bits, signed, granularity, codes, scale, zero, group_size, scale_dtype
    )  # type: ignore[arg-type]


def mask(shape: torch.Size, sparsity: float) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=GEN) >= sparsity


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 16, 3)
        self.bn = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("flags", torch.tensor([True, False, True]))
        self.register_buffer("half_buf", torch.randn(4, generator=GEN).half())
        self.register_buffer("bf_buf", torch.randn(3, generator=GEN).bfloat16())


def compressed_model() -> Tiny:
    torch.manual_seed(0)
    m = Tiny()
    m.bn.num_batches_tracked.fill_(7)
    w = m.conv.weight
    apply_state(m.conv, "weight", WeightState(mask=mask(w.shape, 0.8), quant=quant(w.shape, 8)))
    w = m.fc.weight
    q = quant(
        w.shape,
        4,
        granularity="per_group",
        group_size=8,
        signed=False,
        zp=True,
        scale_dtype="float16",
    )
    apply_state(m.fc, "weight", WeightState(quant=q))
    apply_state(m.fc2, "weight", WeightState(mask=mask(m.fc2.weight.shape, 0.5)))
    # the state of the tied weight is recorded under the second name
    apply_state(
        m.head, "weight", WeightState(quant=quant(m.head.weight.shape, 2, "ternary", signed=False))
    )
    return m


def save(model: nn.Module, path: Path, **kw: object) -> dict:
    states = {f"{n}.{p}": s for n, _, p, s in iter_states(model)}
    return write_artifact(
        path, model.state_dict(), states, {"architecture": {"kind": "test"}}, **kw
    )  # type: ignore[arg-type]


def files_of(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in path.iterdir()}


def test_round_trip_is_exact(tmp_path: Path) -> None:
    model = compressed_model()
    manifest = save(model, tmp_path / "art")
    art = read_artifact(tmp_path / "art")
    sd = model.state_dict()
    assert set(art.tensors) == set(sd)
    for name, t in sd.items():
        assert art.tensors[name].dtype == t.dtype, name
        assert torch.equal(art.tensors[name], t), name
    assert art.manifest == manifest == read_manifest(tmp_path / "art")
    assert manifest["format"] == "slimtorch" and manifest["format_version"] == 1
    assert manifest["architecture"] == {"kind": "test"}
    enc = {n: m["encoding"] for n, m in manifest["tensors"].items()}
    # the sparse conv weight: codes of kept weights plus gap indices beat a bitmask
    assert enc["conv.weight"] == "coded" and enc["fc.weight"] == "quant"
    assert manifest["tensors"]["conv.weight"]["index"] in {"gaps", "csr"}
    assert enc["fc2.weight"] == "bitmask" and enc["fc.bias"] == "dense"
    assert enc["emb.weight"] == "quant" and manifest["tensors"]["emb.weight"]["scheme"] == "ternary"
    assert set(art.states) == {
        "conv.weight",
        "fc.weight",
        "fc2.weight",
        "emb.weight",
        "head.weight",
    }
    for n, _, p, state in iter_states(model):
        back = art.states[f"{n}.{p}"]
        assert (back.mask is None) == (state.mask is None)
        if state.mask is not None:
            assert torch.equal(back.mask, state.mask)
        if state.quant is not None:
            assert back.quant is not None and back.quant.scheme == state.quant.scheme
            assert torch.equal(back.quant.scale, state.quant.scale)


def test_tied_tensors_stored_once(tmp_path: Path) -> None:
    manifest = save(compressed_model(), tmp_path / "art")
    assert manifest["aliases"] == {"head.weight": "emb.weight"}
    assert "head.weight" not in manifest["tensors"]
    stored = load_file(str(tmp_path / "art" / "model.safetensors"))
    assert not any(k.startswith("head.weight::") for k in stored)
    assert "conv.weight::codes" in stored
    art = read_artifact(tmp_path / "art")
    assert art.tensors["head.weight"] is art.tensors["emb.weight"]


def test_resave_of_loaded_artifact_is_identical(tmp_path: Path) -> None:
    save(compressed_model(), tmp_path / "a")
    art = read_artifact(tmp_path / "a")
    write_artifact(tmp_path / "b", art.tensors, art.states, {"architecture": {"kind": "test"}})
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert a["model.safetensors"] == b["model.safetensors"]


def test_files_checksum_recorded(tmp_path: Path) -> None:
    manifest = save(compressed_model(), tmp_path / "art")
    data = (tmp_path / "art" / "model.safetensors").read_bytes()
    assert manifest["files"]["model.safetensors"] == {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    assert (
        artifact_bytes(tmp_path / "art")
        == len(data) + (tmp_path / "art" / "manifest.json").stat().st_size
    )


def test_reserved_and_bad_manifest_keys(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="reserved"):
        write_artifact(tmp_path / "x", {"a": torch.ones(2)}, {}, {"tensors": 1})
    with pytest.raises(ArtifactError, match="JSON"):
        write_artifact(tmp_path / "x", {"a": torch.ones(2)}, {}, {"metadata": {"p": tmp_path}})
    with pytest.raises(ArtifactError, match="no tensor"):
        write_artifact(tmp_path / "x", {"a": torch.ones(2)}, {"b": WeightState()}, {})
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_refused_then_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "art"
    write_artifact(out, {"a": torch.ones(3)}, {}, {})
    with pytest.raises(ArtifactError, match=r"exists; pass --force / force=True"):
        write_artifact(out, {"a": torch.zeros(3)}, {}, {})
    assert torch.equal(read_artifact(out).tensors["a"], torch.ones(3))
    write_artifact(out, {"a": torch.zeros(3)}, {}, {}, overwrite=True)
    assert torch.equal(read_artifact(out).tensors["a"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_path_is_a_file_or_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        write_artifact(tmp_path / "f", {"a": torch.ones(1)}, {}, {}, overwrite=True)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a slimtorch artifact"):
        write_artifact(tmp_path / "home", {"a": torch.ones(1)}, {}, {}, overwrite=True)
    assert (tmp_path / "home" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    write_artifact(tmp_path / "empty", {"a": torch.ones(1)}, {}, {}, overwrite=True)


def test_failure_mid_write_leaves_old_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "art"
    save(compressed_model(), out)
    before = files_of(out)
    real = artifact.write_file
    calls = []

    def failing(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(artifact, "write_file", failing)
    with pytest.raises(ArtifactError, match="No space left"):
        write_artifact(out, {"a": torch.ones(3)}, {}, {}, overwrite=True)
    monkeypatch.setattr(
        artifact, "write_file", lambda p, d: (_ for _ in ()).throw(RuntimeError("boom"))
    )
    with pytest.raises(RuntimeError, match="boom"):
        write_artifact(out, {"a": torch.ones(3)}, {}, {}, overwrite=True)
    assert files_of(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    read_artifact(out)


def test_failure_while_swapping_restores_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "art"
    write_artifact(out, {"a": torch.ones(3)}, {}, {})
    before = files_of(out)
    real = os.replace

    def flaky(src: object, dst: object) -> None:
        if ".tmp-" in str(src):
            raise OSError(5, "I/O error")
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(ArtifactError, match="I/O error"):
        write_artifact(out, {"a": torch.zeros(3)}, {}, {}, overwrite=True)
    monkeypatch.undo()
    assert files_of(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_corruption_is_detected(tmp_path: Path) -> None:
    out = tmp_path / "art"
    save(compressed_model(), out)
    model_file = out / "model.safetensors"
    good = model_file.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    model_file.write_bytes(bytes(flipped))
    with pytest.raises(
        ChecksumError, match=r"model\.safetensors.*corrupted or truncated.*re-created"
    ):
        read_artifact(out)
    model_file.write_bytes(good[:-100])
    with pytest.raises(ChecksumError, match="corrupted or truncated"):
        read_artifact(out)
    model_file.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        read_artifact(out)


def test_manifest_problems(tmp_path: Path) -> None:
    out = tmp_path / "art"
    save(compressed_model(), out)
    mf = out / "manifest.json"
    good = json.loads(mf.read_text())

    def expect(manifest: object, match: str) -> None:
        mf.write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
        with pytest.raises(ArtifactError, match=match) as info:
            read_artifact(out)
        assert not isinstance(info.value, ChecksumError)

    expect("{not json", "not valid JSON")
    expect([1, 2], "not a slimtorch manifest")
    expect({**good, "format_version": 2}, "newer slimtorch.*upgrade")
    expect({**good, "format_version": "1"}, "invalid format_version")
    expect({**good, "files": {"../x": {"sha256": "", "bytes": 1}}}, "malformed files entry")
    expect({k: v for k, v in good.items() if k != "tensors"}, "'tensors' is missing")
    bad = json.loads(json.dumps(good))
    bad["tensors"]["fc.bias"]["parts"].append("bogus")
    expect(bad, r"'fc.bias' is missing parts \['bogus'\]")
    bad = json.loads(json.dumps(good))
    bad["tensors"]["fc.bias"]["encoding"] = "zstd"
    expect(bad, "cannot decode tensor 'fc.bias'.*unknown encoding")
    expect({**good, "aliases": {"x": "nope"}}, "alias 'x' points to unknown")
    mf.unlink()
    with pytest.raises(ArtifactError, match=r"has no manifest\.json"):
        read_artifact(out)
    with pytest.raises(ArtifactError, match="does not exist"):
        read_artifact(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="is a file"):
        read_artifact(out / "model.safetensors")


def test_sparse_int8_artifact_is_under_a_tenth_of_fp32(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128))
    for layer in (model[0], model[2]):
        w = layer.weight
        apply_state(layer, "weight", WeightState(mask=mask(w.shape, 0.9), quant=quant(w.shape, 8)))
    save(model, tmp_path / "art")
    dense = dense_safetensors_bytes(model.state_dict())
    on_disk = artifact_bytes(tmp_path / "art")
    assert on_disk < dense / 10, (on_disk, dense)


def test_dense_safetensors_bytes_is_exact(tmp_path: Path) -> None:
    from safetensors.torch import save_model

    model = Tiny()
    model.half_buf = model.half_buf.float()
    model.bf_buf = model.bf_buf.float()
    save_model(model, str(tmp_path / "m.safetensors"))
    assert (
        dense_safetensors_bytes(model.state_dict()) == (tmp_path / "m.safetensors").stat().st_size
    )
    half = {"w": torch.ones(10, dtype=torch.float16), "n": torch.tensor(3)}
    assert dense_safetensors_bytes(half) == dense_safetensors_bytes(
        {"w": torch.ones(10), "n": torch.tensor(3)}
    )


def test_describe_rows(tmp_path: Path) -> None:
    manifest = save(compressed_model(), tmp_path / "art")
    rows = {r["name"]: r for r in describe(manifest)}
    conv = rows["conv.weight"]
    meta = manifest["tensors"]["conv.weight"]
    assert conv["shape"] == [16, 8, 3] and conv["numel"] == 384
    assert conv["sparsity"] == pytest.approx(1 - meta["nonzero"] / 384)
    assert conv["bits"] == pytest.approx(meta["bytes"] * 8 / 384)
    assert conv["quant_bits"] == 8 and conv["encoding"].startswith("coded:packed+")
    assert rows["fc.weight"]["bits"] == pytest.approx((256 + 32 * 2 * 2 + 32 * 2) * 8 / 512)
    assert rows["head.weight"]["alias_of"] == "emb.weight" and rows["head.weight"]["bytes"] == 0
    assert rows["bn.num_batches_tracked"]["shape"] == []
    del manifest["tensors"]["fc.bias"]["nonzero"]
    with pytest.raises(ArtifactError, match=r"'fc\.bias' is malformed"):
        describe(manifest)


def test_formats_imports_only_core() -> None:
    import slimtorch.formats as formats

    allowed = ("slimtorch.core", "slimtorch.formats")
    for file in Path(formats.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name == "slimtorch":
                    assert isinstance(node, ast.ImportFrom) and [a.name for a in node.names] == [
                        "__version__"
                    ]
                elif name.startswith("slimtorch."):
                    assert name.startswith(allowed), f"{file.name} imports {name}"
