"""End-to-end Python API: compress -> save -> load is bit-exact and really smaller."""

from __future__ import annotations

import pytest
import torch

import slimtorch as st
from slimtorch.core.errors import ArtifactError, ChecksumError, ConfigError
from slimtorch.formats.sizes import artifact_bytes
from slimtorch.testing.models import example_input, tiny_cnn, tiny_lstm, tiny_transformer

FACTORIES = {"cnn": tiny_cnn, "lstm": tiny_lstm, "transformer": tiny_transformer}

RECIPES = {
    "int8": "int8",
    "int4": "int4",
    "binary": "binary",
    "ternary": "ternary",
    "sparse90-int8": "sparse90-int8",
    "int3-asym-mse": {
        "stages": [
            {
                "method": "quantize.rtn",
                "bits": 3,
                "symmetric": False,
                "signed": False,
                "granularity": "per_group",
                "group_size": 8,
                "observer": "mse",
            }
        ]
    },
    "prune-only": {"stages": [{"method": "prune.magnitude", "sparsity": 0.8, "scope": "global"}]},
    "deep-compression": "deep-compression",  # its training stages are skipped without data
    "kmeans-cross-layer-huffman": {
        "stages": [{"method": "share.kmeans", "bits": 4, "cross_layer": True, "init": "kmeans++"}],
        "format": {"entropy": "huffman"},
    },
}


@pytest.mark.parametrize("family", sorted(FACTORIES))
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_round_trip_is_bit_exact(tmp_path, family: str, recipe: str) -> None:
    model = FACTORIES[family]()
    x = example_input(model)
    result = st.compress(model, RECIPES[recipe])
    with torch.no_grad():
        expected = result.model(x)
    manifest = st.save(result.model, tmp_path / "a")
    assert manifest["architecture"]["kind"] == "factory"
    loaded = st.load(tmp_path / "a", trust_factory=True)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    # the original model is untouched (compress works on a copy)
    fresh = FACTORIES[family]().state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())
    if recipe != "prune-only":
        # tiny models: the JSON manifest is a large share; real ratios are in BENCHMARKS.md
        assert artifact_bytes(tmp_path / "a") < result.dense_bytes


@pytest.mark.parametrize("family", ["cnn", "transformer"])
def test_dynamic_int8_round_trip(tmp_path, family: str) -> None:
    model = FACTORIES[family]()
    x = example_input(model)
    result = st.compress(model, "dynamic-int8")
    with torch.no_grad():
        expected = result.model(x)
        reference = model(x)
    st.save(result.model, tmp_path / "a")
    loaded = st.load(tmp_path / "a", trust_factory=True)
    with torch.no_grad():
        got = loaded(x)
    assert torch.equal(got, expected)
    rel = (got - reference).norm() / reference.norm()
    assert rel < 0.05


def test_existing_dir_refused_and_force_replaces(tmp_path) -> None:
    model = tiny_cnn()
    st.save(model, tmp_path / "a")
    with pytest.raises(ArtifactError, match="force"):
        st.save(model, tmp_path / "a")
    st.save(st.compress(model, "int8").model, tmp_path / "a", force=True)
    assert st.load(tmp_path / "a", trust_factory=True) is not None


def test_corrupted_artifact_is_a_checksum_error(tmp_path) -> None:
    st.save(st.compress(tiny_cnn(), "int8").model, tmp_path / "a")
    f = tmp_path / "a" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        st.load(tmp_path / "a", trust_factory=True)
    f.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ChecksumError):
        st.load(tmp_path / "a", trust_factory=True)


def test_corrupted_huffman_stream_with_rewritten_checksum_is_still_caught(tmp_path) -> None:
    """Even when the file's sha256 in the manifest is made to match, a Huffman stream that
    decodes to other symbols fails its CRC-32: a ChecksumError, never a wrong model."""
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    from slimtorch.models import load_model

    model = st.compress(load_model("builtin:lenet300-fashion").model, "deep-compression").model
    manifest = st.save(model, tmp_path / "a")
    coded = [n for n, m in manifest["tensors"].items() if m.get("codes_coding") == "huffman"]
    assert coded, "the deep-compression preset Huffman-codes the shared weights"
    f = tmp_path / "a" / "model.safetensors"
    parts = load_file(str(f))
    blob = parts[f"{coded[0]}::codes"].clone()
    blob[-1] ^= 0x01  # the last stream byte: still decodes, to other symbols
    parts[f"{coded[0]}::codes"] = blob
    save_file(parts, str(f), metadata={"format": "slimtorch"})
    data = f.read_bytes()
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    man["files"]["model.safetensors"] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises((ChecksumError, ArtifactError)) as err:
        st.load(tmp_path / "a", trust_factory=True)
    assert "CRC-32" in str(err.value) or "stream" in str(err.value)


