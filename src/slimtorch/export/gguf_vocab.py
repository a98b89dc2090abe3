"""The ``tokenizer.ggml.*`` metadata of a GGUF file (:mod:`slimtorch.export.gguf`) from a
byte-level BPE ``tokenizer.json``, as llama.cpp's converter writes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.core.info import model_info

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def _looks_special(token: str) -> bool:
    """llama.cpp's ``does_token_look_special``: added tokens marked non-special that are."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a ``tokenizer.json`` pre-tokenizer: the name of
    the rule that splits the same way (``smollm``: digits one by one then GPT-2's byte-level
    regex; ``gpt-2``; ``llama-bpe``: Llama 3's regex), else ``default``."""
    if not pre:
        return "default"
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or byte_level.get("add_prefix_space"):
        return "default"
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and byte_level.get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        from slimtorch.models.gguf_tokenizer import LLAMA3_REGEX

        if steps[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX:
            return "llama-bpe"
    return "default"


def find_tokenizer(model: nn.Module, given: str | Path | None = None) -> Path | None:
    """``tokenizer.json`` of the model: ``given``, the one its info records, or the one in the
    directory it was loaded from; None if there is none."""
    from slimtorch.calibrate.text import tokenizer_file

    spec = str(given) if given else model_info(model).tokenizer
    if spec:
        return tokenizer_file(spec)
    where = getattr(getattr(model, "config", None), "_name_or_path", None)
    path = Path(str(where)) / "tokenizer.json" if where else None
    return path if path is not None and path.is_file() else None


def _token_id(entry: Any, ids: dict[str, int]) -> int | None:
    content = entry.get("content") if isinstance(entry, dict) else entry
    return ids.get(content) if isinstance(content, str) else None


def tokenizer_metadata(path: Path, vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` values of a byte-level BPE ``tokenizer.json`` (and the
    ``tokenizer_config.json`` beside it), as llama.cpp's ``_set_vocab_gpt2`` and
    ``SpecialVocab`` write them: ids the vocabulary lacks up to ``vocab_size`` become
    ``[PAD<i>]`` tokens of type UNUSED."""
    import json

    spec = json.loads(path.read_text(encoding="utf-8"))
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise UnsupportedModelError(
            f"{path} is not a byte-level BPE tokenizer (model {bpe.get('type')!r}); --to gguf"
            " writes GPT-2-style BPE vocabularies (llama.cpp's gpt2 tokenizer model) only"
        )
    ids: dict[str, int] = dict(bpe.get("vocab") or {})
    added = {a["content"]: a for a in spec.get("added_tokens") or []}
    for content, a in added.items():
        ids[content] = int(a["id"])
    if ids and max(ids.values()) >= vocab_size:
        raise UnsupportedModelError(
            f"{path} has token id {max(ids.values())}, beyond the model's {vocab_size}-token"
            " vocabulary: it is not this model's tokenizer"
        )
    by_id = {i: t for t, i in ids.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif token in added:
            special = bool(added[token].get("special")) or _looks_special(token)
            tokens.append(token)
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges") or []]
    meta: dict[str, Any] = {
        "model": "gpt2",
        "pre": pre_tokenizer_name(spec.get("pre_tokenizer")),
        "tokens": tokens,
        "token_type": types,
        "merges": merges,
    }
    config_file = path.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        found = _token_id(config.get(f"{role}_token"), ids)
        if found is not None:
            meta[f"{key}_token_id"] = found
    if "add_bos_token" in config:
        meta["add_bos_token"] = bool(config["add_bos_token"])
    if "add_eos_token" in config:
        meta["add_eos_token"] = bool(config["add_eos_token"])
    if "add_prefix_space" in config:
        meta["add_space_prefix"] = bool(config["add_prefix_space"])
    template = config.get("chat_template")
    jinja = path.parent / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, str) and template:
        meta["chat_template"] = template
    if vocab_size == 49152:  # llama.cpp's LlamaModel.set_vocab does this for 49,152-token vocabs
        meta["add_bos_token"] = False
    return meta
