"""ExecuTorch ``.pte`` files with the XNNPACK backend, run in ExecuTorch's runtime and checked.

    from slimtorch.export import export
    export(model, to="executorch", out="model.pte")                  # our codes, qd8 activations
    export(model, to="executorch", out="fp32.pte", quantized=False)  # every weight dense fp32

What is written (needs ``pip install executorch==1.5.1``, which keeps torch 2.13):

* weights slimtorch quantized are lowered as *their own codes* (no re-quantization, no
  calibration data): Linear and Conv2d weights with per-channel codes as XNNPACK ``qc8w``
  (int8, float32 scale per output channel), Linear weights with signed 4-bit per-group codes as
  ``qb4w`` (ExecuTorch's 8da4w; the scales are stored as bfloat16 by ExecuTorch). Those layers
  run with dynamically quantized int8 activations (``qd8``), XNNPACK's only integer path without
  calibration. :mod:`slimtorch.export.executorch_plan` says which weights qualify and why others
  stay dense float; a BatchNorm after a carried convolution is folded into its scales.
* everything else as float32 XNNPACK ops (ExecuTorch's portable kernels for the rest).

The file is then loaded with ``executorch.runtime`` and run on the example inputs: it must
reproduce the lowered model (the same codes and activation quantization, in PyTorch) within
``atol + rtol * max|output|`` (quantized files: or within the activation quantization's own
effect, the lowered model's distance from the model: XNNPACK rounds a value at a code boundary
differently now and then, and a 6-layer Transformer carries that on), or nothing is left at
``out``. The difference from the model
itself (float activations) is reported beside it, with the top-1 agreement for 2-D outputs. The
carried codes are also looked up, byte for byte, in the written file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import ConfigError, UnsupportedModelError, UserInputError
from slimtorch.export.executorch_check import codes_in_file, compare, flat_outputs
from slimtorch.export.executorch_plan import plan_model
from slimtorch.export.onnx.verify import median_ms

INSTALL = "pip install 'executorch==1.5.1' (it keeps torch 2.13)"
# file vs the lowered model in PyTorch on the example inputs: float files to float rounding;
# with dynamic int8 activations XNNPACK's rounding of a value at a code boundary may differ from
# PyTorch's by one code, which deeper layers carry on (ResNet-18: ~0.2% of the largest output;
# MiniLM: 3%, as much as the activation quantization itself: the bound is then that effect)
TOLERANCE = {False: (1e-4, 1e-4), True: (1e-3, 1e-2)}  # quantized?: (atol, rtol)


def _require_executorch() -> None:
    try:
        import executorch.exir
        import executorch.runtime  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"--to executorch needs ExecuTorch: {INSTALL} ({err})") from err


def _check_args(inputs: Sequence[Any], out: Path, overwrite: bool) -> tuple[torch.Tensor, ...]:
    if out.suffix != ".pte":
        raise UserInputError(f"--out {out}: an ExecuTorch program file ends in .pte")
    if out.exists() and not overwrite:
        raise UserInputError(f"{out} exists: pass --force (overwrite=True) to replace it")
    if not out.parent.is_dir():
        raise UserInputError(f"the folder of {out} does not exist")
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise UnsupportedModelError("--to executorch takes models called with tensors only")
    return tuple(inputs)


def _lower(twin: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[bytes, dict[str, int]]:
    """The .pte bytes of ``twin`` lowered to XNNPACK, and the operators left outside it."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        ep = torch.export.export(twin, inputs)
    except Exception as err:
        raise UnsupportedModelError(
            f"torch.export cannot capture {type(twin).__name__} for ExecuTorch ({err}); export"
            " --to onnx instead"
        ) from err
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    outside: dict[str, int] = {}
    for node in edge.exported_program().graph.nodes:
        if node.op == "call_function" and "call_delegate" not in str(node.target):
            name = getattr(node.target, "__name__", str(node.target))
            if name != "getitem":
                outside[name] = outside.get(name, 0) + 1
    return bytes(edge.to_executorch().buffer), outside


def run_pte(path: str | Path, inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
    """Outputs of the ``forward`` method of the .pte at ``path``, and the loaded method."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(Path(path)).load_method("forward")
    return list(method.execute(list(inputs))), method


def export_executorch(
    model: nn.Module,
    inputs: Sequence[Any],
    out: str | Path,
    overwrite: bool = False,
    *,
    quantized: bool = True,
) -> dict[str, Any]:
    """Write ``model`` as an XNNPACK ``.pte`` at ``out``, run it in ExecuTorch, compare; the
    report (bytes, layers carried as codes, dense ones and why, differences, latency)."""
    from slimtorch.export.checks import refuse_runtime_modules
    from slimtorch.export.executorch_lower import lowered_twin

    refuse_runtime_modules(model)
    out = Path(out)
    args = _check_args(inputs, out, overwrite)
    _require_executorch()
    model = model.eval()
    carried, dense = plan_model(model) if quantized else ([], [])
    twin, folded = lowered_twin(model, carried)
    with torch.no_grad():
        reference = model(*args)
        lowered_ref = twin(*args)
        start = time.perf_counter()
        data, outside = _lower(twin, args)
    lower_s = time.perf_counter() - start
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    try:
        got, method = run_pte(tmp, args)
        file_check = compare(got, lowered_ref)
        atol, rtol = TOLERANCE[bool(carried)]
        allowed = atol + rtol * file_check["max_abs_ref"]
        if carried:  # or as far as activation quantization itself moves the outputs
            allowed = max(allowed, compare(flat_outputs(lowered_ref), reference)["max_abs_diff"])
        if file_check["max_abs_diff"] > allowed:
            raise UnsupportedModelError(
                f"the ExecuTorch file does not reproduce the lowered model: max |difference|"
                f" {file_check['max_abs_diff']:.3g} (allowed {allowed:.3g}: {atol} + {rtol} x"
                f" {file_check['max_abs_ref']:.3g}, or the activation quantization's own effect);"
                " nothing was written"
            )
        model_check = compare(got, reference)
        pte_ms = median_ms(lambda: method.execute(list(args)))
        with torch.no_grad():
            torch_ms = median_ms(lambda: model(*args))
        found = codes_in_file(data, carried, twin)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "format": "executorch", "out": str(out), "bytes": len(data), "backend": "xnnpack",
        "scheme": _scheme(carried), "carried": [
            {"module": c.module, "layout": c.layout, "group": c.group} for c in carried
        ],
        "dense": dense, "batchnorm_folded": folded, "codes_in_file": found,
        "outside_delegate": outside, "atol": atol, "rtol": rtol, "allowed": allowed,
        "max_abs_diff": file_check["max_abs_diff"], "vs_model": model_check,
        "input_shapes": [list(t.shape) for t in args], "pte_ms": pte_ms, "torch_ms": torch_ms,
        "threads": torch.get_num_threads(), "executorch_threads": _et_threads(),
        "lower_s": round(lower_s, 2),
    }  # fmt: skip


def _et_threads() -> int | None:
    """The size of ExecuTorch's thread pool (XNNPACK's threads), if the runtime says."""
    try:
        from executorch.extension.pybindings import portable_lib

        return int(portable_lib._threadpool_get_thread_count())
    except (ImportError, AttributeError, RuntimeError):
        return None


def _scheme(carried: list[Any]) -> str:
    layouts = sorted({c.layout for c in carried})
    if not layouts:
        return "fp32"
    return "+".join({"qc8w": "qd8-qc8w (int8)", "qb4w": "qd8-qb4w (8da4w)"}[k] for k in layouts)
