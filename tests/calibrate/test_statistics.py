"""Streaming input statistics equal the batch-at-once computation; Hessian helpers."""

from __future__ import annotations

import pytest
import torch

from slimtorch.calibrate.statistics import (
    AbsMaxAccumulator,
    AbsMeanAccumulator,
    HessianAccumulator,
    InputNormAccumulator,
    check_hessian,
    dead_inputs,
    inverse_cholesky,
)
from slimtorch.core.errors import UnsupportedModelError, UserInputError


def _batches(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batches = [
        torch.randn(2, 5, 6, generator=g),  # [batch, seq, in]
        torch.randn(7, 6, generator=g),  # [tokens, in]
        torch.randn(1, 1, 3, 6, generator=g) * 10,  # rank 4
        torch.randn(0, 6),  # empty batch
    ]
    return batches, torch.cat([b.reshape(-1, 6) for b in batches])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_hessian_streaming_equals_batch(dtype: str) -> None:
    batches, x = _batches()
    acc = HessianAccumulator(6, dtype=dtype)  # type: ignore[arg-type]
    for b in batches:
        acc.update(b)
    h = acc.hessian()
    assert acc.count == x.shape[0] == 20
    assert h.dtype == getattr(torch, dtype)
    x64 = x.to(torch.float64)
    expected = 2.0 / x.shape[0] * x64.T @ x64
    torch.testing.assert_close(h.to(torch.float64), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(h, h.T)


def test_channel_accumulators_equal_batch() -> None:
    batches, x = _batches(1)
    norm, amax, amean = InputNormAccumulator(6), AbsMaxAccumulator(6), AbsMeanAccumulator(6)
    for b in batches:
        for acc in (norm, amax, amean):
            acc.update(b)
    torch.testing.assert_close(norm.sq_norm(), x.pow(2).sum(0))
    torch.testing.assert_close(norm.mean_sq(), x.pow(2).mean(0))
    assert torch.equal(amax.absmax(), x.abs().amax(0))
    torch.testing.assert_close(amean.absmean(), x.abs().mean(0))


def test_accumulator_bad_inputs() -> None:
    acc = HessianAccumulator(4)
    with pytest.raises(UserInputError, match="no inputs"):
        acc.hessian()
    with pytest.raises(UserInputError, match=r"\[\.\.\., 4\]"):
        acc.update(torch.randn(3, 5))
    acc.update(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    acc.update(torch.ones(2, 4))
    with pytest.raises(UnsupportedModelError, match="NaN"):
        acc.hessian()  # checked once, when read
    for bad in (InputNormAccumulator(4), AbsMaxAccumulator(4), AbsMeanAccumulator(4)):
        bad.update(torch.tensor([[1.0, float("inf"), 0.0, float("nan")]]))
        read = getattr(bad, {"InputNorm": "sq_norm", "AbsMax": "absmax"}.get(
            type(bad).__name__.removesuffix("Accumulator"), "absmean"))  # fmt: skip
        with pytest.raises(UnsupportedModelError, match="NaN"):
            read()
    with pytest.raises(UserInputError, match="float64"):
        InputNormAccumulator(4, dtype="float16")  # type: ignore[arg-type]
    with pytest.raises(UserInputError):
        AbsMaxAccumulator(0)
    with pytest.raises(UserInputError, match="no inputs"):
        AbsMeanAccumulator(3).absmean()


def test_inverse_cholesky_is_the_damped_inverse() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    h = 2 / 50 * x.T @ x
    u = inverse_cholesky(h, 0.01).to(torch.float64)
    assert torch.equal(u, torch.triu(u))
    damped = h + 0.01 * torch.diagonal(h).mean() * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(damped), rtol=1e-5, atol=1e-6)


def test_hessian_helpers_refuse_bad_input() -> None:
    singular = torch.zeros(3, 3)
    singular[0, 0] = 1.0
    with pytest.raises(UnsupportedModelError, match="increase damp"):
        inverse_cholesky(singular, 0.0)
    with pytest.raises(UserInputError, match="damp"):
        inverse_cholesky(torch.eye(3), -0.1)
    with pytest.raises(UserInputError, match="square"):
        check_hessian(torch.zeros(3, 4), 3)
    with pytest.raises(UserInputError, match="4 input columns"):
        check_hessian(torch.eye(3), 4)
    with pytest.raises(UnsupportedModelError, match="NaN"):
        check_hessian(torch.full((2, 2), float("inf")), 2)
    assert dead_inputs(torch.diag(torch.tensor([1.0, 0.0, 2.0]))).tolist() == [False, True, False]


class _Ranks:
    """Stands in for a distributed run's ``Comm``: the other ranks' partial sums are given; the
    bytes handed to ``sum`` are counted."""

    def __init__(self, others: list[torch.Tensor], names: list[list[str]] | None = None) -> None:
        self.others, self.names, self.sent = others, names or [], 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        self.sent += t.numel() * t.element_size()
        if t.dtype == torch.int64:
            return t * (1 + len(self.others))  # every rank saw as many rows
        total = t.clone()
        for other in self.others:
            total += other.to(t.dtype)
        return total

    def total(self, n: int) -> int:
        return int(self.sum(torch.tensor([n])).item())

    def gather_json(self, value: object) -> list[object]:
        return [value, *self.names]


def test_float32_sums_halve_memory_and_traffic_within_the_stated_bound() -> None:
    """``sum_dtype="float32"``: the running Hessian sum is float32 (half the memory), reduce
    sends half the bytes, and a two-shard sum differs from the one-process running sum by at
    most ``2 (B-1) 2^-24 sum_b |p_b|`` (docs/distributed.md), while float64 gives the same bits."""
    from slimtorch.calibrate.statistics import use_sum_dtype

    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(64, 48, generator=g) * (1 + 9 * (i % 3)) for i in range(16)]
    partial_abs = sum((b.T @ b).abs().to(torch.float64) for b in batches)
    bound = 2 * (len(batches) - 1) * 2.0**-24 * partial_abs * 2 / (64 * 16)
    results = {}
    for sum_dtype in ("float64", "float32"):
        one = HessianAccumulator(48, sum_dtype=sum_dtype)  # type: ignore[arg-type]
        first, second = HessianAccumulator(48), HessianAccumulator(48)
        use_sum_dtype({"a": first, "b": second}, sum_dtype)  # type: ignore[arg-type]
        for i, b in enumerate(batches):
            one.update(b)
            (first if i < 8 else second).update(b)
        assert one._sum is not None and second._sum is not None
        assert one._sum.dtype == getattr(torch, sum_dtype) == second._sum.dtype
        comm = _Ranks([second._sum])
        first.reduce(comm)  # rank 0 of two: its shard, plus rank 1's partial sum
        assert comm.sent == 48 * 48 * one._sum.element_size() + 8  # the sum and the row count
        assert first.count == one.count == 64 * 16
        results[sum_dtype] = (one.hessian(), first.hessian(), comm.sent)
    single, shards, _ = results["float64"]
    assert torch.equal(single, shards)  # float64 sums: bit-identical
    single32, shards32, sent32 = results["float32"]
    diff = (single32.double() - shards32.double()).abs()
    assert bool((diff <= bound).all()), float((diff - bound).max())
    assert sent32 - 8 == (results["float64"][2] - 8) // 2
    assert float(diff.max()) > 0  # float32 sums: the order shows
    with pytest.raises(UserInputError, match="sum_dtype='bfloat16'; use"):
        HessianAccumulator(4, sum_dtype="bfloat16")  # type: ignore[arg-type]


def test_data_free_notes_are_the_union_over_the_ranks() -> None:
    """Each rank notes the experts it compressed data-free; every rank ends with the union (a
    compressor sharing the run's list counts once)."""
    from types import SimpleNamespace

    from slimtorch.calibrate.statistics import share_data_free

    run_note = ["m.layers.1.e.3", "m.layers.0.e.2", "m.layers.0.e.2"]
    gptq, wanda = SimpleNamespace(data_free=run_note), SimpleNamespace(data_free=run_note)
    other_rank = [["m.layers.0.e.5", "m.layers.1.e.3"]]
    got = share_data_free([gptq, wanda, SimpleNamespace()], _Ranks([], other_rank))
    assert got == ["m.layers.0.e.2", "m.layers.0.e.5", "m.layers.1.e.3"] == run_note
    assert share_data_free([SimpleNamespace(data_free=["b", "a", "b"])], None) == ["a", "b"]


def test_a_stage_sets_the_sum_dtype_of_its_accumulators() -> None:
    """``calibration.sum_dtype`` of a layer-wise stage reaches the running sums (GPTQ's
    Hessians here); a dtype other than float32/float64 is refused naming the option."""
    import slimtorch as st
    from slimtorch.calibrate import sequential
    from slimtorch.core.errors import ConfigError
    from slimtorch.recipe import load_recipe
    from slimtorch.testing.models import tiny_llama
    from slimtorch.testing.tasks import tensor_task

    seen: list[torch.dtype] = []
    observe = sequential.observe_block

    def spy(block: torch.nn.Module, inputs: list, stats: dict) -> None:  # type: ignore[type-arg]
        observe(block, inputs, stats)
        sums = [a._sum for a in stats.values() if isinstance(a, HessianAccumulator)]
        seen.extend(t.dtype for t in sums if t is not None)

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    stage = {"method": "quantize.gptq", "bits": 4, "group_size": 16}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sequential, "observe_block", spy)
        for sum_dtype in ("float64", "float32"):
            seen.clear()
            cal = {"samples": 2, "batch_size": 1, "sum_dtype": sum_dtype}
            model = tiny_llama(vocab=64, hidden=32, intermediate=64, heads=4, kv_heads=2)
            st.compress(model, {"stages": [{**stage, "calibration": cal}]}, tensor_task(ids))
            assert seen and set(seen) == {getattr(torch, sum_dtype)}, sum_dtype
    with pytest.raises(ConfigError, match=r"calibration\.sum_dtype.*'float32' or 'float64'"):
        load_recipe({"stages": [{**stage, "calibration": {"sum_dtype": "float16"}}]})


