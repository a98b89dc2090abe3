"""The KIVI-style quantized KV cache: its maths (packing, per-channel keys, per-token values), the
exact window, bytes per token counted from its tensors, greedy generation on a tiny Llama, and
bad options."""

from __future__ import annotations

import pytest
import torch

from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.runtime import kv_quant as kq
from slimtorch.runtime.kv_cache import (
    KVQuantConfig,
    QuantizedKVCache,
    QuantizedKVLayer,
    cache_bytes_per_token,
    cache_nbytes,
    fp_bytes_per_token,
)
from slimtorch.testing.models import tiny_llama

FP16_EPS = 2.0**-10


def _kv(tokens: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, tokens, dim, generator=g)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_round_trips_and_takes_bits_over_8_bytes(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (2, 3, 5, 16), generator=torch.Generator().manual_seed(1))
    packed = kq.pack_codes(codes.to(torch.uint8), bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, 16 * bits // 8)
    assert torch.equal(kq.unpack_codes(packed, bits), codes.to(torch.uint8))
    if bits == 4:  # value 0 in the low nibble, value 1 in the high one
        assert int(packed[0, 0, 0, 0]) == int(codes[0, 0, 0, 0]) | int(codes[0, 0, 0, 1]) << 4


def _bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Half a step plus float16 rounding of the group's minimum and range."""
    return scale.float() / 2 + 2 * FP16_EPS * x.abs().amax() + 1e-7


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_keys_round_trip_per_channel_within_half_a_step(bits: int) -> None:
    k = _kv(64)
    k[..., 5] *= 40.0  # an outlier channel, as keys have
    q = kq.quantize_keys(k, bits, group=16)
    assert q.scale.shape == (2, 3, 4, 16) and q.zero.shape == (2, 3, 4, 16)
    back = kq.dequantize_keys(q, torch.float32)
    err = (back - k).abs().reshape(2, 3, 4, 16, 16)
    assert bool((err <= _bound(k, q.scale)[:, :, :, None]).all())
    # per channel: the outlier channel does not widen the other channels' steps
    others = torch.cat([err[..., :5], err[..., 6:]], dim=-1)
    assert float(others.max()) < float(err[..., 5].max()) / 10


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_values_round_trip_per_token_within_half_a_step(bits: int) -> None:
    v = _kv(10)
    q = kq.quantize_values(v, bits, group=8)
    assert q.scale.shape == (2, 3, 10, 2)
    back = kq.dequantize_values(q, torch.float32)
    err = (back - v).abs().reshape(2, 3, 10, 2, 8)
    assert bool((err <= _bound(v, q.scale)[..., None]).all())
    rms = float((back - v).pow(2).mean().sqrt())
    assert rms < {8: 0.01, 4: 0.15, 2: 0.6}[bits]


def test_constant_groups_and_bad_shapes() -> None:
    flat = torch.full((1, 1, 4, 8), 3.0)
    assert torch.equal(kq.dequantize_keys(kq.quantize_keys(flat, 4, 4), torch.float32), flat)
    with pytest.raises(ValueError, match="multiple of the group"):
        kq.quantize_keys(_kv(10), 8, 4)
    with pytest.raises(ValueError, match="multiple of the group"):
        kq.quantize_values(_kv(4, dim=12), 8, 8)
    with pytest.raises(ValueError, match="one of"):
        kq.quantize_values(_kv(4), 3, 8)


def test_the_window_stays_exact_and_whole_groups_are_quantized() -> None:
    cfg = KVQuantConfig(bits=4, group=8, window=12)
    layer = QuantizedKVLayer(cfg)
    k_all, v_all = _kv(70), _kv(70, seed=1)
    for t in range(70):
        k, v = k_all[..., t : t + 1, :], v_all[..., t : t + 1, :]
        out_k, out_v = layer.update(k, v)
        assert torch.equal(out_k[..., -1:, :], k) and torch.equal(out_v[..., -1:, :], v)
        assert layer.get_seq_length() == t + 1 and out_k.shape[-2] == t + 1
        assert layer.quantized_tokens % 8 == 0
        kept = layer.keys.shape[-2]  # type: ignore[union-attr]
        assert kept == t + 1 if t + 1 < 20 else 12 <= kept < 20
        past_k, past_v = layer.past()
        assert torch.equal(past_k[..., -12:, :], k_all[..., max(0, t - 11) : t + 1, :])
        assert torch.equal(past_v[..., -12:, :], v_all[..., max(0, t - 11) : t + 1, :])
    past_k, _ = layer.past()
    err = (past_k - k_all).abs().max()
    assert 0 < float(err) < 1.0  # the old tokens are quantized (4 bits), not lost


def test_a_prompt_reads_itself_exactly_and_later_tokens_read_the_quantized_past() -> None:
    layer = QuantizedKVLayer(KVQuantConfig(bits=2, group=4, window=0))
    k, v = _kv(16), _kv(16, seed=1)
    out_k, out_v = layer.update(k, v)
    assert torch.equal(out_k, k) and torch.equal(out_v, v)  # the prompt: exact
    assert layer.quantized_tokens == 16
    nk, nv = _kv(1, seed=2), _kv(1, seed=3)
    out_k, _ = layer.update(nk, nv)
    assert torch.equal(out_k[..., :16, :], kq.dequantize_keys(layer.qkeys, k.dtype))  # type: ignore[arg-type]
    assert not torch.equal(out_k[..., :16, :], k)


def test_beam_reorder_is_exact() -> None:
    layer = QuantizedKVLayer(KVQuantConfig(bits=4, group=4, window=2))
    layer.update(_kv(10), _kv(10, seed=1))
    before = layer.past()
    layer.reorder_cache(torch.tensor([1, 0]))  # type: ignore[arg-type]
    after = layer.past()
    assert torch.equal(after[0], before[0][[1, 0]]) and torch.equal(after[1], before[1][[1, 0]])
    layer.batch_repeat_interleave(2)
    assert layer.past()[0].shape[0] == 4


def _model() -> torch.nn.Module:
    return tiny_llama(layers=2, heads=2, kv_heads=1, std=0.1, max_positions=256)


def _greedy(model: torch.nn.Module, ids: torch.Tensor, cache: object = None) -> torch.Tensor:
    more = {} if cache is None else {"cache": cache}
    out = model.generate(  # type: ignore[operator]
        ids, do_sample=False, use_cache=True, max_new_tokens=40, min_new_tokens=40,
        pad_token_id=0, **more,
    )  # fmt: skip
    return out[:, ids.shape[1] :]  # type: ignore[no-any-return]


def test_generate_at_8_bits_gives_the_float_caches_greedy_tokens() -> None:
    model = _model()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = QuantizedKVCache(model.config, KVQuantConfig(bits=8, group=8, window=8))
    with torch.inference_mode():
        assert torch.equal(_greedy(model, ids, cache), _greedy(model, ids))
    # 51 tokens stored (12 + 40 - the last), 40 of them quantized in whole groups of 8
    assert cache.get_seq_length() == 51
    assert all(layer.quantized_tokens == 40 for layer in cache.kv_layers)


def test_bytes_per_token_from_the_tensors() -> None:
    from transformers import DynamicCache

    model = _model()  # 2 layers, 1 KV head of 32 channels, float32
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(0))
    fp = DynamicCache(config=model.config)  # type: ignore[arg-type]
    with torch.inference_mode():
        model(ids, cache=fp, use_cache=True)
    assert cache_bytes_per_token(fp) == fp_bytes_per_token(model.config, torch.float32) == 512
    for bits in (8, 4, 2):
        cache = QuantizedKVCache(model.config, KVQuantConfig(bits=bits, group=8, window=10))
        with torch.inference_mode():
            model(ids, cache=cache, use_cache=True)
        # 40 tokens quantized, 10 exact; per layer: codes 2 x 40 x 32 x bits / 8, float16
        # scale + minimum per channel per 8 keys (5 x 32 x 4 B) and per 8 channels per value
        # (40 x 4 x 4 B), the window 2 x 10 x 32 x 4 B
        per_layer = 2 * 40 * 32 * bits // 8 + 5 * 32 * 4 + 40 * 4 * 4 + 2 * 10 * 32 * 4
        assert cache_nbytes(cache) == 2 * per_layer
        assert cache_bytes_per_token(cache) == 2 * per_layer / 50
        assert kq.bytes_per_token(bits, 8, 32) * 40 == per_layer - 2 * 10 * 32 * 4


