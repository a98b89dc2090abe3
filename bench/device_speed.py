"""The speed half of bench/device_check.py (see its docstring): decoding tokens/s of the
float16, int4, 2:4 and fp8 models, and single-Linear latencies."""

from __future__ import annotations

import copy
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

LAYER_SHAPES = [(1536, 576), (576, 1536), (4096, 4096)]  # (out, in)
LAYER_ROWS = (1, 8, 256)


def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_rate(model: Any, vocab: int, batch: int, new_tokens: int) -> float:
    from slimtorch.eval.decode import decode_tokens_per_s, random_prompt

    prompt = random_prompt(vocab, 64 if new_tokens > 8 else 8).expand(batch, -1).contiguous()
    cuda_sync()
    return decode_tokens_per_s(model, prompt, new_tokens, warmup=1, repeats=3)


def kernels_used(model: Any, dtype: Any) -> dict[str, int]:
    """How many runtime layers of ``model`` run which kernel for ``dtype`` inputs."""
    import torch

    from slimtorch.runtime import Int4WeightOnlyLinear, SemiStructuredLinear

    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, SemiStructuredLinear):
            kernel = "2:4 " + module.prepare(dtype)
        elif isinstance(module, Int4WeightOnlyLinear):
            x = torch.empty(1, module.in_features, device=module.qweight.device, dtype=dtype)
            kernel = "int4 " + module._kernel_for(x)
        else:
            continue
        counts[kernel] = counts.get(kernel, 0) + 1
    return counts


def int4_model(quantized: Any, dtype: Any) -> tuple[Any, dict[str, int]]:
    from slimtorch.artifact.kernels import use_int4_kernels

    model = copy.deepcopy(quantized).to(dtype)  # the codes and scales live in the states
    use_int4_kernels(model)  # Int4WeightOnlyLinear keeps its float32 scales and bias
    return model, kernels_used(model, dtype)


def fp8_model(model: Any, dtype: Any) -> tuple[Any, dict[str, int]]:
    """``model`` with every decoder Linear (not the tied LM head) on ``Fp8Linear`` W8A8."""
    import torch
    from torch import nn

    from slimtorch.graph.weights import replace_module
    from slimtorch.runtime import Fp8Linear

    model = model.to(dtype)
    counts: dict[str, int] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".layers." in f".{name}":
            fp8 = Fp8Linear.from_linear(module, "dynamic")
            replace_module(model, name, fp8)
            x = torch.empty(1, fp8.in_features, device=fp8.weight_fp8.device, dtype=dtype)
            kernel = "fp8 " + fp8._kernel_for(x)
            counts[kernel] = counts.get(kernel, 0) + 1
    return model, counts


def sparse24_model(model: Any, dtype: Any) -> tuple[Any, dict[str, int]]:
    import slimtorch as st
    from slimtorch.core.context import Context
    from slimtorch.runtime.sparse24 import use_semi_structured

    device = str(next(model.parameters()).device)
    recipe = {"stages": [{"method": "prune.nm", "n": 2, "m": 4, "targets": ["re:.*layers\\..*"]}]}
    pruned = st.compress(model, recipe, ctx=Context(device=device, progress=False)).model
    pruned = pruned.to(dtype)
    use_semi_structured(pruned)
    return pruned, kernels_used(pruned, dtype)


def kernel_report(device: str) -> dict[str, Any]:
    import torch

    from slimtorch.runtime import device as rt

    out: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": rt.describe(device),
        "int4_cuda_kernel": rt.int4_cuda_available(device),
        "fp8_scaled_mm": rt.scaled_mm_available(device),
        "semi_structured_2to4": rt.semi_structured_available(device),
    }
    if device.startswith("cuda"):
        out["capability"] = list(torch.cuda.get_device_capability(device))
        out["gpu_name"] = torch.cuda.get_device_name(device)
    return out


