"""A Hugging Face ``tokenizer.json`` rebuilt from a GGUF file's ``tokenizer.ggml.*`` metadata.

The ``gpt2`` tokenizer model is rebuilt (byte-level BPE: vocabulary, merges, token types, and
the Hugging Face pre-tokenizer that mirrors llama.cpp's named by ``tokenizer.ggml.pre``); control
tokens become special added tokens. Anything else (SentencePiece ``llama`` vocabularies, unknown
pre-tokenizers) is logged and skipped: the model still loads, and the text tasks ask for
``--tokenizer``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# llama.cpp's pre-tokenizer names (llama-vocab.cpp) -> the Hugging Face pre-tokenizer it mirrors
DIGITS_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
GPT2 = {"default", "gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion"}
LLAMA3 = {"llama3", "llama-bpe", "llama-v3", "smaug-bpe", "falcon3", "dbrx"}
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGITS_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in GPT2:
        return byte_level
    if pre in LLAMA3:
        split = pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False)
        no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, no_regex])
    return None


def _added(tokenizer: Any, tokens: list[str], types: list[int]) -> None:
    from tokenizers import AddedToken

    special = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, t in enumerate(types)
        if t == CONTROL
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, t in enumerate(types)
        if t == USER_DEFINED
    ]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)


def _bos_processor(meta: dict[str, Any], tokens: list[str], fallback: Any) -> Any:
    from tokenizers import processors

    bos = meta.get("tokenizer.ggml.bos_token_id")
    if not meta.get("tokenizer.ggml.add_bos_token") or bos is None:
        return fallback
    name = tokens[int(bos)]
    return processors.TemplateProcessing(
        single=f"{name} $A", pair=f"{name} $A {name} $B", special_tokens=[(name, int(bos))]
    )


def gpt2_tokenizer(meta: dict[str, Any], tokens: list[str], types: list[int]) -> Any | None:
    """Byte-level BPE; None (logged) when llama.cpp's pre-tokenizer name is not one we mirror."""
    from tokenizers import Tokenizer, decoders, models, processors

    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    pre_tokenizer = _pre_tokenizer(pre)
    if pre_tokenizer is None:
        log.warning("GGUF pre-tokenizer %r is not one slimtorch rebuilds; no tokenizer.json", pre)
        return None
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _bos_processor(
        meta, tokens, processors.ByteLevel(trim_offsets=False)
    )
    _added(tokenizer, tokens, types)
    return tokenizer


def _token_config(meta: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    }
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        if idx is not None and 0 <= int(idx) < len(tokens):
            config[f"{role}_token"] = tokens[int(idx)]
    ctx = meta.get(f"{meta.get('general.architecture')}.context_length")
    if ctx:
        config["model_max_length"] = int(ctx)
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = str(meta["tokenizer.chat_template"])
    return config


def write_tokenizer_files(meta: dict[str, Any], out: Path, path: Path) -> bool:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out``; False (logged) when
    the GGUF file's tokenizer is missing or of a kind slimtorch does not rebuild."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        log.warning("%s has no tokenizer metadata; give one with --tokenizer", path)
        return False
    tokens = [str(t) for t in tokens]
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
    if kind == "gpt2":
        tokenizer = gpt2_tokenizer(meta, tokens, types)
    else:
        log.warning("%s: GGUF tokenizer model %r is not rebuilt (only gpt2)", path, kind)
        tokenizer = None
    if tokenizer is None:
        return False
    tokenizer.save(str(out / "tokenizer.json"))
    text = json.dumps(_token_config(meta, tokens), indent=2, ensure_ascii=False)
    (out / "tokenizer_config.json").write_text(text + "\n", encoding="utf-8")
    return True
