"""A quantized KV cache for transformers generation (KIVI-style, no quanto or hqq needed).

:class:`QuantizedKVCache` is a ``transformers`` ``Cache`` whose layers
(:class:`QuantizedKVLayer`) keep the keys per channel and the values per token at 2, 4 or 8
bits (:mod:`slimtorch.runtime.kv_quant`), with a full-precision window: the most recent
``window`` tokens are always exact, and new tokens wait in the window until at least ``group``
tokens beyond it have piled up; then the oldest multiple of ``group`` tokens are quantized
together (keys need whole groups of tokens: one scale per channel per group). So the window
holds between ``window`` and ``window + group - 1`` tokens once the sequence is longer.

Each ``update`` returns the stored past (dequantized, then the window) followed by the new
tokens exactly, so attention over a prompt reads its own tokens in full precision and later
tokens read the quantized past, as in KIVI. Pass it to ``model.generate(ids, cache=cache)`` or
``model(ids, cache=cache)``. Needs ``transformers`` (the ``hf`` extra).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.runtime import kv_quant as kq
from slimtorch.runtime.kv_quant import KVQuantConfig

__all__ = ["KVQuantConfig", "QuantizedKVCache", "QuantizedKVLayer"]


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache: quantized keys/values plus the exact window
    (``self.keys`` / ``self.values``, ``[B, H, tokens, D]``)."""

    is_croppable = False

    def __init__(self, config: KVQuantConfig) -> None:
        super().__init__()
        self.config = config
        self.qkeys: kq.QuantizedKV | None = None
        self.qvalues: kq.QuantizedKV | None = None
        self.quantized_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.config.check_head_dim(key_states.shape[-1])
        self.dtype = key_states.dtype
        self.device = key_states.device
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.is_initialized = True

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored keys and values, ``[B, H, tokens, D]``: dequantized, then the window."""
        assert self.keys is not None and self.values is not None
        if self.qkeys is None or self.qvalues is None:
            return self.keys, self.values
        k = kq.dequantize_keys(self.qkeys, self.dtype)
        v = kq.dequantize_values(self.qvalues, self.dtype)
        return torch.cat([k, self.keys], dim=-2), torch.cat([v, self.values], dim=-2)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past_k, past_v = self.past()
        out = torch.cat([past_k, key_states], dim=-2), torch.cat([past_v, value_states], dim=-2)
        assert self.keys is not None and self.values is not None
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self._flush()
        return out

    def _flush(self) -> None:
        """Quantize the oldest whole groups of the window beyond its ``window`` newest tokens."""
        assert self.keys is not None and self.values is not None
        cfg = self.config
        n = (self.keys.shape[-2] - cfg.window) // cfg.group * cfg.group
        if n <= 0:
            return
        old_k, old_v = self.keys[..., :n, :], self.values[..., :n, :]
        self.qkeys = kq.concat(self.qkeys, kq.quantize_keys(old_k, cfg.bits, cfg.group))
        self.qvalues = kq.concat(self.qvalues, kq.quantize_values(old_v, cfg.bits, cfg.group))
        self.keys = self.keys[..., n:, :].clone()
        self.values = self.values[..., n:, :].clone()
        self.quantized_tokens += n

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        return self.quantized_tokens + self.keys.shape[-2]

    def nbytes(self) -> int:
        """Bytes this layer holds: codes, scales, minimums and the exact window."""
        held = [q.nbytes for q in (self.qkeys, self.qvalues) if q is not None]
        window = [t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None]
        return sum(held) + sum(window)

    def reset(self) -> None:
        self.qkeys = self.qvalues = None
        self.quantized_tokens = 0
        super().reset()

    def _select(self, index: torch.Tensor) -> None:
        assert self.keys is not None and self.values is not None
        index = index.to(self.keys.device)
        self.keys, self.values = self.keys[index], self.values[index]
        if self.qkeys is not None and self.qvalues is not None:
            self.qkeys = kq.select_batch(self.qkeys, index)
            self.qvalues = kq.select_batch(self.qvalues, index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized and self.keys is not None:
            rows = torch.arange(self.keys.shape[0], device=self.keys.device)
            self._select(rows.repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedModelError(
            "the quantized KV cache cannot be cropped (assisted / speculative decoding);"
            " generate without --kv-bits for that"
        )


def head_dim(model_config: Any) -> int:
    """Channels per attention head of a transformers config."""
    text = model_config.get_text_config(decoder=True)
    value = getattr(text, "head_dim", None)
    return int(value) if value else int(text.hidden_size // text.num_attention_heads)


def attention_layers(model_config: Any) -> int:
    """How many cache layers a transformers config needs; raise unless every one is full
    attention (sliding-window, linear or shared-KV layers are not supported)."""
    text = model_config.get_text_config(decoder=True)
    types, _ = get_layer_types_and_kwargs(text)
    other = sorted(set(types) - {"full_attention"})
    if other:
        raise UnsupportedModelError(
            f"the quantized KV cache supports full-attention layers only; this model also has"
            f" {other} layers: generate without --kv-bits"
        )
    return len(types)


class QuantizedKVCache(Cache):
    """A KIVI-style quantized KV cache for a transformers causal LM with ``model_config``."""

    def __init__(self, model_config: Any, config: KVQuantConfig) -> None:
        config.check_head_dim(head_dim(model_config))
        count = attention_layers(model_config)
        self.kv_layers = [QuantizedKVLayer(config) for _ in range(count)]
        super().__init__(layers=list(self.kv_layers))
        self.config = config

    def nbytes(self) -> int:
        """Bytes every layer holds (codes, scales, minimums, exact windows)."""
        return sum(layer.nbytes() for layer in self.kv_layers)


def cache_nbytes(cache: Any) -> int:
    """Bytes a transformers cache holds, counted from its tensors: :class:`QuantizedKVCache`'s
    own count, else the ``keys`` and ``values`` of every layer (``DynamicCache``)."""
    if isinstance(cache, QuantizedKVCache):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def cache_bytes_per_token(cache: Any) -> float:
    """Bytes the cache holds per token of its sequence, summed over layers and the batch."""
    tokens = cache.get_seq_length()
    if tokens <= 0:
        raise UnsupportedModelError("the cache is empty: run the model with it first")
    return cache_nbytes(cache) / tokens


def fp_bytes_per_token(model_config: Any, dtype: torch.dtype) -> int:
    """Bytes per token of a float cache in ``dtype`` (transformers' ``DynamicCache``): keys and
    values of every layer's KV heads."""
    text = model_config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * attention_layers(model_config) * heads * head_dim(model_config) * itemsize


def describe(cache: QuantizedKVCache, model_config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The cache's settings and the bytes per token it holds (from its tensors) against the
    float cache's."""
    held = cache_bytes_per_token(cache)
    fp = fp_bytes_per_token(model_config, dtype)
    cfg = cache.config
    return {
        "bits": cfg.bits,
        "group": cfg.group,
        "window": cfg.window,
        "tokens": cache.get_seq_length(),
        "bytes_per_token": held,
        "fp_bytes_per_token": fp,
        "ratio": fp / held,
    }