def time_layer(fn: Callable[[], Any], device: str, repeats: int) -> float:
    """Median milliseconds of ``fn()``."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def layer_rows(device: str, dry: bool) -> list[dict[str, Any]]:
    import torch
    from torch import nn

    from slimtorch.quantize.affine import quantize_weight
    from slimtorch.quantize.primitives import QuantSpec
    from slimtorch.runtime import Fp8Linear, Int4WeightOnlyLinear, SemiStructuredLinear

    shapes = [(128, 256)] if dry else LAYER_SHAPES
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    rows = []
    for out_f, in_f in shapes:
        torch.manual_seed(0)
        lin = nn.Linear(in_f, out_f, bias=False).to(device)
        spec = QuantSpec(4, signed=False, symmetric=False, granularity="per_group", group_size=128)
        int4 = Int4WeightOnlyLinear.from_state(quantize_weight(lin.weight.detach(), spec))
        with torch.no_grad():
            w = lin.weight.reshape(out_f, -1, 4)
            keep = w.abs().topk(2, dim=-1).indices
            mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, keep, True)
            lin.weight.copy_((w * mask).reshape(out_f, in_f))
        sparse = SemiStructuredLinear.from_linear(lin)
        fp8 = Fp8Linear.from_linear(lin, "dynamic")
        dense = lin.to(dtype)
        for m in LAYER_ROWS[:2] if dry else LAYER_ROWS:
            x = torch.randn(m, in_f, device=device, dtype=dtype)
            row: dict[str, Any] = {"out": out_f, "in": in_f, "rows": m}
            cases = {"dense": dense, "int4": int4, "2:4": sparse, "fp8_w8a8": fp8}
            with torch.inference_mode():
                for name, mod in cases.items():
                    try:
                        call = functools.partial(mod, x)
                        row[f"{name}_ms"] = time_layer(call, device, 5 if dry else 50)
                    except Exception as exc:
                        row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            base = row.get("dense_ms")
            for name in ("int4", "2:4", "fp8_w8a8"):
                if base and row.get(f"{name}_ms"):
                    row[f"{name}_speedup"] = base / row[f"{name}_ms"]
            rows.append(row)
            print(f"layer {row}", flush=True)
    return rows


# ------------------------------------------------------------------------------ sections


def decode_rows(
    model: Any, quantized: Any | None, device: str, half: Any, new_tokens: int
) -> dict[str, Any]:
    """Tokens/s at batch 1 and 8 of ``model`` in ``half``, of the GPTQ model ``quantized`` on
    the int4 kernel, of ``model`` 2:4-pruned and of ``model`` on fp8 W8A8 (module docstring of
    device_check.py); ratios to the ``half`` model's."""
    import torch

    vocab = int(model.config.vocab_size)
    out: dict[str, Any] = {"dtype": str(half), "new_tokens": new_tokens}
    builds: dict[str, Callable[[], Any]] = {
        "fp16": lambda: (copy.deepcopy(model).to(device, half), {}),
        "int4": lambda: int4_model(quantized, half) if quantized is not None else None,
        "2:4": lambda: sparse24_model(copy.deepcopy(model).to(device), half),
        "fp8_w8a8": lambda: fp8_model(copy.deepcopy(model).to(device), half),
    }
    for name, build in builds.items():
        try:
            built = build()
            if built is None:
                out[name] = {"skipped": "no GPTQ model (section gptq failed or skipped)"}
                continue
            m, kernels = built
            row: dict[str, Any] = {"kernels": kernels}
            for batch in (1, 8):
                row[f"tokens_per_s_b{batch}"] = decode_rate(m, vocab, batch, new_tokens)
            out[name] = row
            del m
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        print(f"decode {name}: {out[name]}", flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    base = out.get("fp16", {})
    for name in ("int4", "2:4", "fp8_w8a8"):
        for b in (1, 8):
            key = f"tokens_per_s_b{b}"
            if key in base and key in out.get(name, {}):
                out[name][f"vs_fp16_b{b}"] = out[name][key] / base[key]
    return out
