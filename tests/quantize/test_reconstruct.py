"""quantize.reconstruct (block-wise reconstruction, EfficientQAT Block-AP): the maths on one
block, the stage after GPTQ and alone, its stored grid, save/load, YAML + CLI, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import slimtorch as st
from slimtorch.cli.main import main
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.formats.state import dequantize, get_state, iter_states
from slimtorch.quantize.affine import quantize_weight
from slimtorch.quantize.primitives import QuantSpec
from slimtorch.quantize.reconstruct import (
    TrainSettings,
    block_loss,
    block_outputs,
    fake_quantize_grid,
    grid_from_state,
    grid_state,
    reconstruct_block,
)
from slimtorch.recipe import load_recipe
from slimtorch.testing.models import tiny_cnn, tiny_llama
from slimtorch.testing.tasks import tensor_task

CTX = Context(progress=False)
W3 = QuantSpec(bits=3, signed=False, symmetric=False, granularity="per_group", group_size=32)
GPTQ3 = {"method": "quantize.gptq", "bits": 3, "group_size": 32,
         "calibration": {"samples": 16, "batch_size": 4}}  # fmt: skip
RECON = {"method": "quantize.reconstruct", "bits": 3, "group_size": 32,
         "calibration": {"samples": 16, "batch_size": 4},
         "train": {"steps": 30, "weight_lr": 1e-3, "scale_lr": 1e-3}}  # fmt: skip


def _llama() -> torch.nn.Module:
    return tiny_llama(layers=2, std=0.1)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(seed))


def _kld(model: torch.nn.Module, base: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        p, q = base(x).logits.log_softmax(-1), model(x).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _block_calls(model: torch.nn.Module, x: torch.Tensor) -> list:
    calls: list = []
    block = model.model.layers[0]
    hook = block.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        for i in range(0, x.shape[0], 4):
            model(x[i : i + 4])
    hook.remove()
    return calls


def test_the_start_computes_exactly_the_grid_it_starts_from() -> None:
    w = torch.randn(16, 64)
    q = quantize_weight(w, W3)
    on_grid = grid_from_state(q, dequantize(q, w.shape), None)  # GPTQ-style start: the codes
    assert torch.equal(fake_quantize_grid(on_grid), dequantize(q, w.shape))
    from_fp = grid_from_state(q, w, None)  # RTN start: the full-precision weight
    assert torch.equal(fake_quantize_grid(from_fp), dequantize(q, w.shape))
    back = grid_state(from_fp, q, w.shape)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scale, q.scale)
    assert torch.equal(back.zero_point, q.zero_point) and back.group_size == 32


def test_straight_through_gradients_reach_weights_and_scales() -> None:
    w = torch.randn(8, 64)
    g = grid_from_state(quantize_weight(w, W3), w, None)
    (fake_quantize_grid(g) * torch.randn(8, 64)).sum().backward()
    assert g.weight.grad is not None and float(g.weight.grad.abs().sum()) > 0
    assert g.scale.grad is not None and float(g.scale.grad.abs().sum()) > 0


def test_reconstruction_lowers_the_block_error_and_codes_stay_in_range() -> None:
    model = _llama()
    block = model.model.layers[0]
    calls = _block_calls(model, _ids())
    targets = block_outputs(block, calls)
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    grids = {n: grid_from_state(quantize_weight(m.weight, W3), m.weight, None)
             for n, m in linears.items()}  # fmt: skip
    start = block_loss(block, grids, calls, targets)
    result = reconstruct_block(block, grids, calls, targets, TrainSettings(40, 1e-3, 1e-3))
    assert result.kept and result.loss_before == pytest.approx(start)
    assert result.loss_after < 0.7 * start, (start, result.loss_after)
    for n, m in linears.items():
        q = grid_state(grids[n], quantize_weight(m.weight, W3), m.weight.shape)
        assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 7 and q.codes.dtype == torch.uint8


def test_a_step_that_cannot_help_keeps_the_start() -> None:
    model = _llama()
    block = model.model.layers[0]
    calls = _block_calls(model, _ids())
    targets = block_outputs(block, calls)
    lin = block.mlp.down_proj
    grids = {"mlp.down_proj": grid_from_state(quantize_weight(lin.weight, W3), lin.weight, None)}
    before = grids["mlp.down_proj"].weight.detach().clone()
    result = reconstruct_block(block, grids, calls, targets, TrainSettings(3, 10.0, 10.0))
    assert not result.kept and torch.equal(grids["mlp.down_proj"].weight, before)


def test_after_gptq_and_alone_through_compress(tmp_path: Path) -> None:
    base, x = _llama(), _ids()
    task = tensor_task(x, loss="next_token")
    gptq = st.compress(base, [GPTQ3], data=task, ctx=CTX).model
    after = st.compress(base, [GPTQ3, {k: v for k, v in RECON.items() if k not in ("bits",)}],
                        data=task, ctx=CTX).model  # fmt: skip
    alone = st.compress(base, [RECON], data=task, ctx=CTX).model
    rtn = st.compress(base, [{"method": "quantize.rtn", "bits": 3, "signed": False,
                              "symmetric": False, "granularity": "per_group", "group_size": 32,
                              "targets": ["Linear"], "ignore": ["lm_head"]}], ctx=CTX).model  # fmt: skip
    held = _ids(1)
    k_rtn, k_alone = _kld(rtn, base, held), _kld(alone, base, held)
    assert k_alone < 0.8 * k_rtn, (k_rtn, k_alone)  # on text it was not trained on
    assert _kld(after, base, x) <= _kld(gptq, base, x) * 1.05
    states = [s for _, _, _, s in iter_states(alone)]
    assert len(states) == 14 and all(s.quant is not None and s.quant.bits == 3 for s in states)
    q = get_state(alone.model.layers[1].mlp.up_proj, "weight")
    assert q is not None and q.quant is not None and q.quant.group_size == 32
    assert int(q.quant.codes.max()) <= 7 and int(q.quant.codes.min()) >= 0
    st.save(alone, tmp_path / "a")
    with torch.no_grad():
        loaded = st.load(tmp_path / "a")(held).logits
        assert torch.equal(loaded, alone(held).logits)


def test_refusals() -> None:
    task = tensor_task(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,)))
    with pytest.raises(ConfigError, match="repeated block"):
        st.compress(tiny_cnn(), [{"method": "quantize.reconstruct", "targets": ["Linear"],
                                  "calibration": {"samples": 8}}], data=task, ctx=CTX)  # fmt: skip
    with pytest.raises(ConfigError, match="--data"):
        st.compress(_llama(), [RECON], ctx=CTX)
    hqq = {"method": "quantize.hqq", "bits": 3, "group_size": 32, "targets": ["Linear"],
           "ignore": ["lm_head"]}  # fmt: skip
    llm_task = tensor_task(_ids(), loss="next_token")
    with pytest.raises(ConfigError, match=r"integer zero points|affine"):
        st.compress(_llama(), [hqq, RECON], data=llm_task, ctx=CTX)


def test_yaml_and_cli(tmp_path: Path) -> None:
    tiny_llama(vocab=2048, hidden=32, intermediate=64, heads=4, kv_heads=2,
               std=0.1).save_pretrained(tmp_path / "hf")  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages:\n  - method: quantize.gptq\n    bits: 3\n    group_size: 32\n"
        "    calibration: {samples: 8, batch_size: 4}\n"
        "  - method: quantize.reconstruct\n    calibration: {samples: 8, batch_size: 4}\n"
        "    train: {steps: 4}\n"
    )
    assert [s.spec.name for s in load_recipe(str(recipe)).stages][1] == "quantize.reconstruct"
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man. " * 200)
    out = tmp_path / "m"
    code = main(["compress", "--model", str(tmp_path / "hf"), "--recipe", str(recipe),
                 "--out", str(out), "--tokenizer", "builtin:austen-lm", "--data", str(text),
                 "--llm-windows", "0"])  # fmt: skip
    assert code == 0 and (out / "manifest.json").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - method: quantize.reconstruct\n    train: {steps: 0}\n")
    assert main(["compress", "--model", str(tmp_path / "hf"), "--recipe", str(bad),
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert not (tmp_path / "x").exists()