def test_bad_options_are_rejected() -> None:
    for kwargs, match in (
        ({"bits": 3}, "--kv-bits must be one of"),
        ({"group": 24}, "--kv-group must be a power of two"),
        ({"group": 0}, "--kv-group must be a power of two"),
        ({"window": -1}, "--kv-window must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=match):
            KVQuantConfig(**kwargs)  # type: ignore[arg-type]
    model = _model()
    with pytest.raises(ConfigError, match="must divide the head dimension 32"):
        QuantizedKVCache(model.config, KVQuantConfig(group=64))
    with pytest.raises(UnsupportedModelError, match="cannot be cropped"):
        QuantizedKVLayer(KVQuantConfig()).crop(-1)


def test_sliding_window_models_are_refused() -> None:
    from transformers import MistralConfig

    config = MistralConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=16,
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="full-attention layers only"):
        QuantizedKVCache(config, KVQuantConfig(group=8))


def test_half_precision_states_come_back_in_their_dtype() -> None:
    layer = QuantizedKVLayer(KVQuantConfig(bits=4, group=4, window=0))
    k, v = _kv(8).to(torch.bfloat16), _kv(8, seed=1).to(torch.bfloat16)
    layer.update(k, v)
    out_k, out_v = layer.update(k[..., :1, :], v[..., :1, :])
    assert out_k.dtype == out_v.dtype == torch.bfloat16 and out_k.shape[-2] == 9
    assert float((out_k[..., :8, :].float() - k.float()).abs().max()) < 0.6
