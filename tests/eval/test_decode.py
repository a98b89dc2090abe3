"""Decoding speed and greedy text of a causal LM (slimtorch.eval.decode) on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from slimtorch.core.errors import UserInputError
from slimtorch.eval.decode import (
    cannot_generate,
    decode_tokens_per_s,
    generate_text,
    is_causal_lm,
    random_prompt,
)


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


class _Chars:
    """A tokenizers-like character tokenizer over 64 ids (encode(...).ids, decode(ids))."""

    class _Encoding:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

    def encode(self, text: str) -> _Chars._Encoding:
        return self._Encoding([ord(c) % 64 for c in text])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(48 + i) for i in ids)


def test_prompt_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a, b = random_prompt(100, 64), random_prompt(100, 64)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, b) and a.shape == (1, 64)
    assert int(a.min()) >= 0 and int(a.max()) < 100 and len(set(a.flatten().tolist())) > 30
    assert not torch.equal(a, random_prompt(100, 64, seed=1))


def test_tokens_per_s_decodes_the_requested_count() -> None:
    model = _llama()
    model.generation_config.eos_token_id = 3  # eos must not cut the timed run short
    calls: list[int] = []
    generate = model.generate

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = generate(*args, **kwargs)
        calls.append(out.shape[1] - args[0].shape[1])
        return out

    model.generate = counted  # type: ignore[method-assign]
    rate = decode_tokens_per_s(model, random_prompt(64, 16), new_tokens=20, repeats=2)
    assert rate > 0
    # a short warm-up, then per timed run: prefill + 1 token, and the full 20 new tokens
    assert calls == [8, 1, 20, 1, 20]


def test_generate_text_is_transformers_greedy_continuation() -> None:
    model, tok = _llama(), _Chars()
    model.generation_config.eos_token_id = None
    result = generate_text(model, tok, "hello world", max_new_tokens=12)
    ids = torch.tensor([tok.encode("hello world").ids])
    want = model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0)[
        0, ids.shape[1] :
    ]
    assert result["text"] == tok.decode(want.tolist())
    assert result["new_tokens"] == 12 and result["tokens_per_s"] > 0 and result["seconds"] > 0


def test_models_that_cannot_generate_are_refused() -> None:
    lenet = nn.Sequential(nn.Linear(4, 2))
    assert not is_causal_lm(lenet) and "not a causal LM" in str(cannot_generate(lenet))
    assert is_causal_lm(_llama()) and cannot_generate(_llama()) is None
    with pytest.raises(UserInputError, match="not a causal LM"):
        decode_tokens_per_s(lenet, random_prompt(4, 4))
    with pytest.raises(UserInputError, match="at least 2 new tokens"):
        decode_tokens_per_s(_llama(), random_prompt(64, 4), new_tokens=1)
    with pytest.raises(UserInputError, match="prompt is empty"):
        generate_text(_llama(), _Chars(), "", 4)
