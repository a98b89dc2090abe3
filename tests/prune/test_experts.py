"""prune.experts: REAP saliency, experts removed with the router resized, reloads everywhere."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import slimtorch as st
from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.prune.experts import SaliencySums, experts_to_keep
from slimtorch.runtime.moe import UnfusedExperts
from slimtorch.testing.models import tiny_llama, tiny_moe
from slimtorch.testing.tasks import tensor_task


def test_reap_saliency_is_the_mean_gate_times_output_norm() -> None:
    sums = SaliencySums(3)
    sums.add(0, torch.tensor([0.5, 1.0]), torch.tensor([[3.0, 4.0], [0.0, 2.0]]))  # 2.5, 2.0
    sums.add(2, torch.tensor([0.25]), torch.tensor([[0.0, 8.0]]))  # 2.0
    torch.testing.assert_close(sums.saliency(), torch.tensor([2.25, 0.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(
        sums.saliency("frequency"), torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    )
    assert experts_to_keep(sums.saliency(), 1) == [0, 2]  # the unrouted expert goes first
    assert experts_to_keep(sums.saliency(), 2) == [0]
    assert experts_to_keep(torch.zeros(4), 2) == [0, 1]  # ties: higher index dropped first
    with pytest.raises(ValueError, match="cannot drop 3 of 3"):
        experts_to_keep(sums.saliency(), 3)


def _data() -> tuple[torch.Tensor, object]:
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    return ids, tensor_task(ids, loss="next_token")


def _recipe(**options: object) -> dict:  # type: ignore[type-arg]
    stage = {"method": "prune.experts", "calibration": {"samples": 4, "batch_size": 2}}
    return {"stages": [{**stage, **options}]}


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_pruned_experts_reload_in_slimtorch_and_transformers(kind: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import transformers

    from slimtorch.export import export

    model = tiny_moe(kind, experts=8, top_k=2)
    ids, task = _data()
    result = st.compress(model, _recipe(count=3), data=task)
    experts = result.model.get_submodule("model.layers.0.mlp.experts")
    assert isinstance(experts, UnfusedExperts) and experts.num_experts == 5
    assert result.model.get_submodule("model.layers.1.mlp.gate").weight.shape == (5, 64)
    with torch.no_grad():
        pruned = result.model(ids).logits
        dense = model(ids).logits
    assert torch.isfinite(pruned).all() and not torch.allclose(pruned, dense)
    st.save(result.model, tmp_path / "art")
    loaded = st.load(tmp_path / "art")
    export(loaded, to="hf", out=tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, pruned)
        torch.testing.assert_close(again(ids).logits, pruned, rtol=1e-4, atol=1e-5)
    key = "num_local_experts" if kind == "mixtral" else "num_experts"
    assert getattr(again.config, key) == 5


def test_kept_experts_keep_their_weights_and_router_rows() -> None:
    model = tiny_moe("mixtral", experts=8, top_k=2)
    _, task = _data()
    result = st.compress(model, _recipe(fraction=0.25, criterion="frequency"), data=task)
    kept = result.model.get_submodule("model.layers.0.mlp.experts")
    assert kept.num_experts == 6
    fused = model.model.layers[0].mlp.experts.gate_up_proj  # the input model is not modified
    rows = kept.experts()[0].gate_proj.weight.shape[0]
    found = [
        j
        for e in kept.experts()
        for j in range(8)
        if torch.equal(e.gate_proj.weight, fused[j, :rows])
    ]
    assert len(found) == 6 and found == sorted(found)  # six distinct originals, in order
    router = result.model.get_submodule("model.layers.0.mlp.gate").weight
    torch.testing.assert_close(router, model.model.layers[0].mlp.gate.weight[found])


def test_bad_amounts_and_dense_models_are_refused() -> None:
    _, task = _data()
    with pytest.raises(ConfigError, match="picks 2"):
        st.compress(tiny_moe("mixtral", experts=4, top_k=2), _recipe(count=3), data=task)
    with pytest.raises(ConfigError, match="exactly one of fraction"):
        st.compress(tiny_moe("mixtral"), _recipe(count=1, fraction=0.5), data=task)
    with pytest.raises(UnsupportedModelError, match="no mixture-of-experts layer"):
        st.compress(tiny_llama(), _recipe(count=1), data=task)


def _with_biased_routers(model: torch.nn.Module) -> torch.nn.Module:
    """Every router of a tiny Mixtral given a bias (as gpt-oss's router has one)."""
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    class BiasedRouter(MixtralTopKRouter):  # type: ignore[misc]
        def __init__(self, config: object) -> None:
            super().__init__(config)
            self.bias = torch.nn.Parameter(torch.zeros(self.num_experts))

        def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
            logits = torch.nn.functional.linear(hidden, self.weight, self.bias)
            top, index = torch.topk(logits.softmax(-1), self.top_k, dim=-1)
            return logits, top / top.sum(-1, keepdim=True), index

    gen = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        router = BiasedRouter(model.config)
        with torch.no_grad():
            router.weight.copy_(layer.mlp.gate.weight)
            router.bias.copy_(torch.randn(router.num_experts, generator=gen))
        layer.mlp.gate = router
    return model


@pytest.mark.parametrize("mode", ["drop", "merge"])
def test_a_router_bias_is_cut_with_its_rows(mode: str) -> None:
    model = _with_biased_routers(tiny_moe("mixtral", experts=8, top_k=2))
    _, task = _data()
    result = st.compress(model, _recipe(count=3, mode=mode), data=task)
    hidden = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    for i, layer in enumerate(model.model.layers):
        router = result.model.get_submodule(f"model.layers.{i}.mlp.gate")
        rows = [
            j for w in router.weight for j in range(8) if torch.equal(w, layer.mlp.gate.weight[j])
        ]
        assert len(rows) == 5 and rows == sorted(rows)
        assert router.num_experts == 5 and router.bias.shape == (5,)
        torch.testing.assert_close(router.bias, layer.mlp.gate.bias[rows])
        with torch.no_grad():
            torch.testing.assert_close(router(hidden)[0], layer.mlp.gate(hidden)[0][:, rows])
