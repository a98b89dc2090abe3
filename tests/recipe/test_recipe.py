from pathlib import Path

import pytest
import yaml

from slimtorch.core.errors import ConfigError
from slimtorch.recipe import list_presets, load_recipe, parse_recipe

REQUIRED_PRESETS = {
    "int8", "int4", "dynamic-int8", "sparse90-int8", "nm24", "binary", "ternary", "structured-50",
    "structured-50-distill", "w4a16-rtn", "w4a16-gptq", "w4a16-awq", "w8a8-smoothquant",
    "sparsegpt-50", "sparsegpt-2of4", "wanda-50", "wanda-2of4", "gguf-q4_0-gptq", "gguf-q4_1-gptq",
    "gguf-q8_0-rtn",
}  # fmt: skip


def test_required_presets_ship() -> None:
    presets = list_presets()
    assert set(presets) >= REQUIRED_PRESETS
    assert all(desc for desc in presets.values())


@pytest.mark.parametrize("name", sorted(list_presets()))
def test_every_preset_round_trips_through_yaml(name: str) -> None:
    recipe = load_recipe(name)
    again = parse_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again.to_dict() == recipe.to_dict()
    assert [s.spec.name for s in again.stages] == [s.spec.name for s in recipe.stages]


def test_unknown_method_lists_known_and_nearest() -> None:
    with pytest.raises(ConfigError) as info:
        parse_recipe({"stages": [{"method": "prune.magnitud", "sparsity": 0.5}]})
    msg = str(info.value)
    assert "stage 1" in msg and "did you mean 'prune.magnitude'" in msg and "quantize.rtn" in msg


def test_unknown_option_names_field_and_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        parse_recipe({"stages": [{"method": "prune.magnitude", "sparsty": 0.5}]})
    msg = str(info.value)
    assert "'sparsty'" in msg and "did you mean 'sparsity'" in msg and "targets" in msg


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_sparsity_out_of_range(bad: float) -> None:
    with pytest.raises(ConfigError, match="sparsity"):
        parse_recipe({"stages": [{"method": "prune.magnitude", "sparsity": bad}]})


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bits_out_of_range(bits: int) -> None:
    with pytest.raises(ConfigError, match="bits"):
        parse_recipe({"stages": [{"method": "quantize.rtn", "bits": bits}]})


def test_bad_recipe_shapes() -> None:
    with pytest.raises(ConfigError, match="non-empty"):
        parse_recipe({"stages": []})
    with pytest.raises(ConfigError, match="unknown recipe key"):
        parse_recipe({"stages": [{"method": "quantize.rtn"}], "stagez": []})
    with pytest.raises(ConfigError, match="method"):
        parse_recipe({"stages": [{"bits": 8}]})


def test_yaml_file_and_unknown_preset(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - method: quantize.rtn\n    bits: 4\n    granularity: per_group\n")
    recipe = load_recipe(str(path))
    assert recipe.name == "r" and recipe.stages[0].config.bits == 4  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="did you mean 'int8'"):
        load_recipe("int9")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(str(bad))


def test_optional_data_stage_does_not_require_data() -> None:
    recipe = load_recipe("sparse90-int8")
    assert not recipe.needs_data
    assert parse_recipe({"stages": [{"method": "train.finetune"}]}).needs_data


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_recipes_parse_and_round_trip(path: Path) -> None:
    recipe = load_recipe(str(path))
    assert parse_recipe(yaml.safe_load(recipe.to_yaml())).to_dict() == recipe.to_dict()


def test_unknown_format_option_is_refused() -> None:
    with pytest.raises(ConfigError, match="format"):
        parse_recipe({"stages": [{"method": "quantize.rtn"}], "format": {"entropie": "huffman"}})
    with pytest.raises(ConfigError, match="format"):
        parse_recipe({"stages": [{"method": "quantize.rtn"}], "format": {"entropy": "zstd"}})
    rec = parse_recipe({"stages": [{"method": "quantize.rtn"}], "format": {"entropy": "huffman"}})
    assert (
        rec.format.entropy == "huffman"
        and parse_recipe(yaml.safe_load(rec.to_yaml())).format == rec.format
    )
