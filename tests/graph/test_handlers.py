"""Layer handlers: dims, exact surgery (restriction / zero-input / permutation), errors, registry."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from slimtorch.core.errors import ConfigError, UserInputError
from slimtorch.formats.state import WeightState, set_state
from slimtorch.graph.handlers import HANDLERS, handler_for, register_handler
from slimtorch.graph.slots import Slot, SlotHandler, slot_view, take

ATOL = 1e-6
KEEP = torch.tensor([5, 0, 3, 2])  # unsorted on purpose: a subset in a new order
PERM = torch.tensor([3, 1, 5, 0, 4, 2])


def _axis(layout: str, t: Tensor) -> int:
    return 1 if layout == "first" else t.dim() - 1


def check_out(module: nn.Module, x: Tensor, keep: Tensor) -> nn.Module:
    """Prune ``out`` to ``keep``: the new output is the old one restricted (and reordered).
    A coupled layer gets its input restricted the same way."""
    h = handler_for(module)
    assert h is not None
    before = module(x).detach()
    new = h.prune(module, "out", keep) or module
    assert h.dims(new)["out"] == keep.numel()
    x_new = x.index_select(_axis(h.layout, x), keep) if h.coupled(new) else x
    torch.testing.assert_close(
        new(x_new), before.index_select(_axis(h.layout, before), keep), atol=ATOL, rtol=0
    )
    return new


def check_in(module: nn.Module, x: Tensor, keep: Tensor) -> nn.Module:
    """Prune ``in`` to ``keep``: with the removed inputs zero, the output is unchanged."""
    h = handler_for(module)
    assert h is not None
    ax = _axis(h.layout, x)
    mask = torch.zeros(x.shape[ax], dtype=torch.bool)
    mask[keep] = True
    shape = [1] * x.dim()
    shape[ax] = -1
    xz = x * mask.view(shape).to(x.dtype)
    before = module(xz).detach()
    new = h.prune(module, "in", keep) or module
    assert h.dims(new)["in"] == keep.numel()
    torch.testing.assert_close(new(xz.index_select(ax, keep)), before, atol=ATOL, rtol=0)
    return new


def test_linear_out_in_and_permutation() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 7).double()
    x = torch.randn(3, 2, 6, dtype=torch.double)
    check_out(lin, x, KEEP)
    assert lin.weight.shape == (4, 6) and lin.bias.shape == (4,) and lin.out_features == 4
    check_in(lin, x, KEEP)
    assert lin.weight.shape == (4, 4) and lin.in_features == 4
    # a full permutation of the inputs: exact, no zeroing needed
    lin = nn.Linear(6, 3).double()
    before = lin(x)
    handler_for(lin).prune(lin, "in", PERM)  # type: ignore[union-attr]
    torch.testing.assert_close(lin(x[..., PERM]), before, atol=ATOL, rtol=0)
    lin = nn.Linear(6, 6, bias=False).double()
    check_out(lin, x, PERM)
    assert lin.bias is None


def test_prune_keeps_dtype_device_and_requires_grad() -> None:
    lin = nn.Linear(6, 7).to(torch.float64)
    lin.bias.requires_grad_(False)
    handler_for(lin).prune(lin, "out", KEEP)  # type: ignore[union-attr]
    assert isinstance(lin.weight, nn.Parameter) and lin.weight.dtype == torch.float64
    assert lin.weight.requires_grad and not lin.bias.requires_grad
    assert lin.weight.is_contiguous()


def test_hf_conv1d_weight_is_in_by_out() -> None:
    torch.manual_seed(0)
    conv = Conv1D(7, 6).double()  # nf=7 outputs, nx=6 inputs
    h = handler_for(conv)
    assert h is not None and h.dims(conv) == {"in": 6, "out": 7}
    x = torch.randn(2, 3, 6, dtype=torch.double)
    check_out(conv, x, KEEP)
    assert conv.weight.shape == (6, 4) and conv.nf == 4
    check_in(conv, x, KEEP)
    assert conv.weight.shape == (4, 4) and conv.nx == 4


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_nd_plain(nd: int) -> None:
    torch.manual_seed(nd)
    conv = getattr(nn, f"Conv{nd}d")(6, 7, 3, padding=1).double()
    x = torch.randn(2, 6, *([5] * nd), dtype=torch.double)
    h = handler_for(conv)
    assert h is not None and h.layout == "first" and not h.coupled(conv)
    check_out(conv, x, KEEP)
    check_in(conv, x, PERM[:5])
    assert conv.weight.shape == (4, 5, *([3] * nd))
    assert (conv.in_channels, conv.out_channels) == (5, 4)


def test_depthwise_conv_is_coupled() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, groups=6, padding=1).double()
    h = handler_for(conv)
    assert h is not None and h.coupled(conv) and h.dims(conv) == {"out": 6}
    x = torch.randn(2, 6, 5, 5, dtype=torch.double)
    before = conv(x).detach()
    h.prune(conv, "out", KEEP)
    assert conv.groups == conv.in_channels == conv.out_channels == 4
    torch.testing.assert_close(conv(x[:, KEEP]), before[:, KEEP], atol=ATOL, rtol=0)


def test_grouped_conv_out_and_in() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 9, 3, groups=3).double()
    h = handler_for(conv)
    assert h is not None and h.blocks(conv, "out") == 3 and h.blocks(conv, "in") == 3
    x = torch.randn(2, 6, 5, 5, dtype=torch.double)
    check_out(conv, x, torch.tensor([2, 0, 4, 5, 7, 6]))  # 2 per group, reordered within groups
    assert conv.weight.shape == (6, 2, 3, 3)
    check_in(conv, x, torch.tensor([1, 3, 5]))  # one local column per group: 1, 1, 1
    assert conv.weight.shape == (6, 1, 3, 3) and conv.in_channels == 3
    conv = nn.Conv1d(6, 6, 1, groups=2, bias=False).double()
    check_in(conv, torch.randn(2, 6, 4, dtype=torch.double), torch.tensor([2, 0, 4, 3]))
    # importance view for grouped inputs: row c holds what input c feeds
    conv = nn.Conv2d(4, 6, 1, groups=2)
    (view, axis), *_ = h.weights(conv, "in")
    assert view.shape[axis] == 4
    torch.testing.assert_close(view[3], conv.weight.detach()[3:6, 1])


@pytest.mark.parametrize(
    ("dim", "keep", "match"),
    [
        ("out", torch.tensor([0, 1, 2, 3, 6]), "same number of channels"),
        ("out", torch.tensor([3, 0, 6]), "group order"),
        ("in", torch.tensor([0, 1, 2]), "same number of channels"),
    ],
)
def test_grouped_conv_uneven_keep_raises(dim: str, keep: Tensor, match: str) -> None:
    conv = nn.Conv2d(6, 9, 3, groups=3)
    with pytest.raises(ValueError, match=match):
        handler_for(conv).prune(conv, dim, keep)  # type: ignore[union-attr]
    assert conv.weight.shape == (9, 2, 3, 3)  # untouched


def test_batchnorm_prunes_running_stats_exactly() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).double()
    bn.train()
    bn(torch.randn(8, 6, 3, 3, dtype=torch.double) * 3 + 1)
    bn.eval()
    h = handler_for(bn)
    assert h is not None and h.coupled(bn) and h.dims(bn) == {"out": 6}
    check_out(bn, torch.randn(2, 6, 3, 3, dtype=torch.double), KEEP)
    assert bn.running_mean.shape == (4,) and bn.num_features == 4
    bn1 = nn.BatchNorm1d(6, affine=False).double().eval()
    check_out(bn1, torch.randn(3, 6, dtype=torch.double), PERM)


def test_layernorm_groupnorm_shapes_and_maths() -> None:
    torch.manual_seed(0)
    ln = nn.LayerNorm(6).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    w, b = ln.weight.detach().clone(), ln.bias.detach().clone()
    h = handler_for(ln)
    assert h is not None and h.layout == "last" and h.coupled(ln)
    h.prune(ln, "out", KEEP)
    assert ln.normalized_shape == (4,) and ln.weight.shape == (4,)
    x = torch.randn(3, 4, dtype=torch.double)
    ref = nn.functional.layer_norm(x, (4,), w[KEEP], b[KEEP], ln.eps)
    torch.testing.assert_close(ln(x), ref, atol=ATOL, rtol=0)
    plain = nn.LayerNorm(6, elementwise_affine=False)
    assert handler_for(plain).coupled(plain)  # type: ignore[union-attr]
    handler_for(plain).prune(plain, "out", KEEP)  # type: ignore[union-attr]
    assert plain.normalized_shape == (4,) and plain.weight is None
    gn = nn.GroupNorm(3, 6)
    hg = handler_for(gn)
    assert hg is not None and hg.blocks(gn, "out") == 3
    hg.prune(gn, "out", torch.tensor([1, 3, 4]))
    assert gn.num_channels == 3 and gn.num_groups == 3 and gn.weight.shape == (3,)
    assert gn(torch.randn(2, 3, 4)).shape == (2, 3, 4)


def test_embedding_and_prelu() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 6, padding_idx=0).double()
    h = handler_for(emb)
    assert h is not None and h.dims(emb) == {"out": 6} and h.layout == "last"
    check_out(emb, torch.tensor([[1, 0, 9], [3, 3, 2]]), KEEP)
    assert emb.weight.shape == (10, 4) and emb.embedding_dim == 4
    prelu = nn.PReLU(6).double()
    with torch.no_grad():
        prelu.weight.uniform_(-1, 1)
    hp = handler_for(prelu)
    assert hp is not None and hp.coupled(prelu) and hp.layout == "first"
    check_out(prelu, torch.randn(3, 6, 2, dtype=torch.double), KEEP)
    one = nn.PReLU()
    assert hp.coupled(one) and hp.dims(one) == {}


def test_weights_views_and_hand_l1() -> None:
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, 0.5]]))
        lin.bias.copy_(torch.tensor([1.0, -1.0]))
    h = handler_for(lin)
    assert h is not None
    for dim in ("in", "out"):
        for t, axis in h.weights(lin, dim):
            assert t.shape[axis] == h.dims(lin)[dim]
    l1_out = sum(
        t.abs().transpose(0, a).reshape(t.shape[a], -1).sum(1) for t, a in h.weights(lin, "out")
    )
    torch.testing.assert_close(l1_out, torch.tensor([1 + 2 + 3.0, 4 + 5 + 0.5]))  # no bias
    l1_in = sum(
        t.abs().transpose(0, a).reshape(t.shape[a], -1).sum(1) for t, a in h.weights(lin, "in")
    )
    torch.testing.assert_close(l1_in, torch.tensor([5.0, 7.0, 3.5]))
    assert [g for g, _ in h.grads(lin, "out")] == [None]
    lin(torch.ones(1, 3)).sum().backward()
    ((g, axis),) = h.grads(lin, "out")
    assert g is not None and g.shape[axis] == 2
    torch.testing.assert_close(g, torch.ones(2, 3))
    # views share memory with the parameter
    ((w, _),) = h.weights(lin, "out")
    assert w.data_ptr() == lin.weight.data_ptr()
    # importance reads BatchNorm's scale only: not its shift, not the running statistics
    bn = nn.BatchNorm2d(3)
    bn.running_var.fill_(100.0)
    hb = handler_for(bn)
    assert hb is not None
    views = hb.weights(bn, "out")
    assert len(views) == 1 and views[0][0].data_ptr() == bn.weight.data_ptr()
    assert len(hb.grads(bn, "out")) == 1
    mha = nn.MultiheadAttention(8, 2)  # packed in_proj_weight / in_proj_bias, bias_k absent
    import slimtorch.runtime  # noqa: F401  (registers the MultiheadAttention handler)

    hm = handler_for(mha)
    assert hm is not None
    ptrs = {t.data_ptr() for t, _ in hm.weights(mha, "heads")}
    assert ptrs == {mha.in_proj_weight.data_ptr(), mha.out_proj.weight.data_ptr()}


def test_slot_view_and_take_with_outer_inner() -> None:
    t = torch.arange(2 * 3 * 2 * 5).reshape(12, 5)  # axis 0 = [outer 2, n 3, inner 2]
    slot = Slot("w", 0, outer=2, inner=2)
    view, axis = slot_view(t, slot)
    assert view.shape == (2, 3, 2, 5) and axis == 1
    out = take(t, slot, torch.tensor([2, 0]))
    assert out.shape == (8, 5)
    assert torch.equal(out.view(2, 2, 2, 5), view[:, [2, 0]])


class Scale(nn.Module):
    """A custom per-channel scale, coupled like a norm."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.arange(1.0, n + 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


