"""What each block of a model really receives: the (args, kwargs) of its call, per batch.

A block's call carries more than the hidden states: the attention mask, rotary position
embeddings, position ids. They are computed once per forward pass before the blocks run, but
not necessarily the same for every block: Gemma2/Gemma3 (and every model with
``config.layer_types``) alternate sliding-window and global attention layers, each kind with its
own mask (and Gemma3 its own rotary embeddings). So the sequential pipeline captures the call of
EVERY block, once per batch, in one cheap pass: each block's ``forward`` is replaced for the
pass by a stand-in that records what it is given and hands its hidden states straight on (the
blocks' own weights are never touched, so this also works while they are still on ``meta`` in
the offloaded path); the last block stops the pass. The pipeline then feeds block ``i`` its own
recorded call with the hidden states produced by the (compressed) blocks before it.

Models differ in what a block returns (a tensor, or a tuple whose first item is the hidden
states); the first batch tries each form until every block receives exactly the object its
predecessor handed on. A model that changes the hidden states between blocks has no such form:
its blocks are then fed the inputs recorded at block 0 with the chained hidden states, as
before, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import ConfigError

log = logging.getLogger(__name__)

Inputs = tuple[tuple[Any, ...], dict[str, Any]]  # (args, kwargs) of one call
Forward = Callable[[nn.Module, Any], Any]


class _Captured(Exception):
    """Raised by a capture hook to stop the forward pass once the inputs needed are in."""


def _call(model: nn.Module, batch: Any) -> Any:
    return model(*batch)


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def hidden_of(inputs: Inputs) -> Any:
    """The hidden states of a block call: the first argument, else the first keyword's value."""
    args, kwargs = inputs
    if args:
        return args[0]
    return next(iter(kwargs.values())) if kwargs else None


def with_hidden(inputs: Inputs, hidden: torch.Tensor) -> Inputs:
    """``inputs`` with its hidden states (see :func:`hidden_of`) replaced by ``hidden``."""
    args, kwargs = inputs
    if args:
        return (hidden, *args[1:]), kwargs
    key = next(iter(kwargs))
    return (), {**kwargs, key: hidden}


def capture_first_inputs(
    model: nn.Module, first: nn.Module, batches: Iterable[Any], forward: Forward = _call
) -> list[Inputs]:
    """Run ``model`` on each batch up to ``first`` and keep the (args, kwargs) it receives.
    ``forward(model, batch)`` runs one batch (default ``model(*batch)``; a Task's ``forward``)."""
    captured: list[Inputs] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((_detach(args), _detach(kwargs)))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    forward(model, batch)
                except _Captured:
                    continue
    finally:
        handle.remove()
    if not captured:
        raise ConfigError("calibration gave no batches: check --data / the calibration set")
    return captured


Returned = Callable[[torch.Tensor], Any]
# What a stand-in block returns, in the forms models expect of their blocks.
_FORMS: tuple[Returned, ...] = (lambda h: h, lambda h: (h,), lambda h: (h, None))


class _Pass:
    """One forward pass with every block replaced by a recording stand-in."""

    def __init__(self, blocks: Sequence[nn.Module], form: Returned) -> None:
        self.blocks, self.form = blocks, form
        self.calls: list[Inputs | None] = [None] * len(blocks)
        self.chained = True  # every block got exactly what the one before handed on
        self.handed: Any = None

    def stand_in(self, i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = hidden_of((args, kwargs))
            if self.calls[i] is None:  # a block called twice keeps its first call
                if i > 0 and self.calls[i - 1] is not None:
                    self.chained &= hidden is self.handed
                self.calls[i] = (_detach(args), _detach(kwargs))
            if i == len(self.blocks) - 1:
                raise _Captured
            self.handed = hidden
            return self.form(hidden)

        return forward

    def run(self, model: nn.Module, batch: Any, forward: Forward) -> list[Inputs] | None:
        """The calls of every block on ``batch``; None if this form does not chain them."""
        saved = [b.__dict__.get("forward") for b in self.blocks]
        for i, block in enumerate(self.blocks):
            block.forward = self.stand_in(i)  # type: ignore[method-assign]
        try:
            with torch.no_grad():
                forward(model, batch)
        except _Captured:
            pass
        finally:
            for block, old in zip(self.blocks, saved, strict=True):
                del block.forward
                if old is not None:
                    block.forward = old  # type: ignore[method-assign]
        if not self.chained or any(c is None for c in self.calls):
            return None
        return [c for c in self.calls if c is not None]


def capture_block_inputs(
    model: nn.Module, blocks: Sequence[nn.Module], batches: Iterable[Any], forward: Forward = _call
) -> list[list[Inputs]]:
    """The (args, kwargs) every block of ``blocks`` receives, per batch: ``calls[i][b]`` is
    block ``i``'s call on batch ``b`` (its hidden states are those of the model's forward pass
    up to block 0; the pipeline replaces them). See the module docstring."""
    calls: list[list[Inputs]] = [[] for _ in blocks]
    form: Returned | None = None
    probed = False
    for batch in batches:
        got = None
        if not probed:
            form, got, probed = *_find_form(model, blocks, batch, forward), True
        elif form is not None:
            got = _Pass(blocks, form).run(model, batch, forward)
        if got is None:  # no form chains the blocks: block 0's call for every block
            first = capture_first_inputs(model, blocks[0], [batch], forward)[0]
            got = [first] * len(blocks)
        for i, call in enumerate(got):
            calls[i].append(call)
    if not calls[0]:
        raise ConfigError("calibration gave no batches: check --data / the calibration set")
    return calls


def _find_form(
    model: nn.Module, blocks: Sequence[nn.Module], batch: Any, forward: Forward
) -> tuple[Returned | None, list[Inputs] | None]:
    error: Exception | None = None
    for form in _FORMS:
        try:
            got = _Pass(blocks, form).run(model, batch, forward)
        except Exception as exc:  # this form is not what the model expects
            error = error or exc
            continue
        if got is not None:
            return form, got
    log.warning(
        "%s changes the hidden states between its blocks (%s); layer-wise calibration feeds"
        " every block the attention inputs of block 0",
        type(model).__name__,
        error or "not handed on unchanged",
    )
    return None, None
