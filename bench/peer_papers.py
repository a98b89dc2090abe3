"""The papers' own code on the shared calibration tensor (bench/bench_llm_peers.py):
IST-DASLab/gptq (``GPTQ`` + ``Quantizer``), IST-DASLab/sparsegpt (``SparseGPT``) and
locuslab/wanda (``lib.prune.prune_wanda``), imported from their checkouts under ``--peers-dir``
(``/tmp/peers/{gptq,sparsegpt,wanda}``; never part of this repository).

GPTQ and SparseGPT are driven by :func:`sequential`, the loop of their ``llama.py``
(``llama_sequential``): capture block 0's inputs with a Catcher, then per block hook every
Linear's ``add_batch``, run the block on every sample, ``fasterquant`` / ``fasterprune`` each
Linear, and recompute the block's outputs as the next block's inputs. Wanda is their own
``prune_wanda`` function, unmodified.

What is patched, at run time only (the checkouts stay as fetched):

* ``torch.cuda.synchronize`` -> no-op (``fasterquant``/``fasterprune`` call it after the
  column loop; a CPU-only torch raises there). Device: everything stays on the CPU (their
  ``dev`` argument is ``cpu``; ``torch.cuda.empty_cache`` is already a no-op without CUDA).
* wanda: ``lib.prune.get_loaders`` returns the shared calibration rows instead of downloading
  C4; ``datasets`` (imported by ``lib.data`` for that download only) is a stub module;
  ``model.seqlen = 256`` and ``model.hf_device_map = {}`` as their ``get_llm`` sets them.
* transformers 5 compatibility (both loops): the repos were written for transformers 4.x, whose
  Llama layers computed RoPE themselves; in 5.x a decoder layer needs ``position_embeddings``.
  Our loop passes every keyword the model gave block 0 (as our own pipeline does); for wanda's
  loop, which passes only ``attention_mask`` and ``position_ids``, each decoder layer's
  ``forward`` is wrapped to compute ``position_embeddings`` from ``position_ids`` with the
  model's own ``rotary_emb`` when it is missing. The layer's output is a tensor, not a tuple, in
  5.x: ``out[0]`` of a batch of one is the same ``[L, H]`` either way.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from peer_common import BLOCK, DAMP, GROUP, Method, run_one


def _cpu_only() -> None:
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]


def _capture(model: nn.Module, calib: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Their Catcher: block 0's input of every sample ``[n, L, H]`` and its keywords."""
    layers: Any = model.model.layers  # type: ignore[union-attr]
    inps: list[torch.Tensor] = []
    cache: dict[str, Any] = {}

    class Catcher(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, inp: torch.Tensor, **kwargs: Any) -> None:
            inps.append(inp[0])
            cache["kwargs"] = kwargs
            raise ValueError

    layers[0] = Catcher(layers[0])
    for j in range(calib.shape[0]):
        with contextlib.suppress(ValueError):  # the Catcher stops the forward at block 0
            model(calib[j : j + 1])
    layers[0] = layers[0].module
    kwargs = {k: v for k, v in cache["kwargs"].items() if k not in ("cache", "past_key_values")}
    kwargs["use_cache"] = False
    return torch.stack(inps), kwargs


def _hidden(out: Any) -> torch.Tensor:
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out[0]  # batch of one -> [L, H]


