"""``slimtorch.load(dir, kernels=True)``: which Linears run on the int4 / int8 CPU kernels, and
that the kernel-run model computes the saved (dequantized) model's logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import slimtorch as st
from slimtorch.artifact.kernels import use_int4_kernels, use_int8_kernels, use_kernels
from slimtorch.core.info import model_info, update_info
from slimtorch.formats.state import get_state
from slimtorch.runtime import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from slimtorch.testing.models import tiny_llama


def tied_llama() -> nn.Module:
    """A tiny Llama whose LM head is its token embedding, as SmolLM2's."""
    model = tiny_llama(std=0.1, vocab=96)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    arch = model_info(model).architecture
    assert arch is not None
    update_info(model, architecture={**arch, "config": model.config.to_dict()})
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_w4a16_artifact_runs_every_linear_on_a_kernel(tmp_path: Path) -> None:
    q = st.compress(tied_llama(), "w4a16-rtn").model
    st.save(q, tmp_path / "q")
    plain = st.load(tmp_path / "q")
    fast = st.load(tmp_path / "q", kernels=True)
    kinds = {type(m).__name__ for m in fast.modules()}
    assert "Linear" not in kinds
    assert isinstance(fast.model.layers[1].mlp.down_proj, Int4WeightOnlyLinear)
    assert isinstance(fast.lm_head, Int8WeightOnlyLinear)  # the 8-bit tied head
    emb = fast.model.embed_tokens  # the embedding still looks up the dequantized rows
    assert isinstance(emb, nn.Embedding) and get_state(emb, "weight") is not None
    assert torch.equal(emb.weight, plain.model.embed_tokens.weight)
    head = get_state(plain.lm_head, "weight")
    assert head is not None and head.quant is not None
    assert torch.allclose(fast.lm_head.dequantized_weight(), plain.lm_head.weight, atol=1e-6)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = plain(ids).logits, fast(ids).logits
    # bf16 activations in both kernels: 1.0e-2 measured on this model (6.4e-3 on SmolLM2-135M)
    assert rel(got, want) < 3e-2
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) > 0.9


def test_greedy_decoding_matches_the_dequantized_model(tmp_path: Path) -> None:
    q = st.compress(tied_llama(), "w4a16-rtn").model
    st.save(q, tmp_path / "q")
    plain, fast = st.load(tmp_path / "q"), st.load(tmp_path / "q", kernels=True)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(1))
    kw = {"max_new_tokens": 12, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    with torch.inference_mode():
        want = plain.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        got = fast.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    agree = float((want == got).float().mean())
    assert agree > 0.8, (want, got)  # greedy paths may part after a near tie


def test_int8_preset_runs_on_the_int8_kernel_and_swaps_are_separate() -> None:
    q = st.compress(tiny_llama(std=0.1, vocab=96), "int8").model
    dense = {n: m.weight.detach().clone() for n, m in q.named_modules() if isinstance(m, nn.Linear)}
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = q(ids).logits
    assert use_int4_kernels(q) == []  # 8-bit weights: not for the int4 kernel
    swapped = use_int8_kernels(q)
    assert set(swapped) == set(dense)
    for name in swapped:
        mod = q.get_submodule(name)
        assert isinstance(mod, Int8WeightOnlyLinear)
        assert torch.allclose(mod.dequantized_weight(), dense[name], atol=1e-6)
    with torch.inference_mode():
        got = q(ids).logits
    assert rel(got, want) < 1e-2
    assert use_kernels(q) == []  # nothing left to swap


def test_masked_and_unquantized_linears_stay() -> None:
    model = tiny_llama(std=0.1, vocab=96)
    pruned = st.compress(
        model,
        {"stages": [
            {"method": "prune.magnitude", "sparsity": 0.5, "targets": ["re:.*mlp.*"]},
            {"method": "quantize.rtn", "bits": 8, "granularity": "per_channel",
             "targets": ["re:.*mlp.*"]},
        ]},
    ).model  # fmt: skip
    assert use_kernels(pruned) == []  # masked: the kernels would drop the mask's zeros
    assert use_kernels(tiny_llama()) == []
