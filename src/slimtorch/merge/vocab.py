"""Token-indexed tensors of models with different vocabularies, aligned to one output vocabulary.

mergekit 0.1.5's rules (``tokenizer_source`` / ``tokenizer.tokens``), as pure functions:

- ``perms[m][new_id]`` is the row of model ``m`` holding that token, ``-1`` where ``m`` lacks it;
- a token every model has keeps each model's own row (the merge method then merges them);
- a token some model lacks gets, in that model, a default row: from the one model that has it,
  else from the base model if the base has it, else the mean of the rows of the models that have
  it (summed in model order, then divided), else zeros; ``tokens: {TOKEN: {source, force}}``
  chooses the default (a model's row of that token, a model's row of another token, or zeros)
  and ``force: true`` uses it in every model, even those that have the token;
- rows past the vocabulary (``pad_to_multiple_of``) are the mean of each model's aligned rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenSource:
    """Where a token's default row comes from: ``zero``, a model's row of this token
    (``model``), or a model's row of another token (``model_token``: ``token`` or ``token_id``
    in that model's own vocabulary)."""

    kind: str  # zero | model | model_token
    model: int | None = None  # an index into the inputs
    token: str | None = None
    token_id: int | None = None
    force: bool = False


def padded_size(vocab_size: int, multiple: int | None) -> int:
    """Rows of the output vocabulary: ``vocab_size`` rounded up to ``multiple``."""
    if multiple and vocab_size % multiple:
        return (vocab_size // multiple + 1) * multiple
    return vocab_size


def default_sources(
    perms: list[dict[int, int]],
    vocab: dict[str, int],
    base: int | None,
    chosen: dict[str, TokenSource],
) -> tuple[dict[str, TokenSource], set[str]]:
    """The default row source of every token some model lacks (``chosen`` first), and the
    tokens whose default is the mean over the models that have them."""
    sources = dict(chosen)
    average: set[str] = set()
    for token, tid in vocab.items():
        if token in sources:
            continue
        has = [p.get(tid, -1) >= 0 for p in perms]
        if all(has):
            continue
        if sum(has) == 1:
            sources[token] = TokenSource("model", model=has.index(True))
        elif not any(has):
            sources[token] = TokenSource("zero")
        elif base is not None and has[base]:
            sources[token] = TokenSource("model", model=base)
        else:
            average.add(token)
    return sources, average


def _default_row(
    src: TokenSource,
    views: list[torch.Tensor],
    perms: list[dict[int, int]],
    tid: int,
    originals: list[dict[str, int]],
) -> torch.Tensor:
    if src.kind == "zero" or src.model is None:
        return views[0].new_zeros(views[0].shape[1:])
    m = src.model
    if src.kind == "model_token":
        row = src.token_id if src.token_id is not None else originals[m].get(src.token or "", -1)
        if not 0 <= row < views[m].shape[0]:
            raise ValueError(
                f"token {src.token or src.token_id!r} is not in model {m}'s vocabulary"
            )
        return views[m][row]
    row = perms[m].get(tid, -1)
    if row < 0:
        raise ValueError(f"model {m} has no row for token id {tid}")
    return views[m][row]


def align_vocabulary(
    tensors: list[torch.Tensor],
    perms: list[dict[int, int]],
    vocab: dict[str, int],
    size: int,
    base: int | None,
    chosen: dict[str, TokenSource],
    originals: list[dict[str, int]],
    axis: int = 0,
) -> list[torch.Tensor]:
    """Each model's token-indexed tensor (vocabulary along ``axis``) with ``size`` rows in the
    output vocabulary's order, in the models' promoted dtype."""
    if any(not 0 <= tid < size for tid in vocab.values()):
        raise ValueError(f"token ids must lie in [0, {size}); the vocabulary is not contiguous")
    views = [t.movedim(axis, 0) for t in tensors]
    if any(v.shape[1:] != views[0].shape[1:] for v in views):
        raise ValueError(
            f"token tensors differ beyond the vocabulary axis: {[v.shape for v in views]}"
        )
    dtype = views[0].dtype
    for v in views:
        dtype = torch.promote_types(dtype, v.dtype)
    views = [v.to(dtype) for v in views]
    sources, average = default_sources(perms, vocab, base, chosen)
    defaults: dict[str, torch.Tensor] = {}
    for token, tid in vocab.items():
        src = sources.get(token)
        if token in average:
            total, count = views[0].new_zeros(views[0].shape[1:]), 0
            for v, p in zip(views, perms, strict=True):
                if p.get(tid, -1) >= 0:
                    total, count = total + v[p[tid]], count + 1
            defaults[token] = total / count
        elif src is not None and (src.force or any(p.get(tid, -1) < 0 for p in perms)):
            defaults[token] = _default_row(src, views, perms, tid, originals)
    forced = {t for t, s in sources.items() if s.force and t in vocab}
    out = []
    for v, p in zip(views, perms, strict=True):
        new = v.new_zeros((size, *v.shape[1:]))
        ids = torch.full((size,), -1, dtype=torch.long)
        for token, tid in vocab.items():
            ids[tid] = -1 if token in forced else p.get(tid, -1)
        keep = (ids >= 0).nonzero().flatten()
        new[keep] = v[ids[keep]]
        for token, row in defaults.items():
            tid = vocab[token]
            if ids[tid] < 0:
                new[tid] = row
        if size > len(vocab):
            new[len(vocab) :] = torch.mean(new[: len(vocab)], dim=0)
        out.append(new.movedim(0, axis))
    return out
