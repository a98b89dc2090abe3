"""slimtorch.save: the manifest's architecture, modules, metadata and resized keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import slimtorch as st
from slimtorch.artifact.save import architecture_of, runtime_modules
from slimtorch.core.errors import ConfigError
from slimtorch.core.info import model_info, update_info
from slimtorch.formats.artifact import read_manifest, write_artifact
from slimtorch.testing.models import tiny_cnn, with_example_input

ARCH = {"kind": "builtin", "name": "lenet5-fashion"}


def test_manifest_carries_the_model_info(tmp_path: Path) -> None:
    model = tiny_cnn()
    update_info(model, architecture=ARCH, source="builtin:lenet5-fashion", evaluator="accuracy")
    update_info(model, input={"shape": [1, 1, 8, 8]})
    manifest = st.save(model, tmp_path / "a")
    assert manifest["architecture"] == ARCH
    assert manifest["modules"] == [] and "resized" not in manifest
    meta = manifest["metadata"]
    assert meta["source"] == "builtin:lenet5-fashion" and meta["evaluator"] == "accuracy"
    assert meta["input"] == {"shape": [1, 1, 8, 8], "dtype": "float32"}
    assert meta["dense_bytes"] > 0  # recorded for every artifact
    assert "architecture" not in meta and "data" not in meta  # unset fields are left out
    assert read_manifest(tmp_path / "a")["metadata"] == meta


def test_metadata_argument_is_validated_and_leaves_the_model_alone(tmp_path: Path) -> None:
    model = tiny_cnn()
    update_info(model, source="a:b")
    manifest = st.save(model, tmp_path / "a", metadata={"source": "c:d", "recipe_name": "mine"})
    assert manifest["metadata"]["source"] == "c:d" and manifest["metadata"]["recipe_name"] == "mine"
    assert model_info(model).source == "a:b" and model_info(model).dense_bytes is None
    with pytest.raises(ConfigError, match=r"'recipe_nam' is not a model info field"):
        st.save(model, tmp_path / "b", metadata={"recipe_nam": "x"})
    assert not (tmp_path / "b").exists()


def test_unknown_architecture_falls_back_to_the_class(tmp_path: Path) -> None:
    model = tiny_cnn()
    assert architecture_of(model) == {"kind": "factory", "ref": "slimtorch.testing.models:TinyCNN"}
    update_info(model, architecture=ARCH)
    assert architecture_of(model) == ARCH


def test_compressed_model_records_recipe_modules_and_entropy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slimtorch.artifact.save as save

    entropies: list[str] = []

    def write(*args: Any) -> dict[str, Any]:
        entropies.append(args[-1])
        return write_artifact(*args)

    monkeypatch.setattr(save, "write_artifact", write)
    recipe = {
        "stages": [{"method": "share.kmeans", "bits": 4}],
        "format": {"entropy": "huffman"},
    }
    model = st.compress(tiny_cnn(), recipe).model
    manifest = st.save(model, tmp_path / "a")
    assert manifest["metadata"]["recipe"]["format"] == {"entropy": "huffman"}
    assert manifest["metadata"]["recipe_name"] == "custom"
    st.save(model, tmp_path / "n", entropy="none")
    assert entropies == ["huffman", "none"]  # the recipe's format, unless given
    with pytest.raises(ConfigError, match="entropy"):
        st.save(model, tmp_path / "b", entropy="zip")
    dynamic = st.compress(tiny_cnn(), "dynamic-int8").model
    modules = runtime_modules(dynamic)
    assert modules and all(m["type"] == "Int8DynamicLinear" for m in modules)
    assert st.save(dynamic, tmp_path / "c")["modules"] == modules


def test_structured_pruning_writes_resized(tmp_path: Path) -> None:
    model = with_example_input(tiny_cnn())
    pruned = st.compress(model, {"stages": [{"method": "prune.structured", "ratio": 0.5}]}).model
    manifest = st.save(pruned, tmp_path / "a")
    assert manifest["resized"]["fc1"]["out_features"] == pruned.fc1.out_features < 32
    text = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert text["resized"] == manifest["resized"]


def test_a_transformers_model_built_in_memory_saves_as_data_and_loads(tmp_path: Path) -> None:
    """No recorded architecture: its config is written (kind hf), never a factory ref."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    manifest = st.save(model, tmp_path / "a")
    assert manifest["architecture"]["kind"] == "hf"
    assert manifest["architecture"]["class"] == "LlamaForCausalLM"
    ids = torch.randint(0, 64, (1, 6))
    loaded = st.load(tmp_path / "a")  # no trust needed: data only
    assert torch.equal(loaded(ids).logits, model(ids).logits)
