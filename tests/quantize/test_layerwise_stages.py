"""quantize.gptq, prune.sparsegpt and prune.wanda as recipe stages on a tiny Llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.core.errors import ConfigError
from slimtorch.formats.state import get_state, iter_states
from slimtorch.recipe import load_recipe
from slimtorch.testing import models as testing_models
from slimtorch.testing.tasks import TensorTask, tensor_task


def tiny_llama() -> nn.Module:
    return testing_models.tiny_llama(vocab=96, heads=4)


def _tokens(n: int, seed: int) -> torch.Tensor:
    """Random token windows with a little structure (repeated bigrams)."""
    base = torch.randint(0, 48, (n, 16), generator=torch.Generator().manual_seed(seed))
    return torch.stack([base, base + 48], dim=2).reshape(n, 32)


def _token_task() -> TensorTask:
    return tensor_task(_tokens(16, 0), loss="next_token", name="tokens")


def _error(model: nn.Module, reference: nn.Module) -> float:
    ids = _tokens(8, 7)
    with torch.no_grad():
        return float((model(ids).logits - reference(ids).logits).pow(2).mean())


def _stage(method: str, **options: Any) -> dict[str, Any]:
    cal = {"samples": 16, "batch_size": 8}
    return {"stages": [{"method": method, "calibration": cal, **options}]}


def test_gptq_beats_rtn_and_reloads(tmp_path: Path) -> None:
    model = tiny_llama()
    grid = {"bits": 3, "symmetric": False, "granularity": "per_group", "group_size": 32}
    gptq = st.compress(model, _stage("quantize.gptq", **grid), data=_token_task()).model
    rtn_grid = {**grid, "signed": False, "targets": ["re:model\\.layers\\..*"]}
    rtn = st.compress(model, {"stages": [{"method": "quantize.rtn", **rtn_grid}]}).model
    names = {f"{m}.{p}" for m, _, p, _ in iter_states(gptq)}
    assert len(names) == 2 * 7 and "lm_head.weight" not in names
    state = get_state(gptq.model.layers[0].mlp.down_proj, "weight")
    assert state is not None and state.quant is not None and state.quant.group_size == 32
    assert _error(gptq, model) < 0.9 * _error(rtn, model)
    st.save(gptq, tmp_path / "g")
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        assert torch.equal(st.load(tmp_path / "g")(ids).logits, gptq(ids).logits)


def test_sparsegpt_and_wanda_sparsity_and_quality() -> None:
    model = tiny_llama()
    errors = {}
    for method in ("prune.sparsegpt", "prune.wanda"):
        pruned = st.compress(model, _stage(method, sparsity=0.5), data=_token_task()).model
        layer = pruned.model.layers[1].self_attn.o_proj
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
        errors[method] = _error(pruned, model)
        nm = st.compress(model, _stage(method, n=2, m=4), data=_token_task()).model
        w = nm.model.layers[0].mlp.up_proj.weight.reshape(-1, 4)
        assert bool(((w != 0).sum(1) <= 2).all())
    magnitude = st.compress(
        model,
        {
            "stages": [
                {
                    "method": "prune.magnitude",
                    "sparsity": 0.5,
                    "targets": ["re:model\\.layers\\..*"],
                }
            ]
        },
    ).model
    assert errors["prune.sparsegpt"] < _error(magnitude, model)


def test_owl_and_composition() -> None:
    model = tiny_llama()
    owl = st.compress(
        model, _stage("prune.wanda", sparsity=0.5, owl=True, owl_lambda=0.05), data=_token_task()
    )
    per_block = [
        float((owl.model.model.layers[i].mlp.up_proj.weight == 0).float().mean()) for i in range(2)
    ]
    assert sum(per_block) / 2 == pytest.approx(0.5, abs=0.02)
    cal = {"samples": 16, "batch_size": 8}
    both = {
        "stages": [
            {"method": "prune.sparsegpt", "n": 2, "m": 4, "calibration": cal},
            {"method": "quantize.gptq", "bits": 4, "group_size": 32, "calibration": cal},
        ]
    }
    result = st.compress(model, both, data=_token_task()).model
    state = get_state(result.model.layers[0].self_attn.q_proj, "weight")
    assert state is not None and state.mask is not None and state.quant is not None
    w = result.model.layers[0].self_attn.q_proj.weight.reshape(-1, 4)
    assert bool(((w != 0).sum(1) <= 2).all())


def test_layerwise_errors() -> None:
    with pytest.raises(ConfigError, match="static_groups"):
        load_recipe(_stage("quantize.gptq", act_order=True, static_groups=False))
    with pytest.raises(ConfigError, match="n < m"):
        load_recipe(_stage("prune.wanda", n=4, m=4))
    with pytest.raises(ConfigError, match="data"):
        st.compress(tiny_llama(), _stage("quantize.gptq"))


def test_scale_groups_found_without_tables() -> None:
    from slimtorch.quantize.scaling import _Producers, scale_groups

    model = tiny_llama()
    block = model.model.layers[0]
    layers = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    producers = _Producers(block, set(layers))
    with torch.no_grad():
        model(torch.randint(0, 96, (2, 16)))
    producers.remove()
    groups = dict(scale_groups(block, layers, producers))
    assert sorted(groups["input_layernorm"]) == [
        "self_attn.k_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]
    assert sorted(groups["post_attention_layernorm"]) == ["mlp.gate_proj", "mlp.up_proj"]
    assert "self_attn.v_proj" not in groups  # grouped-query attention: v -> o cannot fold
    assert groups["mlp.up_proj"] == ["mlp.down_proj"]  # act(gate(x)) * up(x): up's rows fold
    assert "mlp.gate_proj" not in groups  # the activation is not linear


def test_products_fold_into_the_linear_before() -> None:
    """Linears whose input is a product no module produces: SwiGLU's down_proj takes its scales
    from up_proj, and with one key/value head per query head o_proj takes them from v_proj
    (AutoAWQ's tables, found here by the exact-fold check)."""
    from slimtorch.quantize.scaling import _Producers, scale_groups

    model = testing_models.tiny_llama(vocab=96, heads=4, kv_heads=4)
    block = model.model.layers[0]
    layers = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    producers = _Producers(block, set(layers))
    with torch.no_grad():
        model(torch.randint(0, 96, (2, 16)))
    producers.remove()
    groups = dict(scale_groups(block, layers, producers))
    assert groups["self_attn.v_proj"] == ["self_attn.o_proj"]
    assert groups["mlp.up_proj"] == ["mlp.down_proj"]
    assert "self_attn.q_proj" not in groups and "self_attn.k_proj" not in groups


def test_awq_beats_rtn_and_smoothquant_keeps_outputs() -> None:
    model = tiny_llama()
    with torch.no_grad():  # activation outliers in a few hidden channels
        model.model.embed_tokens.weight[:, :4] *= 25.0
    awq = st.compress(
        model, _stage("quantize.awq", bits=3, group_size=32), data=_token_task()
    ).model
    grid = {"bits": 3, "signed": False, "symmetric": False, "granularity": "per_group"}
    rtn = {
        "method": "quantize.rtn",
        **grid,
        "group_size": 32,
        "targets": ["re:model\\.layers\\..*"],
    }
    plain = st.compress(model, {"stages": [rtn]}).model
    assert _error(awq, model) < _error(plain, model)
    smooth = st.compress(model, _stage("quantize.smoothquant", alpha=0.5), data=_token_task()).model
    assert _error(smooth, model) < 1e-8  # folding alone changes nothing
    norm = smooth.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, model.model.layers[0].input_layernorm.weight)


