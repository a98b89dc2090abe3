"""ModelInfo: typed, validated where it is set, and the one-release get_metadata view onto it."""

from __future__ import annotations

import copy

import pytest
from torch import nn

from slimtorch.core.errors import ArtifactError, ConfigError
from slimtorch.core.info import (
    MetadataView,
    ModelInfo,
    metadata_keys,
    model_info,
    set_model_info,
    update_info,
)


def test_a_typo_names_the_field_and_the_nearest_one() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(
        ConfigError, match=r"'sorce' is not a model info field \(did you mean 'source'"
    ):
        update_info(model, sorce="builtin:x")
    with pytest.raises(ConfigError, match="dense_bytes"):
        update_info(model, dense_bytes="many")
    with pytest.raises(ConfigError, match=r"input\.dtype"):
        update_info(model, input={"shape": [1, 2], "dtype": "float16"})
    assert model_info(model) == ModelInfo()  # nothing was set by the failed calls


def test_update_is_validated_together_and_in_place() -> None:
    model = nn.Linear(2, 2)
    info = model_info(model)
    update_info(model, source="a:b", input={"shape": [1, 2]})
    assert info.source == "a:b" and info.input is not None and info.input.dtype == "float32"
    with pytest.raises(ConfigError):
        update_info(model, evaluator="accuracy", width="half")
    assert info.evaluator is None  # all or nothing
    with pytest.raises(ValueError, match="width"):
        info.width = "half"  # type: ignore[assignment]  (validated on assignment too)


def test_metadata_leaves_out_architecture_and_unset_fields() -> None:
    info = ModelInfo(architecture={"kind": "builtin", "name": "x"}, source="builtin:x", width=0.5)
    info.input = {"shape": [1, 3], "dtype": "int64"}  # type: ignore[assignment]
    assert info.metadata() == {
        "source": "builtin:x",
        "input": {"shape": [1, 3], "dtype": "int64"},
        "width": 0.5,
    }
    assert "architecture" not in metadata_keys() and "source" in metadata_keys()


def test_updated_returns_a_copy() -> None:
    info = ModelInfo(source="a")
    new = info.updated(source="b", recipe_name="int8")
    assert (info.source, new.source, new.recipe_name) == ("a", "b", "int8")
    with pytest.raises(ConfigError, match="recipe_nme"):
        info.updated(recipe_nme="x")


def test_from_manifest_names_the_bad_key() -> None:
    with pytest.raises(ArtifactError, match=r"unknown metadata key 'evaluater' \(did you mean"):
        ModelInfo.from_manifest({"metadata": {"evaluater": "accuracy"}})
    with pytest.raises(ArtifactError, match="dense_bytes"):
        ModelInfo.from_manifest({"metadata": {"dense_bytes": "x"}})
    with pytest.raises(ArtifactError, match="'architecture'"):
        ModelInfo.from_manifest({"metadata": {"architecture": {"kind": "builtin"}}})
    with pytest.raises(ArtifactError, match="must be an object"):
        ModelInfo.from_manifest({"metadata": [1]})


def test_copies_of_a_model_carry_their_own_info() -> None:
    model = nn.Linear(2, 2)
    update_info(model, recipe={"stages": []})
    twin = copy.deepcopy(model)
    update_info(twin, source="twin")
    assert model_info(model).source is None and model_info(twin).recipe == {"stages": []}
    set_model_info(model, ModelInfo(source="new"))
    assert model_info(model).source == "new"


def test_metadata_view_is_the_old_dict() -> None:
    model = nn.Linear(2, 2)
    meta = MetadataView(model)
    meta.update({"source": "builtin:x", "evaluator": None, "input": {"shape": [2, 2]}})
    assert meta["source"] == "builtin:x" and meta.get("evaluator") is None
    assert meta["input"] == {"shape": [2, 2], "dtype": "float32"}
    assert meta.get("dense_bytes", 0) == 0 and "evaluator" not in meta
    assert dict(meta) == {"source": "builtin:x", "input": {"shape": [2, 2], "dtype": "float32"}}
    assert meta.pop("source") == "builtin:x" and model_info(model).source is None
    with pytest.raises(KeyError):
        del meta["source"]
    with pytest.raises(KeyError, match="valid fields"):
        meta["sourec"] = "x"
    with pytest.raises(KeyError, match="architecture"):
        meta["architecture"] = {"kind": "builtin"}
    with pytest.raises(ConfigError, match="kept_layers"):
        meta["kept_layers"] = "all"
