"""slimtorch.load: the model info comes back typed; manifests of the previous version still load;
a broken manifest names its bad key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import slimtorch as st
from slimtorch.artifact.load import load_artifact
from slimtorch.core.errors import ArtifactError
from slimtorch.core.info import InputSpec, model_info, update_info
from slimtorch.formats.artifact import write_artifact
from slimtorch.testing.models import example_input, tiny_cnn, with_example_input

FACTORY = {"kind": "factory", "ref": "slimtorch.testing.models:tiny_cnn"}

# metadata as slimtorch wrote it before ModelInfo (unset values written as null)
OLD_METADATA = {
    "source": "slimtorch.testing.models:tiny_cnn",
    "evaluator": None,
    "data": None,
    "input": {"shape": [1, 1, 8, 8], "dtype": "float32"},
    "recipe": {"stages": [{"method": "quantize.rtn", "bits": 8}]},
    "recipe_name": "int8",
    "dense_bytes": 20000,
    "structured": {"flops_before": 10, "flops_after": 5, "params_before": 4, "params_after": 2},
    "distilled_from": "builtin:minilm",
    "kept_layers": None,
    "merge": {"method": "ties", "inputs": [{"model": "a", "weight": 1.0}]},
    "inputs": ["a", "b"],
}


def _write(path: Path, metadata: dict[str, Any], **extra: Any) -> Path:
    manifest = {"architecture": FACTORY, "modules": [], "metadata": metadata, **extra}
    write_artifact(path, tiny_cnn().state_dict(), {}, manifest)
    return path


def test_info_round_trips_through_save_and_load(tmp_path: Path) -> None:
    model = with_example_input(tiny_cnn())
    update_info(model, architecture=FACTORY, source="slimtorch.testing.models:tiny_cnn")
    update_info(model, evaluator="accuracy", distilled_from="t", kept_layers=[0, 2])
    result = st.compress(model, "int8")
    st.save(result.model, tmp_path / "a")
    loaded = st.load(tmp_path / "a", trust_factory=True)
    info = model_info(loaded)
    assert info.architecture == FACTORY and info.evaluator == "accuracy"
    assert info.input == InputSpec(shape=[4, 1, 8, 8], dtype="float32")
    assert info.kept_layers == [0, 2] and info.recipe_name == "int8"
    assert info.dense_bytes == result.dense_bytes
    assert info.metadata() == {**model_info(result.model).metadata()}
    assert not [
        k for k in loaded.__dict__ if k in ("_slimtorch_metadata", "_slimtorch_architecture")
    ]


def test_manifest_of_the_previous_version_loads(tmp_path: Path) -> None:
    art = _write(tmp_path / "old", OLD_METADATA)
    info = model_info(st.load(art, trust_factory=True))
    assert info.source == OLD_METADATA["source"] and info.evaluator is None
    assert info.input is not None and info.input.shape == [1, 1, 8, 8]
    assert info.structured == OLD_METADATA["structured"] and info.merge is not None
    assert info.inputs == ["a", "b"] and info.recipe_name == "int8"
    assert info.metadata() == {k: v for k, v in OLD_METADATA.items() if v is not None}


def test_unknown_metadata_key_names_the_key_and_the_fix(tmp_path: Path) -> None:
    art = _write(tmp_path / "a", {"source": "x", "quantised_by": "me"})
    with pytest.raises(ArtifactError) as err:
        st.load(art, trust_factory=True)
    message = str(err.value)
    assert "unknown metadata key 'quantised_by'" in message
    assert "upgrade slimtorch" in message and 'remove it from the manifest\'s "metadata"' in message
    bad_type = _write(tmp_path / "b", {"dense_bytes": "many"})
    with pytest.raises(ArtifactError, match=r"invalid metadata.*dense_bytes"):
        st.load(bad_type, trust_factory=True)


def test_manifest_without_architecture(tmp_path: Path) -> None:
    write_artifact(tmp_path / "a", tiny_cnn().state_dict(), {}, {"metadata": {}})
    with pytest.raises(ArtifactError, match="manifest has no architecture"):
        load_artifact(tmp_path / "a")


def test_unknown_runtime_module_is_an_artifact_error(tmp_path: Path) -> None:
    modules = [{"name": "fc1", "type": "EvilLinear", "config": {}}]
    art = _write(tmp_path / "a", {}, modules=modules)
    with pytest.raises(ArtifactError, match=r"'EvilLinear'.*names no runtime module"):
        st.load(art, trust_factory=True)
    broken = [{"name": "fc1", "type": "Int8DynamicLinear", "config": {"in_features": "x"}}]
    art = _write(tmp_path / "b", {}, modules=broken)
    with pytest.raises(ArtifactError, match=r"'modules' entry .* does not fit"):
        st.load(art, trust_factory=True)


@pytest.mark.parametrize(
    ("resized", "match"),
    [
        ({"fc1": {"_forward_hooks": 1}}, "cannot set '_forward_hooks'"),
        ({"fc1": {"training": False}}, "cannot set 'training'"),
        ({"fc1": {"out_features": {"eval": "os.system"}}}, "cannot set 'out_features'"),
        ({"fc1": {"weight": 3}}, "cannot set 'weight'"),
        ({"nowhere": {"out_features": 3}}, "names module 'nowhere'"),
    ],
)
def test_resized_entries_set_plain_public_attributes_only(
    tmp_path: Path, resized: dict, match: str
) -> None:
    art = _write(tmp_path / "a", {}, resized=resized)
    with pytest.raises(ArtifactError, match=match):
        st.load(art, trust_factory=True)


def test_resized_entries_rebuild_the_pruned_shapes(tmp_path: Path) -> None:
    model = with_example_input(tiny_cnn())
    pruned = st.compress(model, {"stages": [{"method": "prune.structured", "ratio": 0.5}]}).model
    manifest = st.save(pruned, tmp_path / "a")
    assert json.loads(json.dumps(manifest["resized"])) == manifest["resized"]
    loaded = st.load(tmp_path / "a", model=tiny_cnn)
    assert loaded.fc1.weight.shape == pruned.fc1.weight.shape
    x = example_input(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
