"""Head pruning of Hugging Face attention modules (BERT, Llama with GQA, OPT)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.formats.state import WeightState, set_state
from slimtorch.graph.handlers import handler_for
from slimtorch.graph.hf_attention import (
    ATTENTION,
    find_attention,
    head_index,
    register_attention_handlers,
)
from slimtorch.testing import models as testing_models
from slimtorch.testing.models import tiny_bert

transformers = pytest.importorskip("transformers")


def tiny_llama(attn: str = "sdpa") -> nn.Module:
    return testing_models.tiny_llama(std=0.1, attn=attn)  # heads must matter


def tiny_opt() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(
        vocab_size=64,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
    )
    return transformers.OPTModel(cfg).eval()  # type: ignore[no-any-return]


def _attention(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if find_attention(m) is not None]


def _reference(model: nn.Module, keeps: list[list[int]]) -> nn.Module:
    """A copy of ``model`` with the removed heads' output-projection columns zeroed."""
    ref = copy.deepcopy(model)
    for module, keep in zip(_attention(ref), keeps, strict=True):
        parts = find_attention(module)
        assert parts is not None
        gone = sorted(set(range(parts.num_kv)) - set(keep))
        cols = head_index(torch.tensor(gone, dtype=torch.int64), parts.groups * parts.head_dim)
        with torch.no_grad():
            parts.o.weight[:, cols] = 0
    return ref


def _prune(model: nn.Module, keeps: list[list[int]]) -> None:
    for module, keep in zip(_attention(model), keeps, strict=True):
        assert ATTENTION.prune(module, "heads", torch.tensor(keep)) is None


def _out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_finds_attention_modules_by_structure() -> None:
    bert, llama = tiny_bert(), tiny_llama()
    assert [type(m).__name__ for m in _attention(bert)] == ["BertAttention"] * 2
    assert [type(m).__name__ for m in _attention(llama)] == ["LlamaAttention"] * 2
    assert find_attention(bert.encoder.layer[0].attention.self) is None  # no output projection
    assert find_attention(bert.encoder.layer[0]) is None
    parts = find_attention(llama.model.layers[0].self_attn)
    assert parts is not None
    assert (parts.num_heads, parts.num_kv, parts.head_dim, parts.groups) == (8, 2, 8, 4)
    assert ATTENTION.dims(llama.model.layers[0].self_attn) == {"heads": 2}
    assert ATTENTION.dims(bert.encoder.layer[0].attention) == {"heads": 4}
    assert ATTENTION.layout == "last" and not ATTENTION.coupled(parts.core)


def test_head_dependent_extra_parameters_are_refused() -> None:
    class Odd(nn.Module):  # a per-channel gain over all heads: pruning would need to cut it
        def __init__(self) -> None:
            super().__init__()
            self.head_dim = 4
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(8, 8) for _ in range(3))
            self.o_proj = nn.Linear(8, 8)
            self.gain = nn.Parameter(torch.ones(8))

    assert find_attention(Odd()) is None
    odd = Odd()
    del odd.gain
    assert find_attention(odd) is not None
    with pytest.raises(UnsupportedModelError, match="register_handler"):
        ATTENTION.dims(nn.Linear(3, 3))


@pytest.mark.parametrize("keeps", [[[2, 0], [1, 2, 3]], [[3, 1, 0, 2], [0]]])
def test_bert_pruned_equals_zeroed_heads(keeps: list[list[int]]) -> None:
    model = tiny_bert()
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = _out(_reference(model, keeps), ids)
    _prune(model, keeps)
    torch.testing.assert_close(_out(model, ids), ref, atol=1e-5, rtol=0)
    sa = model.encoder.layer[0].attention.self
    n = len(keeps[0])
    assert (sa.num_attention_heads, sa.all_head_size, sa.attention_head_size) == (n, 8 * n, 8)
    assert sa.query.weight.shape == (8 * n, 32) and sa.value.bias.shape == (8 * n,)
    assert model.encoder.layer[0].attention.output.dense.weight.shape == (32, 8 * n)
    assert model.config.num_attention_heads == 4  # the shared config is not touched


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_gqa_pruned_equals_zeroed_heads(attn: str) -> None:
    model = tiny_llama(attn)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    keeps = [[1], [1, 0]]  # drop kv head 0 (query heads 0..3) in layer 0; swap in layer 1
    full = _out(model, ids)
    ref = _out(_reference(model, keeps), ids)
    assert (full - ref).abs().max() > 1e-2  # the removed heads did matter
    _prune(model, keeps)
    torch.testing.assert_close(_out(model, ids), ref, atol=1e-5, rtol=0)
    attn0 = model.model.layers[0].self_attn
    assert attn0.q_proj.weight.shape == (32, 64) and attn0.k_proj.weight.shape == (8, 64)
    assert attn0.o_proj.weight.shape == (64, 32) and attn0.o_proj.in_features == 32
    assert (attn0.head_dim, attn0.num_key_value_groups) == (8, 4)
    assert model.config.num_key_value_heads == 2
    with torch.no_grad():  # generation with a cache still runs
        model.generate(ids[:1], max_new_tokens=3, do_sample=False)