def test_stage_needing_data_without_data() -> None:
    with pytest.raises(ConfigError, match="need training data"):
        st.compress(tiny_cnn(), {"stages": [{"method": "train.finetune"}]})


def test_optional_stage_skipped_with_warning() -> None:
    with pytest.warns(UserWarning, match="skipped"):
        result = st.compress(tiny_cnn(), "sparse90-int8")
    assert result.stages[1].get("skipped") == "no data"


def test_nm24_preset_skips_incompatible_layers_with_warning(tmp_path) -> None:
    from slimtorch.prune.nm import is_nm_sparse

    model = tiny_cnn()
    with pytest.warns(UserWarning, match="left dense"):
        result = st.compress(model, "nm24")
    assert is_nm_sparse(result.model.fc1.weight, 2, 4)
    assert is_nm_sparse(result.model.conv1d.weight, 2, 4)
    assert not is_nm_sparse(result.model.conv.weight, 2, 4)  # 1 input channel: left dense
    st.save(result.model, tmp_path / "a")
    x = example_input(model)
    with torch.no_grad():
        assert torch.equal(st.load(tmp_path / "a", trust_factory=True)(x), result.model(x))


def test_recipe_as_configs_a_path_or_a_mixed_list(tmp_path) -> None:
    from slimtorch.core.methods import METHODS, load_methods
    from slimtorch.quantize import RTNConfig

    load_methods()
    MagnitudeConfig = METHODS.get("prune.magnitude").config  # the class, wherever it lives

    model = tiny_cnn()
    x = example_input(model)
    want = st.compress(model, {"stages": [{"method": "quantize.rtn", "bits": 4}]})
    for recipe in (
        [RTNConfig(bits=4)],
        RTNConfig(bits=4),
        ({"method": "quantize.rtn", "bits": 4},),
    ):
        got = st.compress(model, recipe)
        assert got.recipe.to_dict() == want.recipe.to_dict()
        with torch.no_grad():
            assert torch.equal(got.model(x), want.model(x))
    (tmp_path / "r.yaml").write_text(want.recipe.to_yaml())
    assert st.compress(model, tmp_path / "r.yaml").recipe.to_dict() == want.recipe.to_dict()
    mixed = st.compress(model, [MagnitudeConfig(sparsity=0.75), {"method": "quantize.rtn"}])
    assert [s["method"] for s in mixed.stages] == ["prune.magnitude", "quantize.rtn"]
    assert mixed.recipe.to_dict()["stages"][0] == {"method": "prune.magnitude", "sparsity": 0.75}
    config = RTNConfig(bits=4)
    result = st.compress(model, [config])
    assert result.recipe.stages[0].config is not config  # the recipe keeps its own copy


def test_recipe_config_errors_name_the_fix() -> None:
    from slimtorch.core.methods import METHODS, load_methods
    from slimtorch.quantize import RTNConfig

    load_methods()
    FuseConfig = METHODS.get("fuse.batchnorm").config  # shared by two methods
    assert METHODS.get("fuse.conv_bn_relu").config is FuseConfig

    class MyRTN(RTNConfig):
        pass

    with pytest.raises(ConfigError, match=r"several methods.*'method': 'fuse\."):
        st.compress(tiny_cnn(), [FuseConfig()])
    with pytest.raises(ConfigError, match=r"stage 2: MyRTN is not the config of a registered"):
        st.compress(tiny_cnn(), [RTNConfig(), MyRTN()])
    with pytest.raises(ConfigError, match="a recipe is a preset name"):
        st.compress(tiny_cnn(), 42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="stage 1: each stage must be"):
        st.compress(tiny_cnn(), ["quantize.rtn"])
