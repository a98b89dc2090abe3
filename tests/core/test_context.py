import torch

from slimtorch.core.context import Context


def test_generator_is_seeded_and_offsettable() -> None:
    ctx = Context(seed=3)
    a = torch.rand(4, generator=ctx.generator())
    b = torch.rand(4, generator=ctx.generator())
    c = torch.rand(4, generator=ctx.generator(offset=1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_progress_bar_yields_items() -> None:
    assert list(Context(progress=False).progress_bar(range(3), "x")) == [0, 1, 2]
