"""PrunedMultiheadAttention: equal to nn.MultiheadAttention, head pruning exact, config round trip."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from slimtorch.core.errors import (
    ArtifactError,
    ConfigError,
    UnsupportedModelError,
    UserInputError,
)
from slimtorch.formats.state import WeightState, set_state
from slimtorch.graph.handlers import handler_for
from slimtorch.runtime import RUNTIME_MODULES
from slimtorch.runtime.attention import PrunedMultiheadAttention

ATOL = 1e-6
E, HEADS, L, S, N = 8, 4, 3, 5, 2

VARIANTS: list[dict[str, Any]] = [
    {},
    {"batch_first": True},
    {"kdim": 6, "vdim": 7},
    {"add_bias_kv": True, "add_zero_attn": True, "batch_first": True},
    {"bias": False},
]


def _mha(**kw: Any) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, **kw).double().eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(0, 0.5)
    return mha


def _inputs(mha: nn.MultiheadAttention) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    lead = (N, L) if mha.batch_first else (L, N)
    lead_s = (N, S) if mha.batch_first else (S, N)
    q = torch.randn(*lead, E, generator=g, dtype=torch.double)
    k = torch.randn(*lead_s, mha.kdim, generator=g, dtype=torch.double)
    v = torch.randn(*lead_s, mha.vdim, generator=g, dtype=torch.double)
    return q, k, v


def _masks() -> dict[str, Tensor]:
    attn = torch.zeros(L, S, dtype=torch.bool)
    attn[0, 1] = attn[2, 4] = True
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, 0] = True
    return {"attn_mask": attn, "key_padding_mask": kpm}


def _close(a: Any, b: Any) -> None:
    torch.testing.assert_close(a[0], b[0], atol=ATOL, rtol=0)
    if b[1] is None:
        assert a[1] is None
    else:
        torch.testing.assert_close(a[1], b[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kw", VARIANTS)
def test_equals_mha_with_all_heads(kw: dict[str, Any]) -> None:
    mha = _mha(**kw)
    new = PrunedMultiheadAttention.from_mha(mha)
    q, k, v = _inputs(mha)
    for args in ({}, _masks(), {"need_weights": False}, {"average_attn_weights": False}):
        _close(new(q, k, v, **args), mha(q, k, v, **args))
    float_mask = torch.randn(N * HEADS, L, S, dtype=torch.double)
    _close(new(q, k, v, attn_mask=float_mask), mha(q, k, v, attn_mask=float_mask))
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)
    _close(new(q, k, v, attn_mask=causal, is_causal=True), mha(q, k, v, attn_mask=causal))
    _close(new(q, k, v, is_causal=True), mha(q, k, v, attn_mask=causal))
    # unbatched (L, E) inputs
    q1, k1, v1 = (t.select(0 if mha.batch_first else 1, 0) for t in (q, k, v))
    _close(new(q1, k1, v1, average_attn_weights=False), mha(q1, k1, v1, average_attn_weights=False))


@pytest.mark.parametrize("kw", VARIANTS)
def test_pruned_heads_equal_head_masked_original(kw: dict[str, Any]) -> None:
    mha = _mha(**kw)
    q, k, v = _inputs(mha)
    keep = torch.tensor([3, 1])
    hd = E // HEADS
    h = handler_for(mha)
    assert h is not None and h.dims(mha) == {"heads": HEADS} and h.layout == "last"
    for t, axis in h.weights(mha, "heads"):
        assert t.shape[axis] == HEADS
    new = h.prune(mha, "heads", keep)
    assert isinstance(new, PrunedMultiheadAttention) and new.num_heads == 2
    assert new.q_proj.weight.shape == (2 * hd, E) and new.out_proj.weight.shape == (E, 2 * hd)
    with torch.no_grad():  # the original, with heads 0 and 2 silenced
        mha.out_proj.weight.view(E, HEADS, hd)[:, [0, 2]] = 0
    ref_out, ref_w = mha(q, k, v, average_attn_weights=False, **_masks())
    out, w = new(q, k, v, average_attn_weights=False, **_masks())
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(w, ref_w[:, keep], atol=ATOL, rtol=0)  # type: ignore[index]


def test_head_permutation_is_exact_and_prunable_again() -> None:
    mha = _mha(batch_first=True)
    q, k, v = _inputs(mha)
    ref_out, ref_w = mha(q, k, v, average_attn_weights=False)
    perm = torch.tensor([2, 0, 3, 1])
    new = handler_for(mha).prune(mha, "heads", perm)  # type: ignore[union-attr]
    assert isinstance(new, PrunedMultiheadAttention)
    out, w = new(q, k, v, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(w, ref_w[:, perm], atol=ATOL, rtol=0)  # type: ignore[index]
    # prune the pruned module again, in place: keep old heads 3 and 2 (now at 2 and 0)
    h2 = handler_for(new)
    assert h2 is not None and h2 is not handler_for(mha) and h2.dims(new) == {"heads": 4}
    assert h2.prune(new, "heads", torch.tensor([2, 0])) is None
    assert new.num_heads == 2 and new.k_proj.out_features == 4
    _, w2 = new(q, k, v, average_attn_weights=False)
    torch.testing.assert_close(w2, ref_w[:, [3, 2]], atol=ATOL, rtol=0)  # type: ignore[index]


def test_config_round_trip_through_json_and_registry() -> None:
    mha = _mha(kdim=6, vdim=7, add_bias_kv=True, dropout=0.1)
    new = handler_for(mha).prune(mha, "heads", torch.tensor([0, 3, 1]))  # type: ignore[union-attr]
    assert isinstance(new, PrunedMultiheadAttention)
    cfg = json.loads(json.dumps(new.config()))
    assert cfg["num_heads"] == 3 and cfg["head_dim"] == 2 and cfg["kdim"] == 6
    again = RUNTIME_MODULES.get("PrunedMultiheadAttention").from_config(cfg)  # type: ignore[attr-defined]
    again.double().load_state_dict(new.state_dict())
    again.eval()
    q, k, v = _inputs(mha)
    _close(again(q, k, v), new(q, k, v))
    assert again.config() == new.config()
    assert set(new.state_dict()) >= {"q_proj.weight", "out_proj.bias", "bias_k", "bias_v"}


def test_training_mode_dtype_and_requires_grad_carry_over() -> None:
    mha = nn.MultiheadAttention(E, HEADS, dropout=0.5)
    mha.in_proj_weight.requires_grad_(False)
    new = PrunedMultiheadAttention.from_mha(mha)
    assert new.training and new.out_proj.weight.dtype == torch.float32
    assert not new.q_proj.weight.requires_grad and new.q_proj.bias.requires_grad  # type: ignore[union-attr]
    x = torch.randn(L, N, E)
    out, _ = new(x, x, x)
    assert out.shape == (L, N, E)


def test_bad_inputs() -> None:
    with pytest.raises(ArtifactError, match="re-save the artifact"):
        PrunedMultiheadAttention.from_config({"embed_dim": 8})
    mha = _mha()
    new = handler_for(mha).prune(mha, "heads", torch.tensor([0, 1]))  # type: ignore[union-attr]
    q, k, v = _inputs(mha)
    with pytest.raises(UserInputError, match="batch \\* num_heads"):
        new(q, k, v, attn_mask=torch.zeros(N * HEADS, L, S))  # type: ignore[misc]
    set_state(mha, "in_proj_weight", WeightState(mask=torch.ones(3 * E, E, dtype=torch.bool)))
    with pytest.raises(ConfigError, match="structured pruning must come first"):
        handler_for(mha).prune(mha, "heads", torch.tensor([0]))  # type: ignore[union-attr]
    with pytest.raises(UserInputError, match="at least one"):
        handler_for(new).prune(new, "heads", torch.tensor([], dtype=torch.int64))  # type: ignore[union-attr]
    new.k_proj = nn.Identity()  # type: ignore[assignment]
    with pytest.raises(UnsupportedModelError, match="no longer an nn"):
        handler_for(new).prune(new, "heads", torch.tensor([0]))  # type: ignore[union-attr]
