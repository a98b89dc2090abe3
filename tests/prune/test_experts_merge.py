"""prune.experts mode merge: removed experts averaged into their most similar kept expert, the
router resized; reloads in slimtorch and transformers; recipe, CLI and bad options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

import slimtorch as st
from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.runtime.moe import UnfusedExperts
from slimtorch.testing.models import tiny_moe
from slimtorch.testing.tasks import tensor_task


def _data(seed: int = 2, rows: int = 4, vocab: int = 128) -> tuple[torch.Tensor, Any]:
    ids = torch.randint(0, vocab, (rows, 16), generator=torch.Generator().manual_seed(seed))
    return ids, tensor_task(ids, loss="next_token")


def _recipe(**options: object) -> dict[str, Any]:
    stage = {
        "method": "prune.experts",
        "mode": "merge",
        "calibration": {"samples": 4, "batch_size": 2},
    }
    return {"stages": [{**stage, **options}]}


def _routed_counts(model: torch.nn.Module, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per layer, how many tokens the router sent to each expert (the fused experts' inputs)."""
    counts: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        num = experts.gate_up_proj.shape[0]

        def hook(
            module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i, num: int = num
        ) -> None:
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            counts[i] = (
                counts.get(i, torch.zeros(num))
                + torch.bincount(index.flatten(), minlength=num)[:num]
            )

        handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return counts


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_merged_expert_is_the_frequency_weighted_average_of_its_pair(kind: str) -> None:
    """Expert 7 of every layer is made a quiet near-copy of expert 2 (cosine ~1, tiny output
    norm, a router row near 2's): it is the least salient and is merged into expert 2 with the
    weights of the tokens each was routed."""
    model = tiny_moe(kind, experts=8, top_k=2)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers:
            ex, gate = layer.mlp.experts, layer.mlp.gate
            ex.gate_up_proj[7] = ex.gate_up_proj[2] + 0.02 * torch.randn(
                ex.gate_up_proj[2].shape, generator=gen
            )
            ex.down_proj[7] = 0.05 * ex.down_proj[2]
            gate.weight[7] = gate.weight[2] + 0.1 * torch.randn(gate.weight[2].shape, generator=gen)
    ids, task = _data()
    counts = _routed_counts(model, ids)  # the stage's 2 batches of 2 cover these 4 rows once
    result = st.compress(model, _recipe(count=1), data=task)
    for i, layer in enumerate(model.model.layers):
        f2, f7 = float(counts[i][2]), float(counts[i][7])
        assert f2 > 0 and f7 > 0, "the chosen pair must both be routed for the check to mean much"
        merged = result.model.get_submodule(f"model.layers.{i}.mlp.experts")
        assert isinstance(merged, UnfusedExperts) and merged.num_experts == 7
        gate_up, down = layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj
        rows = gate_up.shape[1] // 2
        want_gate_up = (f2 * gate_up[2] + f7 * gate_up[7]) / (f2 + f7)
        want_down = (f2 * down[2] + f7 * down[7]) / (f2 + f7)
        e2 = merged.experts()[2]
        torch.testing.assert_close(e2.gate_proj.weight, want_gate_up[:rows])
        torch.testing.assert_close(e2.up_proj.weight, want_gate_up[rows:])
        torch.testing.assert_close(e2.down_proj.weight, want_down)
        for new, old in enumerate([0, 1, 3, 4, 5, 6], start=0):  # the others untouched
            slot = new if new < 2 else new + 1
            torch.testing.assert_close(merged.experts()[slot].down_proj.weight, down[old])
        router = result.model.get_submodule(f"model.layers.{i}.mlp.gate").weight
        torch.testing.assert_close(router, layer.mlp.gate.weight[:7])


def _subset_mean(weight: torch.Tensor, originals: torch.Tensor) -> list[int] | None:
    """The set of ``originals`` whose plain mean ``weight`` is, if any."""
    num = originals.shape[0]
    for mask in range(1, 2**num):
        subset = [j for j in range(num) if mask >> j & 1]
        if torch.allclose(weight, originals[subset].mean(0), atol=1e-6, rtol=1e-5):
            return subset
    return None


