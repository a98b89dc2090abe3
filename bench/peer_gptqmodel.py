"""gptqmodel's side of bench/bench_llm_peers.py (GPTQ only): ``GPTQModel.load`` of the
builtin's Hugging Face directory with a ``QuantizeConfig`` mapped from our stage, then
``model.quantize`` on the shared calibration rows. Runs in the peers' virtualenv (gptqmodel
7.6.0 installed with --no-deps next to our torch), with ``GPTQMODEL_CPU_WORKERS=2``.

    GPTQMODEL_CPU_WORKERS=2 /tmp/peers-venv/bin/python bench/peer_gptqmodel.py gptq-w4 --calib F

Settings: bits B, group_size 128, sym False, desc_act True (act_group_aware False, which
gptqmodel requires with desc_act), static_groups True, damp_percent 0.01, true_sequential False
(every Linear of a block sees the same block inputs, as in ours), mse 0 (min-max grid),
calibration_sort None (rows in the given order), batch_size = ``--batch-size``. The timed call is
``quantize`` (calibration, GPTQ and packing into its CPU ``TorchQuantLinear``); perplexity is
measured on the packed model gptqmodel returns (``model.model``, the transformers module).
The model is loaded in float32 (``dtype=torch.float32``; gptqmodel's default picks bfloat16).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from peer_common import DAMP, GROUP, Method, load_builtin, run_one, weights_dir

_LOADED: dict[str, Any] = {}


def _config(method: Method) -> Any:
    from gptqmodel import QuantizeConfig  # type: ignore[import-not-found]

    return QuantizeConfig(
        bits=method.bits,
        group_size=GROUP,
        sym=False,
        desc_act=True,
        act_group_aware=False,
        static_groups=True,
        damp_percent=DAMP,
        true_sequential=False,
        mse=0.0,
    )


def load() -> nn.Module:
    from gptqmodel import GPTQModel

    method = _method_from_argv()
    wrapper = GPTQModel.load(str(weights_dir()), _config(method), device="cpu", dtype=torch.float32)
    _LOADED["wrapper"] = wrapper
    return wrapper.model  # type: ignore[no-any-return]


def _method_from_argv() -> Method:
    from peer_common import METHODS

    key = next(a for a in sys.argv[1:] if not a.startswith("-"))
    return METHODS[key]


def compress(
    model: nn.Module, calib: torch.Tensor, method: Method, args: argparse.Namespace
) -> nn.Module:
    if method.kind != "gptq":
        raise SystemExit(f"gptqmodel does GPTQ only, not {method.kind}")
    wrapper = _LOADED["wrapper"]
    rows = [{"input_ids": r.unsqueeze(0), "attention_mask": torch.ones_like(r).unsqueeze(0)}
            for r in calib]  # fmt: skip
    back = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="peer-gptqmodel-") as tmp:
        os.chdir(tmp)  # quantize writes its per-layer log under ./logs/
        os.makedirs("logs")
        try:
            wrapper.quantize(rows, batch_size=args.batch_size, calibration_sort=None)
        finally:
            os.chdir(back)
    return wrapper.model  # type: ignore[no-any-return]


def finish(model: nn.Module) -> nn.Module:
    """Untimed: the weights gptqmodel produced, as a float32 model to score like every other.

    The in-memory model right after ``quantize`` does not run on this CPU build (its logits
    overflow the perplexity), and gptqmodel's CPU kernel (``TorchLinear``) loads float16/bfloat16
    only. So: ``save``, ``GPTQModel.load(..., backend=TORCH, dtype=float16)``, and every
    ``TorchLinear``'s ``dequantize_weight()`` (codes, zero points, scales, g_idx unpacked by
    gptqmodel itself) is copied into a fresh float32 builtin model.
    """
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear  # type: ignore[import-not-found]

    out = tempfile.TemporaryDirectory(prefix="peer-gptqmodel-out-")
    _LOADED["out"] = out  # removed when the process exits
    _LOADED["wrapper"].save(out.name)
    loaded = GPTQModel.load(out.name, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    fresh = load_builtin()
    copied = 0
    with torch.no_grad():
        for name, module in loaded.model.named_modules():
            if isinstance(module, TorchLinear):
                weight = module.dequantize_weight().T.to(torch.float32)
                fresh.get_submodule(name).weight.copy_(weight)
                copied += 1
    if copied == 0:
        raise SystemExit("gptqmodel: no quantized Linear found in the saved model")
    return fresh


if __name__ == "__main__":
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    run_one("gptqmodel 7.6.0", __doc__.split("\n")[0], compress, load=load, finish=finish)
