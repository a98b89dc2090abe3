"""Export in the compressed-tensors pack-quantized layout; transformers reloads it exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import slimtorch as st
from slimtorch.core.errors import ArtifactError, UnsupportedModelError
from slimtorch.export.compressed_tensors import (
    export_compressed_tensors,
    pack_int32,
    unpack_int32,
)
from slimtorch.formats.state import get_state
from slimtorch.testing.tasks import TensorTask, tensor_task

transformers = pytest.importorskip("transformers")
TOL = 1e-5  # max |logits difference|; float32 reloads with bit-identical weights (measured 0.0)
ASYM4 = {
    "method": "quantize.rtn",
    "bits": 4,
    "signed": False,
    "symmetric": False,
    "granularity": "per_group",
    "group_size": 32,
    "targets": ["Linear"],
    "ignore": ["lm_head"],
}
SYM8 = {
    "method": "quantize.rtn",
    "bits": 8,
    "signed": True,
    "symmetric": True,
    "granularity": "per_channel",
    "targets": ["Linear"],
    "ignore": ["lm_head"],
}


def _llama(tie: bool = False) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _quantized(*stages: dict) -> nn.Module:
    return st.compress(_llama(), {"stages": list(stages)}).model


def _reload_matches(model: nn.Module, path) -> nn.Module:
    """Load ``path`` with transformers and check logits and every Linear weight."""
    pytest.importorskip("compressed_tensors", reason="transformers needs it to read the layout")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    with torch.no_grad():
        expected, actual = model(ids).logits, reloaded(ids).logits
    assert actual.dtype == torch.float32
    assert (actual - expected).abs().max().item() <= TOL
    weights = dict(reloaded.named_parameters(remove_duplicate=False))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert torch.equal(weights[f"{name}.weight"], module.weight), name
    return reloaded


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_round_trips_and_matches_the_reference(bits: int) -> None:
    lo = -(2 ** (bits - 1))
    codes = torch.randint(lo, -lo, (5, 37), generator=torch.Generator().manual_seed(bits))
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-37 * bits // 32))
    assert torch.equal(unpack_int32(packed, bits, 37), codes.to(torch.int32))
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    assert torch.equal(packed, helpers.pack_to_int32(codes.to(torch.int8), bits))
    ref = helpers.unpack_from_int32(packed, bits, torch.Size([5, 37]))
    assert torch.equal(ref.to(torch.int32), codes.to(torch.int32))


def test_asymmetric_int4_groups_reload_exactly(tmp_path) -> None:
    model = _quantized(ASYM4)
    report = export_compressed_tensors(model, tmp_path / "ct")
    assert report["quantized_layers"] == 14 and report["ignore"] == ["lm_head"]
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(report["files"])
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    w = group["weights"]
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"]) == (4, "int", "group", 32)
    assert w["symmetric"] is False
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj"
    assert f"{key}.weight" not in tensors and "lm_head.weight" in tensors
    assert tensors[f"{key}.weight_packed"].shape == (64, 8)  # 64 codes of 4 bits per row
    assert tensors[f"{key}.weight_scale"].shape == (64, 2)
    assert tensors[f"{key}.weight_scale"].dtype == torch.float32
    assert tensors[f"{key}.weight_zero_point"].shape == (8, 2)  # packed along the rows
    assert tensors[f"{key}.weight_zero_point"].dtype == torch.int32
    assert tensors[f"{key}.weight_shape"].tolist() == [64, 64]
    # unsigned codes and zero points are shifted by 8; (code - zp) is unchanged
    q = get_state(model.get_submodule(key), "weight").quant
    zp = unpack_int32(tensors[f"{key}.weight_zero_point"].t(), 4, 64).t()
    assert torch.equal(zp, q.zero_point.to(torch.int32) - 8)
    assert torch.equal(unpack_int32(tensors[f"{key}.weight_packed"], 4, 64), q.codes.int() - 8)
    _reload_matches(model, tmp_path / "ct")


def test_symmetric_int8_channels_reload_exactly(tmp_path) -> None:
    model = _quantized(SYM8)
    report = export_compressed_tensors(model, tmp_path / "ct")
    (group,) = report["config_groups"].values()
    assert (group["num_bits"], group["strategy"], group["symmetric"]) == (8, "channel", True)
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    key = "model.layers.1.mlp.down_proj"  # [64, 128]
    assert tensors[f"{key}.weight_packed"].shape == (64, 32)
    assert tensors[f"{key}.weight_scale"].shape == (64, 1)
    assert not any(k.endswith("zero_point") for k in tensors)
    _reload_matches(model, tmp_path / "ct")


def test_tensors_equal_the_reference_writer(tmp_path) -> None:
    """compressed-tensors' own compressor, given our dequantized weight and grid, writes the
    same packed codes and zero points."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

    model = _quantized(ASYM4)
    export_compressed_tensors(model, tmp_path / "ct")
    ours = load_file(tmp_path / "ct" / "model.safetensors")
    scheme = ct.quantization.QuantizationScheme(
        targets=["Linear"],
        weights={"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32},
    )
    key = "model.layers.1.mlp.up_proj"
    q = get_state(model.get_submodule(key), "weight").quant
    state = {
        "weight": model.get_submodule(key).weight.detach(),
        "weight_scale": q.scale.float(),
        "weight_zero_point": (q.zero_point.int() - 8).to(torch.int8),
    }
    ref = PackedQuantizationCompressor.compress(state, scheme)
    for name in ("weight_packed", "weight_zero_point", "weight_shape", "weight_scale"):
        assert torch.equal(ours[f"{key}.{name}"], ref[name]), name


def test_mixed_symmetric_grids_form_two_groups(tmp_path) -> None:
    mlp = {**SYM8, "bits": 4, "granularity": "per_group", "group_size": 32}
    mlp["targets"], attn = ["re:.*mlp.*"], {**SYM8, "targets": ["re:.*self_attn.*"]}
    model = _quantized(mlp, attn)
    report = export_compressed_tensors(model, tmp_path / "ct")
    groups = sorted(
        (g["num_bits"], g["strategy"], g["layers"]) for g in report["config_groups"].values()
    )
    assert groups == [(4, "group", 6), (8, "channel", 8)]
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    targets = sorted(t for g in qc["config_groups"].values() for t in g["targets"])
    assert len(targets) == 14 and "model.layers.0.mlp.up_proj" in targets
    _reload_matches(model, tmp_path / "ct")


def test_pruned_then_quantized_keeps_the_zeros(tmp_path) -> None:
    model = _quantized(
        {
            "method": "prune.magnitude",
            "sparsity": 0.5,
            "targets": ["Linear"],
            "ignore": ["lm_head"],
        },
        ASYM4,
    )
    layer = model.get_submodule("model.layers.0.mlp.gate_proj")
    assert (layer.weight == 0).float().mean() >= 0.5
    export_compressed_tensors(model, tmp_path / "ct")
    reloaded = _reload_matches(model, tmp_path / "ct")
    assert torch.equal(
        reloaded.get_submodule("model.layers.0.mlp.gate_proj").weight == 0, layer.weight == 0
    )


def test_tokenizer_files_are_copied(tmp_path) -> None:
    model = _quantized(SYM8)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    model.config._name_or_path = str(tmp_path / "src")
    report = export_compressed_tensors(model, tmp_path / "ct")
    assert report["tokenizer_files"] == ["tokenizer.json"]
    assert (tmp_path / "ct" / "tokenizer.json").read_text() == "{}"


def _rtn(**options) -> dict:
    return {**SYM8, **options}


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([], "no quantized Linear"),
        ([_rtn(bits=3)], "3 bits"),
        ([_rtn(granularity="per_group", group_size=48)], "not a multiple of its group"),
        ([{"method": "quantize.ternary", "targets": ["Linear"]}], "ternary grid"),
        ([{"method": "prune.magnitude", "sparsity": 0.5}], "pruned but not quantized"),
        ([_rtn(targets=["Embedding"])], "no quantized Linear"),
    ],
)
def test_what_the_layout_cannot_express(tmp_path, stages, message) -> None:
    model = st.compress(_llama(), {"stages": stages}).model if stages else _llama()
    with pytest.raises(UnsupportedModelError, match=message):
        export_compressed_tensors(model, tmp_path / "ct")
    assert not list(tmp_path.iterdir())


