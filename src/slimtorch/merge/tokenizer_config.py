"""The ``tokenizer_source`` / ``tokenizer`` keys of a mergekit config, checked, as
:class:`slimtorch.merge.mergekit.MergeConfig` fields (``tokenizer_source``, ``tokens``,
``pad_to_multiple_of``); :mod:`slimtorch.merge.tokenizer` builds the output tokenizer."""

from __future__ import annotations

from typing import Any

from slimtorch.core.errors import ConfigError


def tokenizer_fields(data: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer_source`` / ``tokenizer`` as MergeConfig fields (mergekit: ``tokenizer`` wins)."""
    raw, source = data.get("tokenizer"), data.get("tokenizer_source")
    if raw is None:
        return {"tokenizer_source": _source(source)} if source is not None else {}
    if not isinstance(raw, dict) or set(raw) - {"source", "tokens", "pad_to_multiple_of"}:
        raise ConfigError(
            f"`tokenizer` must be a mapping of source, tokens, pad_to_multiple_of; got {raw!r}"
        )
    tokens = raw.get("tokens") or {}
    if not isinstance(tokens, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) and set(v) <= {"source", "force"}
        for k, v in tokens.items()
    ):
        raise ConfigError(
            "tokenizer.tokens must map each token to {source: MODEL | {kind: zero} |"
            " {kind: model_token, model: MODEL, token: T | token_id: N}, force: BOOL}"
        )
    return {
        "tokenizer_source": _source(raw.get("source", "union")),
        "tokens": tokens,
        "pad_to_multiple_of": raw.get("pad_to_multiple_of"),
    }


def _source(value: Any) -> str:
    if isinstance(value, str) and value:
        return value
    raise ConfigError(f"tokenizer source must be union, base or a model path, got {value!r}")