def test_int4_artifact_runs_on_the_int4_kernel(tmp_path: Path) -> None:
    from slimtorch.runtime.int4 import Int4WeightOnlyLinear

    model = tiny_llama()
    q = st.compress(model, _stage("quantize.gptq", bits=4, group_size=32), data=_token_task()).model
    st.save(q, tmp_path / "q")
    fast = st.load(tmp_path / "q", kernels=True)
    kinds = {type(m).__name__ for m in fast.model.layers.modules()}
    assert "Int4WeightOnlyLinear" in kinds and "Linear" not in kinds
    assert isinstance(fast.model.layers[0].mlp.down_proj, Int4WeightOnlyLinear)
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        want, got = q(ids).logits, fast(ids).logits
    assert float((got - want).norm() / want.norm()) < 2e-2


def _label_task() -> TensorTask:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 32, (16, 10), generator=gen)
    return tensor_task(x, torch.randint(0, 32, (16,), generator=gen), name="labels")


def test_rnn_gates_are_quantized_and_pruned_layerwise(caplog: pytest.LogCaptureFixture) -> None:
    from slimtorch.testing.models import tiny_lstm

    model = tiny_lstm()
    cal = {"samples": 16, "batch_size": 8}
    q = st.compress(
        model,
        {"stages": [{"method": "quantize.gptq", "bits": 4, "group_size": 16, "calibration": cal}]},
        data=_label_task(),
    ).model
    names = {f"{m}.{p}" for m, _, p, _ in iter_states(q)}
    assert {"gru.weight_ih_l0", "gru.weight_hh_l0", "head.weight"} <= names
    assert not any(n.startswith("lstm.") for n in names)  # 2-layer bidirectional: left alone
    assert "single-layer unidirectional" in caplog.text
    pruned = st.compress(
        model,
        {"stages": [{"method": "prune.wanda", "sparsity": 0.5, "calibration": cal}]},
        data=_label_task(),
    ).model
    assert float((pruned.gru.weight_hh_l0 == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