def test_uniform_weights_partition_the_experts_into_plain_means() -> None:
    model = tiny_moe("mixtral", experts=4, top_k=1)
    _, task = _data()
    recipe = _recipe(count=2, merge_weights="uniform", min_similarity=-1.0)  # merge every one
    uniform = st.compress(model, recipe, data=task).model
    for i, layer in enumerate(model.model.layers):
        fused = layer.mlp.experts.down_proj.detach()
        kept = uniform.get_submodule(f"model.layers.{i}.mlp.experts").experts()
        subsets = [_subset_mean(e.down_proj.weight, fused) for e in kept]
        assert all(s is not None for s in subsets), subsets
        assert sorted(j for s in subsets for j in s or []) == [0, 1, 2, 3], subsets
    other = st.compress(model, _recipe(count=2, merge_weights="saliency"), data=task).model
    first = other.get_submodule("model.layers.0.mlp.experts").experts()[0].down_proj.weight
    mean = _subset_mean(first, model.model.layers[0].mlp.experts.down_proj.detach())
    assert mean is None or len(mean) == 1  # saliency shares are not a plain mean of a group


def test_an_unreachable_similarity_threshold_makes_merge_a_drop() -> None:
    model = tiny_moe("mixtral", experts=8, top_k=2)
    ids, task = _data()
    drop = st.compress(model, _recipe(count=3, mode="drop"), data=task).model
    none = st.compress(model, _recipe(count=3, min_similarity=0.999), data=task).model
    merged = st.compress(model, _recipe(count=3), data=task).model
    with torch.no_grad():
        torch.testing.assert_close(none(ids).logits, drop(ids).logits)
        assert not torch.allclose(merged(ids).logits, drop(ids).logits)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_merged_experts_reload_in_slimtorch_and_transformers(kind: str, tmp_path: Path) -> None:
    import transformers

    from slimtorch.export import export

    model = tiny_moe(kind, experts=8, top_k=2)
    ids, task = _data()
    result = st.compress(model, _recipe(fraction=0.5), data=task)
    assert result.model.get_submodule("model.layers.1.mlp.experts").num_experts == 4
    assert result.model.get_submodule("model.layers.1.mlp.gate").weight.shape == (4, 64)
    with torch.no_grad():
        merged = result.model(ids).logits
    st.save(result.model, tmp_path / "art")
    loaded = st.load(tmp_path / "art")
    export(loaded, to="hf", out=tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged)
        torch.testing.assert_close(again(ids).logits, merged, rtol=1e-4, atol=1e-5)
    key = "num_local_experts" if kind == "mixtral" else "num_experts"
    assert getattr(again.config, key) == 4


