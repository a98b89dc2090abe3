"""Mixture-of-experts checkpoints in every layout transformers reads, compressed offloaded
(``--max-memory``, tensors read by name from the shards) and in memory (transformers converts).

transformers 5.25's ``save_pretrained`` writes Mixtral in its original Hugging Face layout
(``block_sparse_moe.experts.{i}.w1/w2/w3``, ``block_sparse_moe.gate``: the names of
mistralai/Mixtral-8x7B), and with ``save_original_format=False`` the fused 3-D
``mlp.experts.gate_up_proj`` / ``down_proj``; Qwen3-MoE's per-expert ``gate_proj`` names are
covered by tests/runtime/test_moe.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from safetensors import safe_open

from slimtorch.runtime.moe import Part, checkpoint_names
from slimtorch.testing.models import tiny_moe


def test_checkpoint_names_map_mixtral_and_fused_layouts() -> None:
    pre = "model.layers.3"
    assert checkpoint_names(f"{pre}.block_sparse_moe.experts.5.w1.weight", (32, 16)) == {
        f"{pre}.mlp.experts.5.gate_proj.weight": None
    }
    assert checkpoint_names(f"{pre}.block_sparse_moe.experts.0.w3.weight", (32, 16)) == {
        f"{pre}.mlp.experts.0.up_proj.weight": None
    }
    assert checkpoint_names(f"{pre}.block_sparse_moe.experts.7.w2.weight", (16, 32)) == {
        f"{pre}.mlp.experts.7.down_proj.weight": None
    }
    assert checkpoint_names(f"{pre}.block_sparse_moe.gate.weight", (8, 16)) == {
        f"{pre}.mlp.gate.weight": None
    }
    fused = checkpoint_names(f"{pre}.mlp.experts.gate_up_proj", (2, 64, 16))
    assert fused == {
        f"{pre}.mlp.experts.0.gate_proj.weight": Part(0, 0, 32),
        f"{pre}.mlp.experts.1.gate_proj.weight": Part(1, 0, 32),
        f"{pre}.mlp.experts.0.up_proj.weight": Part(0, 32, 64),
        f"{pre}.mlp.experts.1.up_proj.weight": Part(1, 32, 64),
    }
    assert checkpoint_names(f"{pre}.mlp.experts.down_proj", (2, 16, 32)) == {
        f"{pre}.mlp.experts.0.down_proj.weight": Part(0, 0, 16),
        f"{pre}.mlp.experts.1.down_proj.weight": Part(1, 0, 16),
    }
    for same in ("lm_head.weight", f"{pre}.mlp.experts.2.gate_proj.weight", f"{pre}.mlp.w1.weight"):
        assert checkpoint_names(same, (4, 4)) == {}


def _save(tmp_path: Path, layout: str) -> tuple[Path, torch.nn.Module]:
    model = tiny_moe("mixtral", vocab=2048, hidden=32, intermediate=16)
    out = tmp_path / "ck"
    model.save_pretrained(out, save_original_format=layout == "original")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    if layout == "original":  # what Hugging Face's Mixtral checkpoints hold
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
        assert "model.layers.0.block_sparse_moe.gate.weight" in keys
        assert not any(".mlp." in k for k in keys)
    else:
        assert "model.layers.1.mlp.experts.gate_up_proj" in keys
    return out, model


@pytest.mark.parametrize("layout", ["original", "fused"])
def test_transformers_loads_both_layouts_with_the_same_logits(tmp_path, layout) -> None:  # type: ignore[no-untyped-def]
    import transformers

    ck, model = _save(tmp_path, layout)
    again = transformers.AutoModelForCausalLM.from_pretrained(ck).eval()
    ids = torch.randint(0, 2048, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_the_offloaded_reader_gives_every_unfused_parameter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from slimtorch.calibrate.offload import Checkpoint
    from slimtorch.runtime.moe import unfuse_experts

    for layout in ("original", "fused"):
        ck, model = _save(tmp_path / layout, layout)
        unfuse_experts(model)
        reader = Checkpoint(ck)
        for name, param in model.named_parameters():
            assert name in reader.where, (layout, name)
            assert torch.equal(reader.get(name), param.detach()), (layout, name)


def _compress(ck: Path, tmp_path: Path, stage: dict[str, Any], monkeypatch) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from slimtorch.core.context import Context
    from slimtorch.workflows import offloaded
    from slimtorch.workflows.compress import CompressOptions, compress_to_dir

    monkeypatch.setattr(offloaded, "_resident_now", lambda: 0)  # see test_distributed_offload
    recipe = {"stages": [{**stage, "calibration": {"samples": 2, "batch_size": 1}}]}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    common = {"tokenizer": "builtin:austen-lm", "llm_windows": 0, "data": "builtin:austen"}
    reports = {}
    for name, budget in (("off", "1MB"), ("mem", None)):
        options = CompressOptions(max_memory=budget, work_dir=str(tmp_path / "w"), **common)
        reports[name] = compress_to_dir(
            str(ck), str(tmp_path / "r.yaml"), tmp_path / name, options, Context(progress=False)
        )
    return reports


@pytest.mark.parametrize(
    ("layout", "method"), [("original", "gptq"), ("fused", "gptq"), ("original", "awq")]
)
def test_offloaded_compression_of_a_mixtral_checkpoint_equals_the_in_memory_one(
    tmp_path, monkeypatch, layout, method
) -> None:  # type: ignore[no-untyped-def]
    """AWQ: its expert groups (the norm before the experts, the router scaled with it) are
    found block by block as in memory."""
    import slimtorch as st
    from slimtorch.formats.artifact import read_artifact

    ck, _ = _save(tmp_path, layout)
    stage = {"method": f"quantize.{method}", "bits": 4, "group_size": 16}
    reports = _compress(ck, tmp_path, stage, monkeypatch)
    assert reports["off"]["offloaded"] is True
    a, b = read_artifact(tmp_path / "off"), read_artifact(tmp_path / "mem")
    assert sorted(a.states) == sorted(b.states) and len(a.states) == 2 * (4 + 4 * 3)
    for key, state in a.states.items():
        assert state.quant is not None and b.states[key].quant is not None
        assert torch.equal(state.quant.codes, b.states[key].quant.codes), key
    for key in ("model.layers.0.mlp.gate.weight", "model.layers.1.post_attention_layernorm.weight"):
        torch.testing.assert_close(a.tensors[key], b.tensors[key], rtol=0, atol=0)
    if method == "awq":  # the scales were folded into the norm and the router
        with safe_open(str(ck / "model.safetensors"), "pt") as f:
            stored = f.get_tensor("model.layers.1.post_attention_layernorm.weight")
        assert not torch.equal(a.tensors["model.layers.1.post_attention_layernorm.weight"], stored)
    ids = torch.randint(0, 2048, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            st.load(tmp_path / "off")(ids).logits, st.load(tmp_path / "mem")(ids).logits
        )
