"""GPT-2's Conv1D runs as a Linear: found by layer-wise methods, saved, reloaded, exported back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import slimtorch as st
from slimtorch import api
from slimtorch.core.context import Context
from slimtorch.export.hf import export_hf
from slimtorch.recipe import load_recipe
from slimtorch.runtime.conv1d import Conv1DLinear, is_hf_conv1d, linearize_conv1d
from slimtorch.workflows.offloaded import compress_large

GPTQ = {
    "stages": [
        {"method": "quantize.gptq", "bits": 4, "group_size": 16,
         "calibration": {"samples": 4, "batch_size": 2}}
    ]
}  # fmt: skip


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=2048, n_positions=256, n_embd=32, n_layer=2, n_head=4,
                        use_cache=False)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    _gpt2().save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def test_linearize_keeps_the_function() -> None:
    model = _gpt2()
    ids = torch.randint(0, 2048, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        names = linearize_conv1d(model)
        after = model(ids).logits
    assert len(names) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert all(isinstance(model.get_submodule(n), Conv1DLinear) for n in names)
    assert not any(is_hf_conv1d(m) for m in model.modules())
    assert model.get_submodule("transformer.h.0.attn.c_attn").weight.shape == (96, 32)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_gptq_on_gpt2_offloaded_equals_in_memory_and_exports(
    checkpoint: Path, tmp_path: Path
) -> None:
    from slimtorch.calibrate.tasks import make_task
    from slimtorch.formats.artifact import read_artifact
    from slimtorch.models.hf import load_directory

    compress_large(checkpoint, load_recipe(GPTQ), tmp_path / "off", None, 10**10,
                   tmp_path / "w", Context(), tokenizer="builtin:austen-lm")  # fmt: skip
    loaded = load_directory(checkpoint)
    api.set_architecture(loaded.model, loaded.architecture)
    result = st.compress(loaded.model, GPTQ, data=make_task("causal-lm", None))
    st.save(result.model, tmp_path / "mem")
    off, mem = read_artifact(tmp_path / "off"), read_artifact(tmp_path / "mem")
    assert off.tensors.keys() == mem.tensors.keys()
    for name, t in mem.tensors.items():
        assert torch.equal(off.tensors[name], t), name
    assert len(mem.states) == 2 * 4  # every Conv1D of both blocks was quantized
    model = st.load(tmp_path / "mem")
    assert isinstance(model.get_submodule("transformer.h.1.mlp.c_fc"), Conv1DLinear)
    ids = torch.randint(0, 2048, (1, 16))
    with torch.no_grad():
        ours = model(ids).logits
        torch.testing.assert_close(st.load(tmp_path / "off")(ids).logits, ours)
        export_hf(model, tmp_path / "hf")
        theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    original = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        assert not torch.allclose(original(ids).logits, ours)  # really quantized