def test_recipe_yaml_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from slimtorch.cli.main import main

    tiny_moe("qwen3_moe", experts=4, top_k=1, vocab=2048).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "r.yaml").write_text(
        "stages:\n  - method: prune.experts\n    mode: merge\n    fraction: 0.5\n"
        "    merge_weights: frequency\n    calibration: {samples: 4, batch_size: 2}\n"
    )
    argv = ["compress", "--model", str(tmp_path / "ckpt"), "--recipe", str(tmp_path / "r.yaml"),
            "--out", str(tmp_path / "art"), "--quiet", "--llm-windows", "0",
            "--data", "builtin:austen", "--tokenizer", "builtin:austen-lm"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    loaded = st.load(tmp_path / "art")
    assert loaded.get_submodule("model.layers.0.mlp.experts").num_experts == 2
    assert loaded.config.num_experts == 2
    (tmp_path / "bad.yaml").write_text(
        json.dumps({"stages": [{"method": "prune.experts", "mode": "fuse", "fraction": 0.5}]})
    )
    argv[argv.index("--recipe") + 1] = str(tmp_path / "bad.yaml")
    argv[argv.index("--out") + 1] = str(tmp_path / "bad")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "mode" in err and "'drop'" in err and "'merge'" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_bad_options_are_refused() -> None:
    _, task = _data()
    model = tiny_moe("mixtral", experts=4, top_k=1)
    with pytest.raises(ConfigError, match="merge_weights applies to mode: merge"):
        st.compress(model, _recipe(count=1, mode="drop", merge_weights="uniform"), data=task)
    with pytest.raises(ConfigError, match="min_similarity applies to mode: merge"):
        st.compress(model, _recipe(count=1, mode="drop", min_similarity=0.5), data=task)
    with pytest.raises(ConfigError, match="min_similarity"):
        st.compress(model, _recipe(count=1, min_similarity=1.5), data=task)
    with pytest.raises(ConfigError, match="mode"):
        st.compress(model, _recipe(count=1, mode="average"), data=task)
    with pytest.raises(ConfigError, match="merge_weights"):
        st.compress(model, _recipe(count=1, merge_weights="tokens"), data=task)
    rtn = {"method": "quantize.rtn", "bits": 4, "granularity": "per_group", "group_size": 16}
    recipe = {"stages": [rtn, _recipe(count=1)["stages"][0]]}
    with pytest.raises(UnsupportedModelError, match="merge experts before quantizing"):
        st.compress(model, recipe, data=task)


def _tiny_gpt_oss(experts: int = 4) -> Any:
    """A small random-init gpt-oss (experts with biases, a router named ``router`` with a
    bias), weights and biases N(0, 0.1)."""
    import transformers

    from slimtorch.core.info import update_info

    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=experts,
        num_experts_per_tok=2, sliding_window=8, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    model = transformers.GptOssForCausalLM._from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("router.bias"):
                p.normal_(0, 0.1)
    arch = {"kind": "hf", "class": "GptOssForCausalLM", "config": config.to_dict()}
    update_info(model, architecture={**arch, "attn_implementation": "eager", "dtype": "float32"})
    return model.eval()


def test_gpt_oss_experts_merge_with_their_biases_and_router_bias(tmp_path: Path) -> None:
    pytest.importorskip("slimtorch.runtime.moe_layouts")  # gpt-oss experts are unfused there
    import transformers

    from slimtorch.export import export

    model = _tiny_gpt_oss()
    ids, task = _data()
    recipe = _recipe(count=2, merge_weights="uniform", min_similarity=-1.0)  # merge every one
    result = st.compress(model, recipe, data=task)
    for i, layer in enumerate(model.model.layers):
        fused, router = layer.mlp.experts, layer.mlp.router
        merged = result.model.get_submodule(f"model.layers.{i}.mlp.experts").experts()
        subsets = [_subset_mean(e.down_proj.bias, fused.down_proj_bias.detach()) for e in merged]
        assert all(s is not None for s in subsets), subsets
        assert sorted(j for s in subsets for j in s or []) == [0, 1, 2, 3]
        for e, s in zip(merged, subsets, strict=True):  # the same groups for every parameter
            want = fused.gate_up_proj_bias.detach()[s or []].mean(0)[::2]  # gate: even columns
            torch.testing.assert_close(e.gate_proj.bias, want)
        new_router = result.model.get_submodule(f"model.layers.{i}.mlp.router")
        rows = [j for w in new_router.weight for j in range(4) if torch.equal(w, router.weight[j])]
        assert len(rows) == 2 and all(j in s for j, s in zip(rows, subsets, strict=True) if s)
        torch.testing.assert_close(new_router.bias, router.bias[rows])
    st.save(result.model, tmp_path / "art")
    loaded = st.load(tmp_path / "art")
    export(loaded, to="hf", out=tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert again.config.num_local_experts == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, result.model(ids).logits)
        torch.testing.assert_close(again(ids).logits, loaded(ids).logits, rtol=1e-4, atol=1e-5)


def test_chunked_statistics_give_the_same_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    from slimtorch.prune.stages import experts as stage

    model = tiny_moe("mixtral", experts=8, top_k=2)
    _, task = _data()
    whole = st.compress(model, _recipe(count=3), data=task).model
    monkeypatch.setattr(stage, "CHUNK", 5)  # 32 tokens a batch in 7 chunks
    chunked = st.compress(model, _recipe(count=3), data=task).model
    for (name, a), (_, b) in zip(whole.named_parameters(), chunked.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