class ScaleHandler(SlotHandler):
    is_coupled = True

    def dims(self, module: nn.Module) -> dict[str, int]:
        return {"out": module.gain.numel()}

    def slots(self, module: nn.Module, dim: str) -> list[Slot]:
        return [Slot("gain", 0)]

    def resize(self, module: nn.Module, dim: str, n: int) -> None:
        pass


def test_register_custom_layer() -> None:
    class Sub(Scale):
        pass

    assert handler_for(Scale(3)) is None
    handler = ScaleHandler()
    register_handler(Scale, handler)
    assert handler_for(Scale(3)) is handler and handler_for(Sub(2)) is handler
    check_out(Scale(6), torch.randn(2, 6), KEEP)
    with pytest.raises(ValueError, match="already registered"):
        register_handler(Scale, handler)
    register_handler("TestOnlyScaleName", handler)
    named = type("TestOnlyScaleName", (nn.Module,), {})
    assert handler_for(named()) is handler
    assert "Linear" in HANDLERS and handler_for(nn.ReLU()) is None


def test_compressed_weight_refused() -> None:
    lin = nn.Linear(4, 3)
    set_state(lin, "weight", WeightState(mask=torch.ones(3, 4, dtype=torch.bool)))
    with pytest.raises(ConfigError, match="structured pruning must come first"):
        handler_for(lin).prune(lin, "out", torch.tensor([0, 1]))  # type: ignore[union-attr]
    assert lin.weight.shape == (3, 4)
    conv = nn.Conv2d(4, 6, 1, groups=2)
    set_state(conv, "weight", WeightState(quant=None, mask=None))
    with pytest.raises(ConfigError, match="pruning mask"):
        handler_for(conv).prune(conv, "in", torch.tensor([0, 2]))  # type: ignore[union-attr]
    wn = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))
    with pytest.raises(ConfigError, match="parametrized"):
        handler_for(wn).prune(wn, "out", torch.tensor([0]))  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("keep", "match"),
    [
        (torch.tensor([0, 0]), "twice"),
        (torch.tensor([0, 9]), r"\[0, 6\)"),
        (torch.tensor([], dtype=torch.int64), "at least one"),
        (torch.tensor([0.0, 1.0]), "integer"),
        (torch.tensor([[0, 1]]), "1-D"),
    ],
)
def test_bad_keep_raises(keep: Tensor, match: str) -> None:
    lin = nn.Linear(4, 6)
    with pytest.raises(UserInputError, match=match):
        handler_for(lin).prune(lin, "out", keep)  # type: ignore[union-attr]
    with pytest.raises(UserInputError, match="no prunable dim 'heads'"):
        handler_for(lin).prune(lin, "heads", torch.tensor([0]))  # type: ignore[union-attr]
