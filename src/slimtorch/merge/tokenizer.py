"""The output tokenizer of a merge of models whose vocabularies differ (mergekit's
``tokenizer_source: union | base | MODEL`` and ``tokenizer: {source, tokens, pad_to_multiple_of}``).

- ``base``: the base model's tokenizer (else the first model's);
- ``union``: the base's tokenizer plus, appended, every token of the other models it lacks (in
  each model's id order, models in config order; mergekit appends them in the hash order of a
  Python set and of the tokenizers library's vocabulary map, which changes from run to run), then
  their added (special) tokens;
- a model path: that model's tokenizer.

Tokens named under ``tokenizer.tokens`` are added when missing. Every input must be a Hugging Face
directory with its tokenizer; :func:`build_plan` returns the output tokenizer, its vocabulary and,
per input, the row of each output token (:mod:`slimtorch.merge.vocab` aligns the tensors).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimtorch.core.errors import ConfigError
from slimtorch.formats.quant_parts import dtype_from_name
from slimtorch.merge.mergekit import MergeConfig
from slimtorch.merge.vocab import TokenSource, align_vocabulary, padded_size

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
)  # fmt: skip


@dataclass
class VocabPlan:
    """The merge's output vocabulary and how each input's token rows map into it."""

    tokenizer: Any  # a transformers tokenizer
    vocab: dict[str, int]
    size: int  # rows of the token tensors (the vocabulary, padded)
    perms: list[dict[int, int]]  # per input: output token id -> the input's row, -1 if absent
    originals: list[dict[str, int]]
    tokens: dict[str, TokenSource]
    sizes: list[int]  # each input's config vocab_size

    def files(self) -> dict[str, bytes]:
        """The tokenizer files ``save_pretrained`` writes, by name."""
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(tmp)
            return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def _load(root: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root), use_fast=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{root}: cannot load its tokenizer ({exc}); merging models whose vocabularies differ"
            " needs each model's tokenizer files"
        ) from None


def vocab_size(root: Path) -> int:
    """``vocab_size`` of a Hugging Face directory's config.json."""
    try:
        cfg = json.loads((root / "config.json").read_text(encoding="utf-8"))
        cfg = cfg.get("text_config", cfg) if "vocab_size" not in cfg else cfg
        return int(cfg["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{root}/config.json has no vocab_size; re-save the model") from None


def _union(base_tok: Any, toks: list[Any], sizes: list[int]) -> Any:
    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in zip(toks, sizes, strict=True):
        for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < size:
                regular.setdefault(token)
        for idx, info in sorted(tok.added_tokens_decoder.items()):
            if idx < size:
                added.setdefault(info.content, info)
    out = _copy(base_tok)
    known = base_tok.get_vocab()
    new = [t for t in regular if t not in added and t not in known]
    if new:
        out.add_tokens(new)
    if added:
        out.add_tokens(list(added.values()))
    return out


def _copy(tok: Any) -> Any:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, use_fast=True)


def build_plan(
    roots: list[Path],
    models: list[str],
    base: int | None,
    source: str,
    tokens: dict[str, TokenSource],
    pad_to_multiple_of: int | None = None,
) -> VocabPlan:
    """The output tokenizer of ``source`` (``union``, ``base`` or a model path) and each input's
    row map; ``roots``/``models`` are the inputs' directories and names in config order."""
    toks = [_load(r) for r in roots]
    sizes = [vocab_size(r) for r in roots]
    ref = base if base is not None else 0
    beyond = [t for t, i in toks[ref].get_vocab().items() if i >= sizes[ref]]
    if beyond:
        raise ConfigError(
            f"{models[ref]}: its tokenizer has {len(beyond)} tokens past the config's vocab_size"
            f" {sizes[ref]} (e.g. {beyond[:3]}); re-save the tokenizer without them"
        )
    if source == "base":
        out = _copy(toks[ref])
    elif source == "union":
        order = [ref] + [i for i in range(len(toks)) if i != ref]
        out = _union(toks[ref], [toks[i] for i in order], [sizes[i] for i in order])
    else:
        out = _copy(toks[models.index(source)] if source in models else _load(Path(source)))
    missing = [t for t in tokens if t not in out.get_vocab()]
    if missing:
        out.add_tokens(missing)
    vocab = dict(sorted(out.get_vocab().items(), key=lambda kv: kv[1]))
    perms = []
    for tok, size in zip(toks, sizes, strict=True):
        own = tok.get_vocab()
        perms.append(
            {tid: own.get(t, -1) if own.get(t, -1) < size else -1 for t, tid in vocab.items()}
        )
    size = padded_size(len(vocab), pad_to_multiple_of)
    return VocabPlan(out, vocab, size, perms, [t.get_vocab() for t in toks], tokens, sizes)


def token_sources(raw: dict[str, dict[str, Any]], models: list[str]) -> dict[str, TokenSource]:
    """``tokenizer.tokens`` of a merge config as :class:`TokenSource` (models by input index)."""

    def index(model: Any, token: str) -> int:
        if model not in models:
            raise ConfigError(
                f"tokenizer.tokens[{token!r}]: source model {model!r} is not one of the merged"
                f" models {models}"
            )
        return models.index(model)

    out = {}
    for token, cfg in raw.items():
        src, force = cfg.get("source"), bool(cfg.get("force", False))
        if isinstance(src, str):
            out[token] = TokenSource("model", model=index(src, token), force=force)
        elif isinstance(src, dict) and src.get("kind") == "zero":
            out[token] = TokenSource("zero", force=force)
        elif isinstance(src, dict) and src.get("kind") == "model_token":
            if ("token" in src) == ("token_id" in src):
                raise ConfigError(f"tokenizer.tokens[{token!r}]: give one of token or token_id")
            tid = src.get("token_id")
            out[token] = TokenSource(
                "model_token", index(src.get("model"), token), src.get("token"),
                None if tid is None else int(tid), force,
            )  # fmt: skip
        else:
            raise ConfigError(
                f"tokenizer.tokens[{token!r}].source must be a model path, {{kind: zero}} or"
                f" {{kind: model_token, model, token | token_id}}; got {src!r}"
            )
    return out