def test_opt_pruned_equals_zeroed_heads() -> None:
    model = tiny_opt()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    keeps = [[0, 3], [2]]
    ref = _out(_reference(model, keeps), ids)
    _prune(model, keeps)
    torch.testing.assert_close(_out(model, ids), ref, atol=1e-5, rtol=0)
    assert model.decoder.layers[1].self_attn.num_heads == 1


def test_weight_views_select_whole_kv_groups() -> None:
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    views = ATTENTION.weights(attn, "heads")
    assert len(views) == 4  # q, k, v weights, o weight (no biases)
    (q, qa), (k, _), (v, _), (o, oa) = views
    assert (qa, oa) == (0, 1) and q.shape == (2, 32, 64) and o.shape == (64, 2, 32)
    assert k.shape == v.shape == (2, 8, 64)
    assert torch.equal(q.select(qa, 1), attn.q_proj.weight[32:64])
    assert torch.equal(k.select(0, 1), attn.k_proj.weight[8:16])
    assert torch.equal(o.select(oa, 1), attn.o_proj.weight[:, 32:64])
    assert q.data_ptr() == attn.q_proj.weight.data_ptr()  # a view, not a copy
    assert all(g is None for g, _ in ATTENTION.grads(attn, "heads"))
    model(torch.zeros(1, 4, dtype=torch.int64)).logits.sum().backward()
    grads = ATTENTION.grads(attn, "heads")
    assert [(g.shape, a) for g, a in grads if g is not None] == [(t.shape, a) for t, a in views]
    bert_views = ATTENTION.weights(tiny_bert().encoder.layer[0].attention, "heads")
    assert [t.shape for t, _ in bert_views][:2] == [(4, 8, 32), (4, 8)]  # weight, bias


def test_bad_keep_and_dim_are_refused() -> None:
    attn = tiny_llama().model.layers[0].self_attn
    for keep, match in [
        ([], "at least one"),
        ([0, 0], "unique"),
        ([2], r"\[0, 2\)"),
        ([-1], "unique"),
    ]:
        with pytest.raises(ConfigError, match=match):
            ATTENTION.prune(attn, "heads", torch.tensor(keep, dtype=torch.int64))
    with pytest.raises(ConfigError, match="1-D integer"):
        ATTENTION.prune(attn, "heads", torch.tensor([0.0]))
    with pytest.raises(ConfigError, match="'heads'"):
        ATTENTION.dims(attn) and ATTENTION.weights(attn, "out")
    assert attn.q_proj.weight.shape == (64, 64)  # nothing changed


def test_compression_state_is_refused() -> None:
    attn = tiny_llama().model.layers[0].self_attn
    set_state(attn.k_proj, "weight", WeightState(mask=torch.ones(16, 64, dtype=torch.bool)))
    with pytest.raises(UnsupportedModelError, match="before unstructured"):
        ATTENTION.prune(attn, "heads", torch.tensor([0]))
    assert attn.q_proj.weight.shape == (64, 64)


def test_register_attention_handlers_is_idempotent() -> None:
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    first = register_attention_handlers(model)
    assert first in ([], ["LlamaAttention"])  # [] when an earlier test registered it
    assert handler_for(attn) is ATTENTION
    assert register_attention_handlers(model) == []
    assert handler_for(model.model.layers[0].mlp) is not ATTENTION
