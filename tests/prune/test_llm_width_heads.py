"""prune.query_heads (issue 18 pt 2): query heads removed inside grouped-query attention groups,
the same count per group; exact on heads that contribute nothing, saved, loaded, exported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import slimtorch as st  # noqa: E402
from slimtorch.core.context import Context  # noqa: E402
from slimtorch.core.errors import ConfigError, UnsupportedModelError  # noqa: E402
from slimtorch.export import export  # noqa: E402
from slimtorch.graph.query_heads import keep_query_heads  # noqa: E402
from slimtorch.testing.models import example_input, tiny_llama, with_example_input  # noqa: E402
from slimtorch.testing.tasks import tensor_task  # noqa: E402

DEAD = [1, 2, 5, 7]  # query heads (of 8; groups of 4) whose output columns are zero


def _model(kv_heads: int = 2, seed: int = 0) -> Any:
    return with_example_input(tiny_llama(layers=2, std=0.1, kv_heads=kv_heads, seed=seed))


def _silence(model: Any) -> None:
    with torch.no_grad():
        for layer in model.model.layers:
            for h in DEAD:
                layer.self_attn.o_proj.weight[:, h * 8 : (h + 1) * 8] = 0


def _logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).logits  # type: ignore[no-any-return]


def test_keeping_the_live_heads_of_each_group_keeps_the_logits() -> None:
    model = _model()
    _silence(model)
    x = example_input(model, batch=2)
    before = _logits(model, x)
    for layer in model.model.layers:
        assert keep_query_heads(layer.self_attn, torch.tensor([[3, 0], [2, 0]])) == 4
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 64) and attn.o_proj.weight.shape == (64, 32)
    assert attn.k_proj.weight.shape == (16, 64) and attn.num_key_value_groups == 2
    torch.testing.assert_close(_logits(model, x), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="unique"):
        keep_query_heads(attn, torch.tensor([[0, 0], [1, 0]]))


@pytest.mark.parametrize("importance", ["taylor", "l2"])
def test_the_stage_finds_the_dead_heads(importance: str) -> None:
    model = _model()
    _silence(model)
    x = example_input(model, batch=4)
    before = _logits(model, x)
    stage = {"method": "prune.query_heads", "ratio": 0.5, "importance": importance}
    out: Any = st.compress(model, [stage], data=tensor_task(x, loss="next_token")).model
    assert out.model.layers[1].self_attn.q_proj.out_features == 32
    torch.testing.assert_close(_logits(out, x), before, rtol=1e-5, atol=1e-5)


def test_with_hidden_pruning_saves_loads_and_exports(tmp_path: Path) -> None:
    model = _model(seed=3)
    x = example_input(model, batch=4)
    recipe = [{"method": "prune.hidden", "ratio": 0.25},
              {"method": "prune.query_heads", "ratio": 0.5}]  # fmt: skip
    out: Any = st.compress(
        model, recipe, data=tensor_task(x, loss="next_token"), ctx=Context(progress=False)
    ).model.eval()
    y = _logits(out, x)
    st.save(out, tmp_path / "a")
    torch.testing.assert_close(_logits(st.load(tmp_path / "a"), x), y, rtol=0, atol=0)
    export(out, to="hf", out=tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]) == (
        4,
        2,
        48,
    )
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", local_files_only=True
    )
    torch.testing.assert_close(_logits(loaded, x), y, rtol=1e-5, atol=1e-5)


def test_refusals() -> None:
    mha = _model(kv_heads=8)  # one query head per key/value head: nothing to thin
    with pytest.raises(UnsupportedModelError, match="grouped-query"):
        st.compress(mha, [{"method": "prune.query_heads", "ratio": 0.5, "importance": "l2"}])
    with pytest.raises(ConfigError, match="--data"):
        st.compress(_model(), [{"method": "prune.query_heads", "ratio": 0.5}])
    with pytest.raises(ConfigError, match="removes no query head"):
        st.compress(_model(), [{"method": "prune.query_heads", "ratio": 0.1, "importance": "l2"}])