@torch.no_grad()
def sequential(
    model: nn.Module,
    calib: torch.Tensor,
    make: Callable[[nn.Linear], Any],
    solve: Callable[[Any], None],
    find_layers: Callable[[nn.Module], dict[str, nn.Module]],
) -> nn.Module:
    """``llama_sequential`` of IST-DASLab (true_sequential off: every Linear of a block
    sees the same block inputs, as slimtorch's pipeline does)."""
    use_cache = model.config.use_cache  # type: ignore[union-attr]
    model.config.use_cache = False  # type: ignore[union-attr]
    inps, kwargs = _capture(model, calib)
    outs = torch.zeros_like(inps)
    layers: Any = model.model.layers  # type: ignore[union-attr]
    for i in range(len(layers)):
        layer = layers[i]
        full = find_layers(layer)
        gpts = {name: make(full[name]) for name in full}

        def add_batch(name: str, gpts: dict[str, Any] = gpts) -> Callable[..., None]:
            def tmp(_: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
                gpts[name].add_batch(inp[0].data, out.data)

            return tmp

        handles = [full[name].register_forward_hook(add_batch(name)) for name in full]
        for j in range(inps.shape[0]):
            outs[j] = _hidden(layer(inps[j].unsqueeze(0), **kwargs))
        for h in handles:
            h.remove()
        for name in full:
            solve(gpts[name])
            gpts[name].free()
        for j in range(inps.shape[0]):
            outs[j] = _hidden(layer(inps[j].unsqueeze(0), **kwargs))
        inps, outs = outs, inps
    model.config.use_cache = use_cache  # type: ignore[union-attr]
    return model


def ist_gptq(model: nn.Module, calib: torch.Tensor, method: Method, peers: Path) -> nn.Module:
    """IST-DASLab/gptq ``llama.py --wbits B --groupsize 128 --act-order --static-groups``."""
    sys.path.insert(0, str(peers / "gptq"))
    _cpu_only()
    from gptq import GPTQ  # type: ignore[import-not-found]
    from modelutils import find_layers  # type: ignore[import-not-found]
    from quant import Quantizer  # type: ignore[import-not-found]

    def make(layer: nn.Linear) -> Any:
        g = GPTQ(layer)
        g.quantizer = Quantizer()
        g.quantizer.configure(method.bits, perchannel=True, sym=False, mse=False)
        return g

    def solve(g: Any) -> None:
        g.fasterquant(
            blocksize=BLOCK, percdamp=DAMP, groupsize=GROUP, actorder=True, static_groups=True
        )

    return sequential(model, calib, make, solve, find_layers)


def ist_sparsegpt(model: nn.Module, calib: torch.Tensor, method: Method, peers: Path) -> nn.Module:
    """IST-DASLab/sparsegpt ``llama.py --sparsity 0.5`` (or ``--prunen 2 --prunem 4``)."""
    sys.path.insert(0, str(peers / "sparsegpt"))
    _cpu_only()
    from modelutils import find_layers
    from sparsegpt import SparseGPT  # type: ignore[import-not-found]

    def solve(g: Any) -> None:
        g.fasterprune(
            method.sparsity, prunen=method.n, prunem=method.m, blocksize=BLOCK, percdamp=DAMP
        )

    return sequential(model, calib, SparseGPT, solve, find_layers)


def _rope_shim(model: nn.Module) -> None:
    """transformers-5 decoder layers need ``position_embeddings``; compute them when absent."""
    rotary = model.model.rotary_emb  # type: ignore[union-attr]
    for layer in model.model.layers:  # type: ignore[union-attr]
        orig = layer.forward

        def forward(hidden: torch.Tensor, *args: Any, _orig: Any = orig, **kw: Any) -> Any:
            if kw.get("position_embeddings") is None:
                pos = kw.get("position_ids")
                if pos is None:
                    pos = torch.arange(hidden.shape[1]).unsqueeze(0)
                kw["position_embeddings"] = rotary(hidden, pos)
            return _orig(hidden, *args, **kw)

        layer.forward = forward


def wanda(model: nn.Module, calib: torch.Tensor, method: Method, peers: Path) -> nn.Module:
    """locuslab/wanda ``main.py --prune_method wanda --sparsity_ratio 0.5 --sparsity_type
    unstructured`` (or ``2:4``), ``--nsamples`` = the calibration rows, ``--seed 0``."""
    sys.path.insert(0, str(peers / "wanda"))
    _cpu_only()
    stub = types.ModuleType("datasets")
    stub.load_dataset = None  # type: ignore[attr-defined]
    sys.modules.setdefault("datasets", stub)
    import lib.prune as wp  # type: ignore[import-not-found]

    loader = [(calib[j : j + 1], calib[j : j + 1].clone()) for j in range(calib.shape[0])]
    wp.get_loaders = lambda *a, **k: (loader, None)
    model.seqlen = calib.shape[1]  # type: ignore[assignment]
    model.hf_device_map = {}  # type: ignore[assignment]
    _rope_shim(model)
    args = argparse.Namespace(
        nsamples=calib.shape[0], seed=0, sparsity_ratio=method.sparsity, use_variant=False
    )
    wp.prune_wanda(args, model, None, torch.device("cpu"), prune_n=method.n, prune_m=method.m)
    for layer in model.model.layers:  # type: ignore[union-attr]
        del layer.forward  # drop the shim: evaluation runs the plain model
    return model


def compress(
    model: nn.Module, calib: torch.Tensor, method: Method, args: argparse.Namespace
) -> nn.Module:
    fn = {"gptq": ist_gptq, "sparsegpt": ist_sparsegpt, "wanda": wanda}[method.kind]
    return fn(model, calib, method, args.peers_dir)


IMPL = {
    "gptq": "IST-DASLab/gptq",
    "sparsegpt": "IST-DASLab/sparsegpt",
    "wanda": "locuslab/wanda",
}

if __name__ == "__main__":
    key = next((a for a in sys.argv[1:] if not a.startswith("-")), "gptq-w4")
    run_one(IMPL[key.split("-")[0]], __doc__.split("\n")[0], compress)