def plan_for(
    roots: list[Path | None],
    kinds: list[str],
    models: list[str],
    base: int | None,
    settings: tuple[str, dict[str, dict[str, Any]], int | None],
    config_dir: Path | None,
) -> VocabPlan:
    """The merge's :class:`VocabPlan` from its ``(tokenizer_source, tokens,
    pad_to_multiple_of)``; every input must be a Hugging Face directory."""
    source, tokens, multiple = settings
    not_hf = [m for m, k, r in zip(models, kinds, roots, strict=True) if k != "hf" or r is None]
    if not_hf:
        raise ConfigError(
            f"tokenizer_source needs Hugging Face directories (config.json + tokenizer files);"
            f" {not_hf} are not"
        )
    if source not in ("union", "base") and source not in models:
        path = Path(source)
        source = str(path if path.is_absolute() or config_dir is None else config_dir / path)
    dirs = [r for r in roots if r is not None]
    return build_plan(dirs, models, base, source, token_sources(tokens, models), multiple)


def vocab_tensors(plan: VocabPlan, infos: list[dict[str, tuple[tuple[int, ...], Any]]]) -> set[str]:
    """Names of the token-indexed tensors: matrices named like embeddings or LM heads whose
    rows are each input's vocab_size."""
    hints = ("embed", "wte", "lm_head", "word_embeddings", "shared", "output.weight")
    names = set()
    for name, (shape, _) in infos[0].items():
        rows = [info[name][0][0] for info in infos]
        if len(shape) == 2 and any(h in name.lower() for h in hints) and rows == plan.sizes:
            names.add(name)
    return names


def patch_files(files: dict[str, bytes], plan: VocabPlan) -> dict[str, bytes]:
    """The reference's small files with its tokenizer replaced by the plan's and config.json's
    vocab_size set to the rows written."""
    out = {k: v for k, v in files.items() if k not in TOKENIZER_FILES}
    out.update(plan.files())
    if "config.json" in out:
        cfg = json.loads(out["config.json"])
        target = cfg["text_config"] if "vocab_size" not in cfg and "text_config" in cfg else cfg
        target["vocab_size"] = plan.size
        out["config.json"] = json.dumps(cfg, indent=2).encode("utf-8")
    return out


def _token_ids(root: Path) -> Any:
    """A tokenizer.json's tokens and ids (model vocabulary and added tokens); None if absent."""
    try:
        data = json.loads((root / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, list):  # Unigram: [piece, score] in id order
        vocab = [v[0] if isinstance(v, list) else v for v in vocab]
    added = sorted((a.get("id"), a.get("content")) for a in data.get("added_tokens") or [])
    return vocab, added


def check_same_vocabulary(sources: list[Any]) -> None:
    """Refuse to merge Hugging Face models whose tokenizers give different ids to the same
    tokens when no tokenizer source aligns them (their rows would be merged token for wrong
    token); ``sources`` are :class:`slimtorch.merge.stream.TensorSource`."""
    roots = [s.root for s in sources if s.kind == "hf" and s.root is not None]
    ids = [(r, _token_ids(r)) for r in roots]
    ids = [(r, v) for r, v in ids if v is not None]
    for root, v in ids[1:]:
        if v != ids[0][1]:
            raise ConfigError(
                f"the tokenizers of {ids[0][0]} and {root} differ: merging their token rows as"
                " they are would mix different tokens; set `tokenizer_source: union` (or base,"
                " or a model) to align their vocabularies"
            )


def sources_plan(
    config: MergeConfig, sources: list[Any], config_dir: Path | None
) -> tuple[VocabPlan | None, set[str]]:
    """The output vocabulary when the config sets a tokenizer source, and the names of the
    token tensors; ``sources`` are :class:`slimtorch.merge.stream.TensorSource`."""
    if config.tokenizer_source is None:
        check_same_vocabulary(sources)
        return None, set()
    settings = (config.tokenizer_source, config.tokens, config.pad_to_multiple_of)
    models = [i.model for i in config.inputs]
    kinds = [s.kind for s in sources]
    plan = plan_for(
        [s.root for s in sources], kinds, models, config.base_index, settings, config_dir
    )
    return plan, vocab_tensors(plan, [s.infos for s in sources])


def aligned(
    config: MergeConfig, plan: VocabPlan, tensors: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Token rows in the output vocabulary's order (cast to ``dtype`` first, as mergekit)."""
    if config.dtype and all(t.is_floating_point() for t in tensors):
        tensors = [t.to(dtype_from_name(config.dtype)) for t in tensors]
    try:
        return align_vocabulary(
            tensors,
            plan.perms,
            plan.vocab,
            plan.size,
            config.base_index,
            plan.tokens,
            plan.originals,
        )
    except ValueError as exc:
        raise ConfigError(f"tokenizer.tokens: {exc}") from None
