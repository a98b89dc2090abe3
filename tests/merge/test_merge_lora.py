"""LoRA extraction (mergekit-extract-lora): truncated SVD of each Linear's delta, PEFT layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimtorch.core.errors import ConfigError
from slimtorch.merge.lora import extract_lora, lora_factors


def test_factors_are_the_best_rank_r_approximation() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 8, generator=g)
    a, b = lora_factors(delta, 8)
    assert a.shape == (8, 8) and b.shape == (12, 8)
    assert torch.allclose(b @ a, delta, atol=1e-5)  # full rank: exact
    s = torch.linalg.svdvals(delta)
    a3, b3 = lora_factors(delta, 3)
    err = torch.linalg.matrix_norm(delta - b3 @ a3)
    assert abs(float(err) - float(s[3:].square().sum().sqrt())) < 1e-4  # Eckart-Young
    assert torch.allclose(a3.norm(dim=1), s[:3].sqrt(), atol=1e-5)  # scale split evenly
    a_s, b_s = lora_factors(delta, 3, distribute_scale=False)
    assert torch.allclose(b_s @ a_s, b3 @ a3, atol=1e-5) and torch.allclose(
        b_s.norm(dim=0), torch.ones(3)
    )
    a_e, _ = lora_factors(delta, 8, sv_epsilon=float(s[2]) - 1e-6)
    assert a_e.shape[0] == 3  # singular values at or below epsilon dropped
    with pytest.raises(ValueError, match="matrix"):
        lora_factors(torch.ones(3), 1)


def test_extract_writes_a_peft_adapter_that_rebuilds_the_fine_tune(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from test_merge_slices import tiny_llama_dirs

    tiny_llama_dirs(tmp_path)
    report = extract_lora(str(tmp_path / "a"), str(tmp_path / "b"), tmp_path / "lora", rank=16)
    assert report["lora_modules"] == 4 * 7 and report["rank"] == 16
    ad = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 16 and "q_proj" in cfg["target_modules"]
    assert {"embed_tokens", "lm_head", "norm"} <= set(cfg["modules_to_save"])
    base = load_file(str(tmp_path / "a" / "model.safetensors"))
    tuned = load_file(str(tmp_path / "b" / "model.safetensors"))
    pre = "base_model.model.model.layers.1.self_attn.q_proj"
    rebuilt = (
        base["model.layers.1.self_attn.q_proj.weight"]
        + ad[f"{pre}.lora_B.weight"] @ ad[f"{pre}.lora_A.weight"]
    )  # q_proj is 16x16: rank 16 is exact
    assert torch.allclose(rebuilt, tuned["model.layers.1.self_attn.q_proj.weight"], atol=1e-5)
    assert ad[f"{pre}.lora_A.weight"].shape == (16, 16)
    down = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    assert ad[down].shape == (16, 32)
    assert torch.equal(ad["base_model.model.lm_head.weight"], tuned["lm_head.weight"])
    assert transformers is not None
    with pytest.raises(ConfigError, match="not empty"):
        extract_lora(str(tmp_path / "a"), str(tmp_path / "b"), tmp_path / "lora")


def test_extract_lora_cli_writes_whole_and_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`slimtorch extract-lora` (mergekit-extract-lora's flags): exit 0 and an adapter smaller
    than the fine-tune; exit 2 and nothing written for a taken directory, a bad rank, or
    models that are not a fine-tune of one another; --force replaces only an adapter."""
    pytest.importorskip("transformers")
    from test_merge_slices import tiny_llama_dirs

    from slimtorch.cli.main import main

    tiny_llama_dirs(tmp_path)
    args = ["extract-lora", "--model", str(tmp_path / "b"), "--base-model", str(tmp_path / "a")]
    out = tmp_path / "lora"
    assert main([*args, "--out-path", str(out), "--max-rank", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rank"] == 2 and 0 < report["adapter_bytes"] < 2 * report["model_bytes"]
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    first = (out / "adapter_model.safetensors").read_bytes()
    assert main([*args, "--out-path", str(out), "--max-rank", "4"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == first  # untouched
    assert main([*args, "--out-path", str(out), "--max-rank", "4", "--force"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() != first
    assert main([*args, "--out-path", str(tmp_path / "x"), "--max-rank", "0"]) == 2
    assert main([*args, "--out-path", str(tmp_path / "a"), "--force"]) == 2  # a model
    assert "not a LoRA adapter" in capsys.readouterr().err
    other = ["extract-lora", "--model", str(tmp_path / "b"), "--base-model", str(out)]
    assert main([*other, "--out-path", str(tmp_path / "y")]) == 2
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "x" not in left and "y" not in left and not any(n.startswith(".") for n in left)
