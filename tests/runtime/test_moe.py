"""Fused transformers experts as one Linear per expert: same outputs, every method reaches them."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from slimtorch.runtime.moe import (
    UnfusedExperts,
    all_experts,
    fused_state,
    unfuse,
    unfuse_experts,
)
from slimtorch.testing.models import tiny_moe


def _ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_unfused_model_gives_the_same_logits(kind: str) -> None:
    model = tiny_moe(kind)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        names = unfuse_experts(model)
        after = model(ids).logits
    assert names == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert isinstance(model.get_submodule(names[0]), UnfusedExperts)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "model.layers.1.mlp.experts.3.down_proj" in linears
    assert sum(".experts." in n for n in linears) == 2 * 4 * 3


def test_fused_state_round_trips_the_3d_weights() -> None:
    model = tiny_moe("mixtral")
    fused = model.model.layers[0].mlp.experts
    gate_up, down = fused.gate_up_proj.detach().clone(), fused.down_proj.detach().clone()
    back = fused_state(unfuse(fused))
    assert torch.equal(back["gate_up_proj"], gate_up)
    assert torch.equal(back["down_proj"], down)


def test_calibrate_all_runs_every_expert_on_every_token_without_changing_outputs() -> None:
    model = tiny_moe("mixtral", experts=8, top_k=1)
    unfuse_experts(model)
    seen: dict[str, int] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def count(module, args, out):  # type: ignore[no-untyped-def]
            seen[name] = seen.get(name, 0) + args[0].reshape(-1, args[0].shape[-1]).shape[0]

        return count

    experts = model.model.layers[0].mlp.experts
    handles = [
        e.gate_proj.register_forward_hook(hook(str(i))) for i, e in enumerate(experts.experts())
    ]
    ids = _ids(2, 12)
    with torch.no_grad():
        routed = model(ids).logits
        routed_counts = dict(seen)
        seen.clear()
        with all_experts(model) as names:
            everyone = model(ids).logits
    for h in handles:
        h.remove()
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert sum(routed_counts.values()) == 24  # top-1: each token reaches one expert
    assert seen == {str(i): 24 for i in range(8)}  # every expert saw every token
    torch.testing.assert_close(everyone, routed, rtol=1e-5, atol=1e-6)
    assert experts.calibrate_all is False  # restored


def test_save_and_load_rebuild_the_unfused_experts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import slimtorch as st

    model = tiny_moe("qwen3_moe")
    result = st.compress(model, {"stages": [{"method": "quantize.rtn", "bits": 4}]})
    st.save(result.model, tmp_path / "art")
    loaded = st.load(tmp_path / "art")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, result.model(ids).logits)
    assert isinstance(loaded.get_submodule("model.layers.0.mlp.experts"), UnfusedExperts)


def _gptq(all_experts_: bool, samples: int = 1) -> dict:  # type: ignore[type-arg]
    return {
        "stages": [
            {
                "method": "quantize.gptq",
                "bits": 4,
                "group_size": 32,
                "calibration": {
                    "samples": samples,
                    "batch_size": 1,
                    "calibrate_all_experts": all_experts_,
                },
            }
        ]
    }


def _starved_setup():  # type: ignore[no-untyped-def]
    from slimtorch.core.info import model_info
    from slimtorch.testing.tasks import tensor_task

    model = tiny_moe("mixtral", experts=8, top_k=1)
    task = tensor_task(_ids(1, 3), loss="next_token")  # 3 tokens, 8 experts: 5+ starve
    return model, task, model_info


def test_gptq_reaches_every_expert_and_starved_ones_fall_back_to_rtn() -> None:
    import slimtorch as st
    from slimtorch.formats.state import get_state

    model, task, model_info = _starved_setup()
    result = st.compress(model, _gptq(False), data=task)
    starved = model_info(result.model).data_free_layers or []
    assert len(starved) >= 3 * 2 * 5  # 3 Linears x 2 layers x at least 5 idle experts
    assert all(".mlp.experts." in n for n in starved)
    grid = {"bits": 4, "signed": False, "symmetric": False, "granularity": "per_group"}
    rtn = st.compress(model, {"stages": [{"method": "quantize.rtn", **grid, "group_size": 32}]})
    quantized = {n for n, m in result.model.named_modules() if get_state(m, "weight") is not None}
    experts = {n for n in quantized if ".mlp.experts." in n}
    assert len(experts) == 2 * 8 * 3  # every expert of every layer has 4-bit codes
    for name in starved:
        got = result.model.get_submodule(name).weight
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, rtn.model.get_submodule(name).weight)  # RTN, same grid
    fed = next(n for n in experts if n not in starved)
    assert not torch.equal(
        result.model.get_submodule(fed).weight, rtn.model.get_submodule(fed).weight
    )  # a fed expert got GPTQ's error feedback


def test_calibrate_all_experts_leaves_no_expert_starved() -> None:
    import slimtorch as st

    model, task, model_info = _starved_setup()
    result = st.compress(model, _gptq(True), data=task)
    assert model_info(result.model).data_free_layers is None
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


@pytest.mark.parametrize("method", ["prune.sparsegpt", "prune.wanda"])
def test_pruning_starved_experts_falls_back_to_magnitude(method: str) -> None:
    import slimtorch as st

    model, task, model_info = _starved_setup()
    recipe = {"stages": [{"method": method, "sparsity": 0.5, "calibration": {"samples": 1}}]}
    result = st.compress(model, recipe, data=task)
    starved = model_info(result.model).data_free_layers or []
    assert starved
    weight = result.model.get_submodule(starved[0]).weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_export_hf_fuses_the_experts_back_for_transformers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import transformers

    import slimtorch as st
    from slimtorch.export import export

    model = tiny_moe("qwen3_moe")
    result = st.compress(model, {"stages": [{"method": "quantize.rtn", "bits": 4}]})
    st.save(result.model, tmp_path / "art")
    loaded = st.load(tmp_path / "art")
    export(loaded, to="hf", out=tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(again.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, loaded(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "recipe",
    [
        "w4a16-awq",
        "kmeans4",
        {"stages": [{"method": "prune.wanda", "sparsity": 0.5, "calibration": {"samples": 4}}]},
    ],
    ids=["awq", "kmeans", "wanda"],
)
def test_every_weight_method_reaches_every_expert(recipe: object) -> None:
    import slimtorch as st
    from slimtorch.formats.state import get_state
    from slimtorch.testing.tasks import tensor_task

    model = tiny_moe("qwen3_moe")
    task = tensor_task(_ids(4, 16), loss="next_token")
    result = st.compress(model, recipe, data=task)  # type: ignore[arg-type]
    touched = [
        n
        for n, m in result.model.named_modules()
        if ".experts." in n and isinstance(m, torch.nn.Linear) and get_state(m, "weight")
    ]
    assert len(touched) == 2 * 4 * 3


def test_offloaded_compression_of_an_moe_checkpoint_equals_the_in_memory_one(
    tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """--max-memory reads the per-expert tensors transformers v5 saves, block by block."""
    import json

    import slimtorch as st
    from slimtorch.core.context import Context
    from slimtorch.formats.artifact import read_artifact
    from slimtorch.workflows import offloaded
    from slimtorch.workflows.compress import CompressOptions, compress_to_dir

    tiny_moe("qwen3_moe", vocab=2048, hidden=32, intermediate=16).save_pretrained(tmp_path / "ck")
    monkeypatch.setattr(offloaded, "_resident_now", lambda: 0)  # see test_distributed_offload
    stage = {"method": "quantize.gptq", "bits": 4, "group_size": 16}
    (tmp_path / "r.yaml").write_text(
        json.dumps({"stages": [{**stage, "calibration": {"samples": 2, "batch_size": 1}}]})
    )
    common = {"tokenizer": "builtin:austen-lm", "llm_windows": 0, "data": "builtin:austen"}
    reports = {}
    for name, budget in (("off", "1MB"), ("mem", None)):
        options = CompressOptions(max_memory=budget, work_dir=str(tmp_path / "w"), **common)
        reports[name] = compress_to_dir(
            str(tmp_path / "ck"), str(tmp_path / "r.yaml"), tmp_path / name, options,
            Context(progress=False),
        )  # fmt: skip
    assert reports["off"]["offloaded"] is True
    a, b = read_artifact(tmp_path / "off"), read_artifact(tmp_path / "mem")
    assert sorted(a.states) == sorted(b.states) and len(a.states) == 2 * (4 + 4 * 3)
    for key, state in a.states.items():
        assert state.quant is not None and b.states[key].quant is not None
        assert torch.equal(state.quant.codes, b.states[key].quant.codes), key
    with torch.no_grad():
        x = _ids()
        torch.testing.assert_close(
            st.load(tmp_path / "off")(x).logits, st.load(tmp_path / "mem")(x).logits
        )