def test_ranks_agree_on_which_layers_share_an_accumulator() -> None:
    """An expert no token of this rank's shard reached never showed that its gate and up
    projections read one tensor: the sharing another rank saw is taken (its accumulators are
    empty); a fed layer seen alone here cannot be joined."""
    from slimtorch.calibrate.statistics import agree_shared, shared_links

    shared = InputNormAccumulator(4)
    shared.update(torch.ones(3, 4))
    seen = {"e0.gate": shared, "e0.up": shared, "e1.gate": InputNormAccumulator(4),
            "e1.up": InputNormAccumulator(4)}  # fmt: skip
    assert shared_links(seen) == {"e0.gate": "e0.gate", "e0.up": "e0.gate", "e1.gate": "e1.gate",
                                  "e1.up": "e1.up"}  # fmt: skip
    other = {"e0.gate": "e0.gate", "e0.up": "e0.gate", "e1.gate": "e1.gate", "e1.up": "e1.gate"}
    agree_shared(seen, [shared_links(seen), other])
    assert seen["e1.up"] is seen["e1.gate"] and seen["e0.up"] is shared
    fed = {"a": InputNormAccumulator(4), "b": InputNormAccumulator(4)}
    fed["b"].update(torch.ones(1, 4))
    with pytest.raises(UnsupportedModelError, match="b read the same input as a"):
        agree_shared(fed, [{"a": "a", "b": "a"}])