def test_tied_quantized_head_is_written_dense_and_non_hf_models_are_refused(tmp_path) -> None:
    tied = st.compress(_llama(tie=True), {"stages": [_rtn(ignore=[])]}).model
    report = export_compressed_tensors(tied, tmp_path / "ct")
    assert report["dequantized"] == ["lm_head"] and "lm_head" in report["ignore"]
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied: stored once, under the embedding's name
    assert torch.equal(tensors["model.embed_tokens.weight"], tied.lm_head.weight)
    _reload_matches(tied, tmp_path / "ct")
    plain = st.compress(nn.Sequential(nn.Linear(8, 8)), {"stages": [_rtn(ignore=[])]}).model
    with pytest.raises(UnsupportedModelError, match="not a Hugging Face"):
        export_compressed_tensors(plain, tmp_path / "ct2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


def test_existing_directory_needs_overwrite(tmp_path) -> None:
    model = _quantized(SYM8)
    export_compressed_tensors(model, tmp_path / "ct")
    with pytest.raises(ArtifactError, match="exists"):
        export_compressed_tensors(model, tmp_path / "ct")
    export_compressed_tensors(model, tmp_path / "ct", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


def test_cli_exports_and_checks_the_reload(tmp_path, capsys) -> None:
    pytest.importorskip("compressed_tensors")
    from slimtorch.cli.main import main
    from slimtorch.core.info import update_info
    from slimtorch.models import hf

    model = _llama()
    model.save_pretrained(tmp_path / "src")
    loaded = hf.load_directory(tmp_path / "src")
    update_info(loaded.model, architecture=loaded.architecture)
    st.save(st.compress(loaded.model, {"stages": [ASYM4]}).model, tmp_path / "art")
    argv = ["export", str(tmp_path / "art"), "--to", "compressed-tensors"]
    assert main([*argv, "--out", str(tmp_path / "ct"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] == "transformers" and report["max_abs_diff"] <= TOL
    assert main([*argv, "--out", str(tmp_path / "ct2")]) == 0
    assert "reloaded by transformers: outputs match" in capsys.readouterr().out


def _tokens() -> TensorTask:
    """Calibration windows of random tokens with repeated bigrams (vocabulary 128)."""
    base = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))
    ids = torch.stack([base, base + 64], dim=2).reshape(16, 32)
    return tensor_task(ids, loss="next_token", name="tokens")


@pytest.mark.parametrize(
    "stage",
    [
        {"method": "quantize.gptq", "bits": 4, "group_size": 32, "act_order": True},
        {"method": "quantize.awq", "bits": 4, "group_size": 32},
    ],
)
def test_calibrated_methods_reload_exactly(tmp_path, stage) -> None:
    from slimtorch.core.info import update_info

    model = _llama()
    arch = {"kind": "hf", "class": "LlamaForCausalLM", "config": model.config.to_dict()}
    update_info(model, architecture={**arch, "attn_implementation": "sdpa", "dtype": "float32"})
    recipe = {"stages": [{**stage, "calibration": {"samples": 16, "batch_size": 8}}]}
    quantized = st.compress(model, recipe, data=_tokens()).model
    report = export_compressed_tensors(quantized, tmp_path / "ct")
    (group,) = report["config_groups"].values()
    assert (group["num_bits"], group["strategy"], group["group_size"]) == (4, "group", 32)
    _reload_matches(quantized, tmp_path / "ct")


@pytest.mark.parametrize(
    "grid",
    [
        {"bits": 8, "signed": False, "symmetric": False, "granularity": "per_tensor"},
        {"bits": 4, "signed": True, "symmetric": False, "granularity": "per_channel"},
        {
            "bits": 2,
            "signed": True,
            "symmetric": True,
            "granularity": "per_group",
            "group_size": 16,
        },
    ],
)
def test_other_grids_reload_exactly(tmp_path, grid) -> None:
    model = _quantized(_rtn(**grid))
    report = export_compressed_tensors(model, tmp_path / "ct")
    (group,) = report["config_groups"].values()
    strategy = grid["granularity"].removeprefix("per_")
    assert (group["num_bits"], group["strategy"], group["symmetric"]) == (
        grid["bits"],
        strategy,
        grid["symmetric"],
    )
    _reload_matches(model, tmp_path / "ct")


def test_asymmetric_mixed_grids_warn_that_transformers_cannot_load(tmp_path, caplog) -> None:
    mlp = {**ASYM4, "targets": ["re:.*mlp.*"], "ignore": []}
    model = _quantized(mlp, {**SYM8, "targets": ["re:.*self_attn.*"]})
    export_compressed_tensors(model, tmp_path / "ct")
    assert "cannot load it" in caplog.text
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2 and "dequantize" not in qc


def _odd_llama() -> nn.Module:
    """SmolLM2-like widths that groups of 128 do not divide (in_features 96 and 160), tied."""
    from slimtorch.core.info import update_info

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    arch = {"kind": "hf", "class": "LlamaForCausalLM", "config": cfg.to_dict()}
    update_info(model, architecture={**arch, "attn_implementation": "sdpa", "dtype": "float32"})
    return model


@pytest.mark.parametrize("preset", ["w4a16-rtn", "w4a16-gptq", "w4a16-awq"])
def test_w4a16_presets_export_on_widths_128_does_not_divide(tmp_path, preset) -> None:
    from slimtorch.recipe import load_recipe

    recipe = load_recipe(preset).to_dict()
    if "calibration" in recipe["stages"][0]:
        recipe["stages"][0]["calibration"] = {"samples": 16, "batch_size": 8}
    quantized = st.compress(_odd_llama(), recipe, data=_tokens()).model
    report = export_compressed_tensors(quantized, tmp_path / "ct")
    (group,) = report["config_groups"].values()
    assert (group["num_bits"], group["group_size"], group["layers"]) == (4, 32, 14)
    assert report["dequantized"] == ["model.embed_tokens", "lm_head"]
    assert get_state(quantized.lm_head, "weight").quant.bits == 8  # type: ignore[union-attr]
    _reload_matches(quantized, tmp_path / "ct")
    st.save(quantized, tmp_path / "art")
    reloaded = st.load(tmp_path / "art")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, quantized(ids).logits)


def test_an_explicit_group_size_names_the_layer_and_the_fix(tmp_path) -> None:
    stage = {**ASYM4, "group_size": 128}
    quantized = st.compress(_odd_llama(), {"stages": [stage]}).model
    with pytest.raises(
        UnsupportedModelError, match=r"down_proj.*160 input features.*group_size: auto"
    ):
        export_compressed_tensors(quantized, tmp_path / "ct")
    assert not list(tmp_path.iterdir())
