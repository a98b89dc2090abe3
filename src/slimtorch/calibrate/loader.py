"""Data adapters: a torch ``DataLoader`` (or any re-iterable of batches) and an optional loss
function as a Task (core.methods.Task), so that users never write a Task class.

    st.compress(model, "sparse90-int8", data=loader, loss_fn=F.cross_entropy)
    st.compress(model, "sparse90-int8", data=st.data(loader, F.cross_entropy))  # the same
    st.compress(model, "w4a16-gptq", data=loader)    # calibration only: no loss_fn needed

What a batch may be (what the loader yields):

- ``(inputs, targets)``, a tuple or list: the model runs on ``model(inputs)``; the loss is
  ``loss_fn(output, targets)``. A longer ``(x1, x2, ..., targets)`` passes every element but the
  last to the model positionally; a one-element ``[inputs]`` (what ``DataLoader(TensorDataset(x))``
  yields) has no targets.
- a dict (Hugging Face style: ``input_ids``, ``attention_mask``, ...): the model runs on
  ``model(**batch)``. Without ``loss_fn`` the loss is the model's own ``output.loss`` (give
  ``labels`` in the batch); with ``loss_fn``, ``labels`` is taken out of the batch and the loss is
  ``loss_fn(output, labels)``.
- a single tensor: inputs only, for calibration: ``model(batch)``.

``loss_fn`` gets the model's output as it is (a Hugging Face model's output object, say) and the
targets. Calibration-only methods (GPTQ, AWQ, SmoothQuant, SparseGPT, Wanda, ...) only run the
model, so a loader without ``loss_fn`` serves them; a stage that trains then fails with a
ConfigError asking for ``loss_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.core.methods import Task

LossFn = Callable[[Any, Any], torch.Tensor]

_NO_LOSS = (
    "this stage trains the model, but the data gives no loss: pass loss_fn= with the DataLoader"
    " (st.compress(model, recipe, data=loader, loss_fn=fn)), or, for a Hugging Face model, dict"
    " batches with 'labels'"
)


def to_device(batch: Any, device: str | torch.device) -> Any:
    """``batch`` with every tensor in it (in tuples, lists and mappings) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def is_task(data: Any) -> bool:
    """Whether ``data`` already is a Task (has ``train_batches``, ``loss`` and ``forward``)."""
    return all(callable(getattr(data, m, None)) for m in ("train_batches", "loss", "forward"))


class BatchTask:
    """The batch convention of the module docstring: how a batch runs the model and gives a
    loss. Subclasses say where the batches come from (``train_batches``)."""

    name = "batches"
    no_loss = _NO_LOSS  # the error when a stage trains and there is no loss

    def __init__(self, loss_fn: LossFn | None = None) -> None:
        self.loss_fn = loss_fn

    def train_batches(self, ctx: Context, steps: int, batch_size: int) -> Iterator[Any]:
        raise NotImplementedError

    def _split(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
        """``(args, kwargs, targets)`` of ``batch``; targets is None where it has none."""
        if isinstance(batch, Mapping):
            kwargs = dict(batch)
            if self.loss_fn is None:
                return (), kwargs, None  # the model computes its own loss from `labels`
            if "labels" not in kwargs:
                raise ConfigError(
                    f"a dict batch (keys {sorted(kwargs)}) has no 'labels' for loss_fn; add them"
                )
            return (), kwargs, kwargs.pop("labels")
        if isinstance(batch, (tuple, list)):
            if len(batch) == 1:
                return (batch[0],), {}, None
            return tuple(batch[:-1]), {}, batch[-1]
        return (batch,), {}, None

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """Run ``model`` on the inputs of ``batch``."""
        args, kwargs, _ = self._split(batch)
        return model(*args, **kwargs)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The training loss of ``model`` on ``batch``."""
        return self.loss_from_output(self.forward(model, batch), batch)

    def loss_from_output(self, output: Any, batch: Any) -> torch.Tensor:
        """The loss given ``output = forward(model, batch)`` (distillation runs the model once)."""
        _, _, targets = self._split(batch)
        if self.loss_fn is None:
            own = getattr(output, "loss", None) if isinstance(batch, Mapping) else None
            if isinstance(own, torch.Tensor):
                return own
            raise ConfigError(self.no_loss)
        if targets is None:
            raise ConfigError(
                "loss_fn needs targets, but the batches are inputs only: yield (inputs, targets)"
                " tuples, or dicts with 'labels'"
            )
        return self.loss_fn(output, targets)


class LoaderTask(BatchTask):
    """A Task over ``loader`` (a ``DataLoader`` or any re-iterable of batches): its batches, in
    its order, restarting it as often as a stage needs. The loader's own batch size wins over a
    stage's ``batch_size`` option: a stage asking for ``steps`` batches gets ``steps`` of the
    loader's (a calibration stage takes ``ceil(samples / batch_size)`` of them)."""

    name = "loader"

    def __init__(self, loader: Iterable[Any], loss_fn: LossFn | None = None) -> None:
        super().__init__(loss_fn)
        self.loader = loader
        self._has_labels: bool | None = None

    @property
    def has_labels(self) -> bool:
        """Whether the data gives a task loss (distillation mixes it in only then)."""
        if self._has_labels is None:
            self._has_labels = self.loss_fn is not None or self._first_is_labelled_dict()
        return self._has_labels

    def _first_is_labelled_dict(self) -> bool:
        if iter(self.loader) is self.loader:  # one pass only: never spend a batch on a peek
            return False
        first = next(iter(self.loader), None)
        return isinstance(first, Mapping) and "labels" in first

    def train_batches(self, ctx: Context, steps: int, batch_size: int) -> Iterator[Any]:
        """``steps`` batches of the loader on ``ctx.device`` (``batch_size`` is not used: the
        loader's own batch size wins)."""
        done = 0
        while done < steps:
            before = done
            for batch in self.loader:
                yield to_device(batch, ctx.device)
                done += 1
                if done == steps:
                    return
            if iter(self.loader) is self.loader:
                raise ConfigError(
                    f"the data ran out after {done} batches, {steps} needed: pass something that"
                    " can be iterated again (a DataLoader, a list), not a generator or iterator"
                )
            if done == before:
                raise ConfigError("the data loader gave no batches: give it a non-empty dataset")


def as_task(data: Any, loss_fn: LossFn | None = None) -> Task:
    """``data`` as a Task: a Task as it is, a DataLoader (or list of batches) wrapped in a
    :class:`LoaderTask` with ``loss_fn`` (see the module docstring for the batch convention)."""
    if is_task(data):
        if loss_fn is not None:
            raise ConfigError(
                f"loss_fn goes with a DataLoader; {type(data).__name__} is a Task with its own"
                " loss: drop loss_fn"
            )
        return data  # type: ignore[no-any-return]
    if isinstance(data, torch.Tensor):
        raise ConfigError(
            "data is a single tensor: wrap it in a DataLoader, e.g."
            " DataLoader(TensorDataset(x, y), batch_size=32), so that it gives batches"
        )
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise ConfigError(
            f"data must be a torch DataLoader (or any re-iterable of batches) or a Task, got"
            f" {type(data).__name__}"
        )
    return LoaderTask(data, loss_fn)
