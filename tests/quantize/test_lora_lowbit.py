"""quantize.lora: low-rank adapters on a frozen quantized base (QLoRA-style), kept as float16
runtime modules or merged back into the grid; save/load, YAML + CLI, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import slimtorch as st
from slimtorch.cli.main import main
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.formats.state import get_state
from slimtorch.quantize.lora import distill_loss, merge_into_grid, wrap_linears
from slimtorch.quantize.stages.lora import LoRAConfig
from slimtorch.runtime.lora_lowbit import LoRALinear
from slimtorch.testing.models import tiny_llama
from slimtorch.testing.tasks import tensor_task

CTX = Context(progress=False)
GPTQ3 = {"method": "quantize.gptq", "bits": 3, "group_size": 32,
         "calibration": {"samples": 16, "batch_size": 4}}  # fmt: skip
LORA = {"method": "quantize.lora", "rank": 4, "train": {"steps": 30, "lr": 3e-3, "batch_size": 4}}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(seed))


def _kld(model: torch.nn.Module, base: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        p, q = base(x).logits.log_softmax(-1), model(x).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_distill_loss_is_zero_on_equal_logits_and_positive_otherwise() -> None:
    a = torch.randn(2, 5, 11)
    assert float(distill_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(a, torch.randn(2, 5, 11))) > 0.1


def test_a_fresh_adapter_changes_nothing_and_merging_a_zero_adapter_keeps_the_codes() -> None:
    model = st.compress(tiny_llama(std=0.1), [GPTQ3], data=tensor_task(_ids(), loss="next_token"),
                        ctx=CTX).model  # fmt: skip
    x = _ids(1)
    with torch.no_grad():
        before = model(x).logits
    name = "model.layers.0.mlp.up_proj"
    codes = get_state(model.get_submodule(name), "weight").quant.codes.clone()  # type: ignore[union-attr]
    (wrapper,) = wrap_linears(model, [name], rank=4, scale=1.0)
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    merge_into_grid(model, name)
    layer = model.get_submodule(name)
    assert isinstance(layer, torch.nn.Linear) and layer is wrapper.linear
    assert torch.equal(get_state(layer, "weight").quant.codes, codes)  # type: ignore[union-attr]


def test_adapters_recover_quality_kept_and_merged(tmp_path: Path) -> None:
    base, x = tiny_llama(std=0.1), _ids()
    task = tensor_task(x, loss="next_token")
    gptq = st.compress(base, [GPTQ3], data=task, ctx=CTX).model
    kept = st.compress(base, [GPTQ3, LORA], data=task, ctx=CTX).model
    merged = st.compress(base, [GPTQ3, {**LORA, "merge": True}], data=task, ctx=CTX).model
    k_gptq, k_kept, k_merged = (_kld(m, base, x) for m in (gptq, kept, merged))
    assert k_kept < 0.7 * k_gptq, (k_gptq, k_kept)
    assert k_merged < k_gptq, (k_gptq, k_merged)
    wrapped = [m for m in kept.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 14 and all(w.down.weight.dtype == torch.float16 for w in wrapped)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    q = get_state(merged.model.layers[0].self_attn.q_proj, "weight").quant  # type: ignore[union-attr]
    assert q is not None and q.bits == 3 and int(q.codes.max()) <= 7
    for name, model in (("kept", kept), ("merged", merged)):
        st.save(model, tmp_path / name)
        with torch.no_grad():
            assert torch.equal(st.load(tmp_path / name)(x).logits, model(x).logits), name
    assert "LoRALinear" in (tmp_path / "kept" / "manifest.json").read_text()


def test_refusals_and_config() -> None:
    task = tensor_task(_ids(), loss="next_token")
    with pytest.raises(ConfigError, match="found none among its targets"):
        st.compress(tiny_llama(std=0.1), [{**LORA, "targets": ["Conv2d"]}], data=task, ctx=CTX)
    plain = st.compress(tiny_llama(std=0.1), [LORA], data=task, ctx=CTX).model  # fp base
    assert sum(isinstance(m, LoRALinear) for m in plain.modules()) == 14
    with pytest.raises(ConfigError, match="--data"):
        st.compress(tiny_llama(std=0.1), [GPTQ3, LORA], ctx=CTX)
    with pytest.raises(ValueError):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(torch.nn.Linear(4, 4), 0)


def test_yaml_and_cli(tmp_path: Path) -> None:
    tiny_llama(vocab=2048, hidden=32, intermediate=64, heads=4, kv_heads=2,
               std=0.1).save_pretrained(tmp_path / "hf")  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages:\n  - method: quantize.rtn\n    bits: 3\n    signed: false\n"
        "    symmetric: false\n    granularity: per_group\n    group_size: 32\n"
        "    targets: [Linear]\n    ignore: [lm_head]\n"
        "  - method: quantize.lora\n    rank: 4\n    train: {steps: 3, batch_size: 4}\n"
    )
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man. " * 200)
    out = tmp_path / "m"
    code = main(["compress", "--model", str(tmp_path / "hf"), "--recipe", str(recipe),
                 "--out", str(out), "--tokenizer", "builtin:austen-lm", "--data", str(text),
                 "--llm-windows", "0"])  # fmt: skip
    assert code == 0 and "LoRALinear" in (out / "manifest.json").read_text()
