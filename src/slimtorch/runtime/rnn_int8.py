"""Int8 LSTM / GRU with dynamic activations: real int8 matrix products in every gate.

Every layer and direction keeps its input-hidden and hidden-hidden weights as two
:class:`~slimtorch.runtime.int8.Int8DynamicLinear` children (int8 codes per output row, float32
scales, the same oneDNN / ``torch._int_mm`` kernels). The input-hidden product runs once for the
whole sequence; the hidden-hidden product runs once per step on the hidden state, quantized per
row (per sequence) at run time. The gate nonlinearities and the cell update stay float32.

For an LSTM both biases are summed into the input-hidden product (``b_ih + b_hh``); a GRU keeps
``b_hn`` with the hidden-hidden product, since ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``.
Gate order as in torch: LSTM ``i, f, g, o``; GRU ``r, z, n``. The state is the children's
buffers (plain tensors in ``state_dict``), so the artifact saves them without pickle.
Supported: multi-layer, bidirectional, ``batch_first``, unbatched input, an initial state;
not supported (a clear error): LSTM ``proj_size > 0``, PackedSequence inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from slimtorch.core.errors import ArtifactError, UnsupportedModelError
from slimtorch.runtime.int8 import _W_QMAX, Int8DynamicLinear, _int_matmul, _token_absmax

_GATES = {"LSTM": 4, "GRU": 3}


def lstm_cell(gi: Tensor, gh: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM step from the input and hidden gate pre-activations ``[B, 4H]``."""
    del h
    i, f, g, o = (gi + gh).chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_cell(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """One GRU step from the input and hidden gate pre-activations ``[B, 3H]``."""
    ir, iz, in_ = gi.chunk(3, dim=1)
    hr, hz, hn = gh.chunk(3, dim=1)
    r = torch.sigmoid(ir + hr)
    z = torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    return n + z * (h - n)  # (1 - z) * n + z * h


class _Int8DynamicRNN(nn.Module):
    """Shared structure of :class:`Int8DynamicLSTM` and :class:`Int8DynamicGRU`."""

    mode: ClassVar[str] = ""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        if min(input_size, hidden_size, num_layers) < 1:
            raise ValueError("input_size, hidden_size and num_layers must be positive")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.bidirectional = bidirectional
        dirs = 2 if bidirectional else 1
        gates = _GATES[self.mode] * hidden_size
        hh_bias = bias and self.mode == "GRU"
        self.ih = nn.ModuleList()
        self.hh = nn.ModuleList()
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size * dirs
            for _ in range(dirs):
                self.ih.append(Int8DynamicLinear(width, gates, bias))
                self.hh.append(Int8DynamicLinear(hidden_size, gates, hh_bias))

    # --- construction ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (the tensors come from the state dict)."""
        return {
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "bias": self.bias,
            "batch_first": self.batch_first,
            "bidirectional": self.bidirectional,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> _Int8DynamicRNN:
        """Rebuild an empty module from :meth:`config` output; then ``load_state_dict``."""
        try:
            return cls(
                int(cfg["input_size"]),
                int(cfg["hidden_size"]),
                int(cfg["num_layers"]),
                bool(cfg["bias"]),
                bool(cfg["batch_first"]),
                bool(cfg["bidirectional"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"bad {cls.__name__} config {cfg!r} ({exc}); it needs input_size, hidden_size,"
                " num_layers, bias, batch_first and bidirectional - re-save the artifact"
            ) from None

    @classmethod
    def from_float(cls, rnn: nn.RNNBase, masks: dict[str, Tensor] | None = None) -> _Int8DynamicRNN:
        """Quantize every weight matrix of ``rnn`` (times ``masks[name]``, if given) per row."""
        if rnn.mode != cls.mode:
            raise UnsupportedModelError(f"{cls.__name__} replaces nn.{cls.mode}, not {rnn.mode}")
        if getattr(rnn, "proj_size", 0):
            raise UnsupportedModelError(
                f"int8 LSTM supports proj_size=0 only (this one has proj_size={rnn.proj_size});"
                " ignore this layer in the stage, or use quantize.rtn for its weights"
            )
        mod = cls(
            rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.bias,
            rnn.batch_first, rnn.bidirectional,
        )  # fmt: skip
        dirs = 2 if rnn.bidirectional else 1
        for layer in range(rnn.num_layers):
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                k = layer * dirs + d
                w_ih = _masked(rnn, "weight_ih" + sfx, masks)
                _fill(mod.ih[k], w_ih, _bias_ih(rnn, sfx, cls.mode))
                b_hh = getattr(rnn, "bias_hh" + sfx) if rnn.bias and cls.mode == "GRU" else None
                _fill(mod.hh[k], _masked(rnn, "weight_hh" + sfx, masks), b_hh)
        return mod.to(_device(rnn)).train(rnn.training)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items())

    # --- execution ---------------------------------------------------------------------------
    def _init_state(self, x: Tensor, hx: Any) -> tuple[Tensor, Tensor | None]:
        dirs = 2 if self.bidirectional else 1
        shape = (self.num_layers * dirs, x.shape[1], self.hidden_size)
        if hx is None:
            zeros = x.new_zeros(shape)
            return zeros, (zeros if self.mode == "LSTM" else None)
        if self.mode == "LSTM":
            return hx[0].to(x.dtype), hx[1].to(x.dtype)
        return hx.to(x.dtype), None

    def _direction(
        self, k: int, x: Tensor, h: Tensor, c: Tensor | None, reverse: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Run one layer-direction over ``x [T, B, in]`` from ``h`` (and ``c``)."""
        gi_all = self.ih[k](x)  # [T, B, G*H]: one int8 product for the whole sequence
        step = _hidden_product(self.hh[k])
        steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        out: list[Tensor] = [h] * x.shape[0]
        for t in steps:
            gh = step(h.float())
            if c is not None:
                h, c = lstm_cell(gi_all[t], gh, h, c)
            else:
                h = gru_cell(gi_all[t], gh, h)
            out[t] = h
        return torch.stack(out), h, c

    def forward(self, x: Tensor, hx: Any = None) -> tuple[Tensor, Any]:
        if not isinstance(x, Tensor):
            raise UnsupportedModelError(
                f"{type(self).__name__} takes a padded tensor, not {type(x).__name__}"
                " (PackedSequence is not supported); pad the batch, or ignore this layer"
            )
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
            hx = None if hx is None else _map_state(hx, lambda s: s.unsqueeze(1))
        elif self.batch_first:
            x = x.transpose(0, 1)
        h0, c0 = self._init_state(x, hx)
        dirs = 2 if self.bidirectional else 1
        hs: list[Tensor] = []
        cs: list[Tensor] = []
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                ck = c0[k] if c0 is not None else None
                y, h, c = self._direction(k, x, h0[k], ck, reverse=d == 1)
                outs.append(y)
                hs.append(h)
                if c is not None:
                    cs.append(c)
            x = outs[0] if dirs == 1 else torch.cat(outs, dim=2)
        h_n = torch.stack(hs)
        state: Any = (h_n, torch.stack(cs)) if self.mode == "LSTM" else h_n
        if unbatched:
            return x.squeeze(1), _map_state(state, lambda s: s.squeeze(1))
        return (x.transpose(0, 1) if self.batch_first else x), state


def _hidden_product(hh: nn.Module) -> Callable[[Tensor], Tensor]:
    """``h -> h @ W_hh^T (+ b_hh)`` with ``h`` quantized per row (symmetric 8-bit) and the int8
    product in int32: the per-step path, without Int8DynamicLinear's per-call checks (at batch
    1 the call overhead, not the product, is the cost: ``_int_mm`` 0.05 ms vs oneDNN 0.11 ms
    for 128x512; a 100->128 LSTM over 40 steps: 2.9 ms at batch 1, 25 ms at batch 128, against
    13.6 / 32 ms through oneDNN's per-call path, measured on this CPU, one thread)."""
    if not isinstance(hh, Int8DynamicLinear):  # a float twin (e.g. the ONNX exporter's)
        return hh
    w_t = hh._packed_weight("int_mm")[0]  # [H, G*H] int8
    scale = hh.weight_scale / _W_QMAX
    bias = hh.bias

    def step(h: Tensor) -> Tensor:
        amax = _token_absmax(h)
        hq = torch.mul(h, _W_QMAX / amax).round_().to(torch.int8)
        y = _int_matmul(hq, w_t).to(torch.float32).mul_(amax).mul_(scale)
        return y if bias is None else y.add_(bias)

    return step


def _fill(mod: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    assert isinstance(mod, Int8DynamicLinear)
    src = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        src.weight.copy_(weight.detach().float())
        if bias is not None:
            src.bias.copy_(bias.detach().float())
    q = Int8DynamicLinear.from_linear(src)
    mod.load_state_dict(q.state_dict())


def _device(rnn: nn.RNNBase) -> torch.device:
    return next(iter(rnn.parameters())).device


def _masked(rnn: nn.RNNBase, name: str, masks: dict[str, Tensor] | None) -> Tensor:
    w: Tensor = getattr(rnn, name).detach()
    mask = (masks or {}).get(name)
    return w if mask is None else w * mask.to(w.dtype)


def _bias_ih(rnn: nn.RNNBase, sfx: str, mode: str) -> Tensor | None:
    if not rnn.bias:
        return None
    b: Tensor = getattr(rnn, "bias_ih" + sfx)
    return b + getattr(rnn, "bias_hh" + sfx) if mode == "LSTM" else b


def _map_state(state: Any, fn: Any) -> Any:
    return tuple(fn(s) for s in state) if isinstance(state, tuple) else fn(state)


class Int8DynamicLSTM(_Int8DynamicRNN):
    """``nn.LSTM`` (``proj_size=0``) with int8 weights and dynamic int8 activations."""

    mode = "LSTM"


class Int8DynamicGRU(_Int8DynamicRNN):
    """``nn.GRU`` with int8 weights and dynamic int8 activations."""

    mode = "GRU"
