"""The ONNX file's interface: input and output names, dynamic axes, the shapes it is checked at.

By default an exported file takes any batch size (axis 0 of every input whose first dimension is
the example's batch, named ``batch_size``) and, for Hugging Face Transformers, any sequence length
(axis 1 of their 2-D integer inputs, ``sequence_length``), as optimum's exporter does. Inputs of
a Hugging Face model are named after its ``forward`` parameters (``input_ids``,
``attention_mask``, ``token_type_ids``: a BERT-like model called with ids and mask gets a zero
``token_type_ids`` input too, so ``session.run(None, dict(tokenizer(...)))`` works); outputs after
its output fields (``last_hidden_state``, ``logits``, ...). Other models: ``input_0``, ...,
``output_0``, .... ``static=True`` keeps every shape fixed to the example inputs.

:func:`check_inputs` derives the inputs the file is verified at besides the example: another
batch size and, when the sequence axis is dynamic, another sequence length.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

BATCH = "batch_size"
SEQUENCE = "sequence_length"
_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclass
class Signature:
    """What the exporter is told: input/output names and ``axes`` ({input name: {axis: name}})."""

    inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    output_shapes: list[tuple[int, ...]]
    axes: dict[str, dict[int, str]] = field(default_factory=dict)

    @property
    def dynamic(self) -> bool:
        return any(self.axes.values())

    def trace_inputs(self) -> tuple[torch.Tensor, ...]:
        """The inputs to trace with: a dynamic axis of size 1 doubled (torch.export would
        specialize size 1, and declare outputs of that size fixed)."""
        out = []
        for name, t in zip(self.input_names, self.inputs, strict=True):
            for axis in self.axes.get(name, {}):
                if t.shape[axis] == 1:
                    t = torch.cat([t, t], dim=axis)
            out.append(t)
        return tuple(out)

    def dynamic_shapes(self) -> dict[str, tuple[dict[int, str] | None, ...]]:
        """torch.export's ``dynamic_shapes`` for a ``forward(self, *inputs)`` wrapper."""
        return {"inputs": tuple(self.axes.get(n) or None for n in self.input_names)}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The TorchScript exporter's ``dynamic_axes``, outputs included (the axes whose size
        is the example's batch size or sequence length)."""
        sizes = {
            name: self.inputs[self.input_names.index(n)].shape[axis]
            for n, spec in self.axes.items()
            for axis, name in spec.items()
        }
        out = {n: dict(spec) for n, spec in self.axes.items() if spec}
        for name, shape in zip(self.output_names, self.output_shapes, strict=True):
            spec = {a: dim for a, dim in ((0, BATCH), (1, SEQUENCE)) if a < len(shape)}
            spec = {a: dim for a, dim in spec.items() if sizes.get(dim) == shape[a]}
            if spec:
                out[name] = spec
        return out


