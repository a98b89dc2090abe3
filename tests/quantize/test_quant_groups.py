"""``group_size: auto`` and the checks of explicit group sizes; tied weights quantized once."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.core.errors import TargetError
from slimtorch.formats.state import get_state
from slimtorch.quantize.groups import auto_group_size, ragged
from slimtorch.recipe import load_recipe
from slimtorch.testing.models import tiny_llama

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    ("features", "size"),
    [
        ({"q": 576, "down": 1536}, 64),  # SmolLM2: 128 does not divide 576
        ({"q": 4096, "down": 11008}, 128),  # Llama-2-7B
        ({"q": 96, "down": 160}, 32),
        ({"q": 100}, 32),  # none divides: the smallest, with a ragged last group
        ({}, 128),
    ],
)
def test_auto_is_the_largest_of_128_64_32_dividing_every_layer(features, size) -> None:
    assert auto_group_size(features) == size


def test_ragged_names_the_layers_a_size_does_not_divide() -> None:
    assert ragged({"a": 576, "b": 1536, "c": 100}, 128) == {"a": 576}
    assert ragged({"a": 96}, 128) == {}  # narrower than a group: one whole group


def _odd_llama() -> nn.Module:
    """Input features 96 (hidden) and 160 (intermediate): groups of 128 or 64 impossible."""
    return tiny_llama(hidden=96, intermediate=160, heads=4, kv_heads=2, vocab=256)


RTN4 = {"method": "quantize.rtn", "bits": 4, "granularity": "per_group", "targets": ["Linear"]}


def test_rtn_auto_chooses_one_size_for_every_layer() -> None:
    model = st.compress(_odd_llama(), {"stages": [{**RTN4, "group_size": "auto"}]}).model
    sizes = {
        get_state(m, "weight").quant.group_size  # type: ignore[union-attr]
        for m in model.modules()
        if isinstance(m, nn.Linear)
    }
    assert sizes == {32}


def test_an_explicit_size_that_does_not_divide_warns_with_the_layer_and_the_fix(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        st.compress(_odd_llama(), {"stages": [{**RTN4, "group_size": 128}]})
    assert "group size 128 does not divide" in caplog.text
    assert "model.layers.0.mlp.down_proj.weight (160)" in caplog.text
    assert "group_size: auto" in caplog.text


@pytest.mark.parametrize(
    "stage", [{"method": "quantize.gptq", "group_size": "auto"}, {"method": "quantize.awq"}]
)
def test_layerwise_methods_resolve_auto_once(stage) -> None:
    from slimtorch.testing.tasks import tensor_task

    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    task = tensor_task(ids, loss="next_token", name="tokens")
    config = {"group_size": "auto", **stage, "calibration": {"samples": 8, "batch_size": 8}}
    model = st.compress(_odd_llama(), {"stages": [config]}, data=task).model
    sizes = {
        get_state(m, "weight").quant.group_size  # type: ignore[union-attr]
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n != "lm_head"
    }
    assert sizes == {32}


def test_group_size_must_be_a_size_or_auto() -> None:
    with pytest.raises(ValueError, match="group_size"):
        load_recipe({"stages": [{**RTN4, "group_size": "big"}]})
    with pytest.raises(ValueError, match="group_size"):
        load_recipe({"stages": [{"method": "quantize.gptq", "group_size": 4}]})


def test_tied_embedding_and_head_are_quantized_once_and_stored_once(tmp_path) -> None:
    model = _odd_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = st.compress(model, "w4a16-rtn").model
    head, embed = get_state(out.lm_head, "weight"), get_state(out.model.embed_tokens, "weight")
    assert head is not None and embed is not None and head.quant is embed.quant
    assert (head.quant.bits, head.quant.granularity) == (8, "per_channel")
    manifest = st.save(out, tmp_path / "a")
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    meta = manifest["tensors"]["model.embed_tokens.weight"]
    assert meta["bits"] == 8 and meta["bytes"] <= 256 * 96 + 256 * 2 + 64  # codes + fp16 scales


def test_missing_skip_skips_a_stage_whose_targets_match_nothing() -> None:
    net = nn.Sequential(nn.Linear(8, 8))
    stage = {"method": "quantize.rtn", "targets": ["Embedding"]}
    with pytest.raises(TargetError, match="no module matched"):
        st.compress(net, {"stages": [stage]})
    out = st.compress(net, {"stages": [{**stage, "missing": "skip"}]}).model
    assert get_state(out[0], "weight") is None


def test_auto_is_ignored_by_per_channel_grids() -> None:
    from slimtorch.quantize.stages.gptq import GPTQConfig

    spec = GPTQConfig(granularity="per_channel", group_size="auto").spec()
    assert (spec.granularity, spec.group_size) == ("per_channel", None)


def test_blockwise_rtn_keeps_the_first_blocks_choice_and_skips_parts_without_targets() -> None:
    from slimtorch.core.context import Context
    from slimtorch.core.methods import Run
    from slimtorch.quantize.stages.rtn import RTNConfig, _rtn_blockwise

    model = _odd_llama()
    run = Run(Context(progress=False))
    options = {k: v for k, v in RTN4.items() if k != "method"}
    linear = _rtn_blockwise(RTNConfig(**options, group_size="auto"), run)
    # missing: error is checked against the whole model by the offloaded run, not per block
    heads = _rtn_blockwise(RTNConfig(targets=["Embedding", "lm_head"]), run)
    for block in model.model.layers:
        for compressor in (linear, heads):
            compressor.compress("", block, {})
    assert get_state(model.model.embed_tokens, "weight") is None
    sizes = {
        get_state(m, "weight").quant.group_size  # type: ignore[union-attr]
        for m in model.model.layers.modules()
        if isinstance(m, nn.Linear)
    }
    assert sizes == {32}
