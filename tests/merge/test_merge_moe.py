"""`slimtorch moe`: a Mixtral MoE from dense Llama models (mergekit-moe's YAML and maths)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slimtorch.core.errors import ConfigError
from slimtorch.merge.moe import cheap_embedding, hidden_summary, parse_moe_config, unit

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def moe_models(tmp: Path, names: str = "abc") -> None:
    """Tiny Llamas (different seeds) with one WordLevel tokenizer that has a BOS token."""
    words = ["<s>", "</s>"] + [f"t{i}" for i in range(62)]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, "t0")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", bos_token="<s>", eos_token="</s>"
    )
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    for i, n in enumerate(names):
        torch.manual_seed(i)
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp / n)
        fast.save_pretrained(tmp / n)


def moe_config(tmp: Path, mode: str = "hidden", experts: str = "bc", **extra: object) -> dict:
    prompts = [["t1 t2 t3", "t4 t5"], ["t40 t41", "t50 t51 t52"]]
    return {
        "base_model": str(tmp / "a"),
        "gate_mode": mode,
        "experts_per_token": 1,
        "experts": [
            {"source_model": str(tmp / e), "positive_prompts": prompts[i % 2]}
            for i, e in enumerate(experts)
        ],
        **extra,
    }


def test_router_maths() -> None:
    embed = torch.randn(10, 4)
    ids, mask = torch.tensor([[0, 3, 5], [0, 0, 7]]), torch.tensor([[1, 1, 1], [0, 1, 1]])
    got = cheap_embedding(embed, ids, mask, 3)
    want = unit(embed[[0, 3, 5, 0, 7]].sum(0))
    assert got.shape == (3, 4) and torch.allclose(got[2], want, atol=1e-6)
    states = tuple(torch.arange(24.0).reshape(2, 3, 4) + k for k in range(3))  # 2 layers + final
    last = hidden_summary(states, average=False)
    assert last.shape == (2, 4) and torch.equal(last[1], (states[1][0, -1] + states[1][1, -1]) / 2)
    assert torch.allclose(hidden_summary(states, average=True)[0], states[0].mean(dim=(0, 1)))


@pytest.mark.parametrize("mode", ["hidden", "cheap_embed", "random"])
def test_moe_builds_a_mixtral_that_transformers_runs(tmp_path: Path, mode: str) -> None:
    from slimtorch.workflows.moe import build_moe

    moe_models(tmp_path)
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(moe_config(tmp_path, mode)), encoding="utf-8")
    report = build_moe(path, tmp_path / "out")
    assert report["layers"] == 2 and report["gate_mode"] == mode
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    up = out["model.layers.1.mlp.experts.gate_up_proj"]
    assert up.shape == (2, 64, 16) and torch.equal(
        up[1, :32], c["model.layers.1.mlp.gate_proj.weight"]
    )
    assert torch.equal(up[0, 32:], b["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(
        out["model.layers.0.mlp.experts.down_proj"][1], c["model.layers.0.mlp.down_proj.weight"]
    )
    assert torch.equal(
        out["model.layers.0.self_attn.q_proj.weight"], a["model.layers.0.self_attn.q_proj.weight"]
    )
    router = out["model.layers.0.mlp.gate.weight"]
    assert router.shape == (2, 16)
    if mode != "random":
        assert torch.allclose(router.norm(dim=1), torch.ones(2), atol=1e-2)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 2
    assert model(torch.tensor([[0, 5, 9]])).logits.shape == (1, 3, 64)


def test_moe_of_one_model_computes_that_model(tmp_path: Path) -> None:
    """Base and both experts the same model: the MoE's logits are the dense model's (the
    top-k routing weights sum to 1), so attention, norms, experts and layout are right."""
    from slimtorch.workflows.moe import build_moe

    moe_models(tmp_path, "a")
    cfg = moe_config(tmp_path, "cheap_embed", experts="aa", experts_per_token=2)
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    with pytest.raises(ConfigError, match="same model"):
        build_moe(path, tmp_path / "out")
    build_moe(path, tmp_path / "out", allow_all_same=True)
    ids = torch.tensor([[0, 5, 9, 33, 2]])
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, dense(ids).logits, atol=1e-5)


def test_bad_configs_exit_2_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimtorch.cli.main import main

    moe_models(tmp_path, "ab")
    cases = {
        "mode": (moe_config(tmp_path, "hiden", experts="ab"), "gate_mode"),
        "k": (moe_config(tmp_path, experts="ab", experts_per_token=3), "experts_per_token"),
        "prompts": (
            {**moe_config(tmp_path, experts="ab"), "experts": [{"source_model": "x"}]},
            "positive_prompts",
        ),
        "shared": (
            moe_config(tmp_path, experts="ab", shared_experts=[{"source_model": "x"}]),
            "Mixtral",
        ),
        "missing": (moe_config(tmp_path, experts="az"), "z"),
    }
    for name, (cfg, needle) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        assert main(["moe", str(path), "--out", str(tmp_path / f"o-{name}")]) == 2, name
        assert needle in capsys.readouterr().err, name
        assert not (tmp_path / f"o-{name}").exists()
    with pytest.raises(ValueError, match="same prompts"):
        parse_moe_config({"base_model": "a", "experts": [
            {"source_model": "a", "positive_prompts": ["x"]},
            {"source_model": "b", "positive_prompts": ["x"]}]})  # fmt: skip
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(moe_config(tmp_path, experts="ab")), encoding="utf-8")
    assert main(["moe", str(path), "--out", str(tmp_path / "ok"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["experts_per_token"] == 1