def is_transformers(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def _forward_names(model: nn.Module) -> list[str]:
    """The positional parameter names of ``model.forward`` (none after a ``*args``)."""
    names = []
    for p in inspect.signature(type(model).forward).parameters.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return names[1:]  # self


def _hf_inputs(
    model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[tuple[torch.Tensor, ...], list[str]] | None:
    """A transformers model's inputs named after its forward parameters (plus a zero
    ``token_type_ids`` after ``input_ids, attention_mask`` where the model has token types)."""
    names = _forward_names(model)
    if len(names) < len(inputs):
        return None
    names = names[: len(inputs) + 1]
    types = getattr(getattr(model, "config", None), "type_vocab_size", None)
    if names == ["input_ids", "attention_mask", "token_type_ids"] and types:
        return (*inputs, torch.zeros_like(inputs[0])), names
    return inputs, names[: len(inputs)]


def _output_names(outputs: Any) -> list[str]:
    """``last_hidden_state``, ``logits``, ... for named fields (``hidden_states.3`` inside
    them), else ``output_0``, ``output_1``, ... in pytree order (tensors only)."""
    flat = pytree.tree_flatten_with_path(outputs)[0]
    paths = [p for p, leaf in flat if isinstance(leaf, torch.Tensor)]
    names = []
    for i, path in enumerate(paths):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if keys and isinstance(keys[0], str):
            parts = [str(k if k is not None else getattr(p, "idx", i)) for k, p in zip(keys, path)]
            names.append(".".join(parts))
        else:
            names.append(f"output_{i}")
    return names if len(set(names)) == len(names) else [f"output_{i}" for i in range(len(paths))]


def signature(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], outputs: Any, static: bool
) -> Signature:
    """The names and dynamic axes of ``model``'s export on ``inputs`` (its ``outputs`` on them)."""
    names = [f"input_{i}" for i in range(len(inputs))]
    hf = is_transformers(model)
    if hf:
        found = _hf_inputs(model, inputs)
        if found is not None:
            inputs, names = found
    shapes = [tuple(t.shape) for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    sig = Signature(inputs, names, _output_names(outputs), shapes)
    if static or not inputs[0].dim():
        return sig
    batch = inputs[0].shape[0]
    for name, t in zip(names, inputs, strict=True):
        spec: dict[int, str] = {0: BATCH} if t.dim() and t.shape[0] == batch else {}
        token = not t.is_floating_point() and t.dim() == 2 and name in _TOKEN_INPUTS
        if hf and token:
            spec[1] = SEQUENCE
        sig.axes[name] = spec
    return sig


def _resized(t: torch.Tensor, shape: list[int], gen: torch.Generator) -> torch.Tensor:
    """A tensor of ``shape`` like ``t``: values drawn from ``t``'s own (integer inputs: ids,
    masks, token types stay valid), or Gaussian with its mean and spread (float inputs)."""
    if t.is_floating_point():
        std = float(t.float().std()) if t.numel() > 1 else 1.0
        noise = torch.randn(shape, generator=gen)
        return (noise * (std or 1.0) + float(t.float().mean())).to(t.dtype)
    flat = t.reshape(-1)
    picks = torch.randint(0, flat.numel(), shape, generator=gen)
    return flat[picks]


def check_inputs(sig: Signature) -> list[tuple[torch.Tensor, ...]]:
    """Inputs at another batch size (example + 2) and, where the sequence axis is dynamic,
    another sequence length (about half the example's); ``[]`` for a static signature."""
    if not sig.dynamic:
        return []
    gen = torch.Generator().manual_seed(7)
    batch = sig.inputs[0].shape[0] + 2
    out = []
    for name, t in zip(sig.input_names, sig.inputs, strict=True):
        shape = list(t.shape)
        spec = sig.axes.get(name, {})
        if 0 in spec:
            shape[0] = batch
        if 1 in spec and shape[1] > 1:
            shape[1] = shape[1] // 2 + 1 if shape[1] > 2 else 1
        out.append(_resized(t, shape, gen))
    return [tuple(out)]


def file_interface(graph: Any) -> dict[str, Any]:
    """The inputs and outputs an ONNX graph declares (a dimension: its size, or its name when
    dynamic), and its dynamic axes ``{name: {"axis": dimension name}}`` (JSON-able)."""

    def dims(value: Any) -> list[int | str]:
        shape = value.type.tensor_type.shape.dim
        return [d.dim_param or int(d.dim_value) for d in shape]

    inputs = [{"name": v.name, "shape": dims(v)} for v in graph.input]
    outputs = [{"name": v.name, "shape": dims(v)} for v in graph.output]
    axes = {
        e["name"]: {str(a): d for a, d in enumerate(e["shape"]) if isinstance(d, str)}
        for e in inputs + outputs
    }
    return {
        "file_inputs": inputs,
        "file_outputs": outputs,
        "dynamic_axes": {n: a for n, a in axes.items() if a},
    }
