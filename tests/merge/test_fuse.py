"""BatchNorm folding and Conv-BN-ReLU fusion: exact maths, model surgery, save/load."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch.api as api
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, TargetError, UnsupportedModelError
from slimtorch.core.methods import Run
from slimtorch.formats.state import QuantState, WeightState, get_state, set_state
from slimtorch.graph.weights import select_weights
from slimtorch.merge.fuse import BNParams, FuseConfig, find_fusable, fold_bn, fuse_model
from slimtorch.runtime import RUNTIME_MODULES
from slimtorch.runtime.fused import FusedIdentity, FusedLayer

for _cls in (FusedLayer, FusedIdentity):  # until slimtorch.runtime registers them itself
    if _cls.__name__ not in RUNTIME_MODULES:
        RUNTIME_MODULES.add(_cls.__name__, _cls)


def _random_bn(bn: nn.modules.batchnorm._BatchNorm, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=g))  # type: ignore[union-attr]
        bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)  # type: ignore[union-attr]
        if bn.affine:
            bn.weight.copy_(torch.randn(n, generator=g))
            bn.bias.copy_(torch.randn(n, generator=g))
    bn.eval()


class BNNet(nn.Module):
    """Conv(no bias)-BN-ReLU, Conv(bias)-BN-ReLU(inplace), depthwise, a residual add with a
    shared ReLU, a functional relu, and Linear-BN1d-ReLU: input [B, 3, 12, 12]."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = nn.ReLU(inplace=True)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(8)
        self.shared = nn.ReLU()
        self.pw = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        self.bn_pw = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 36, 24, bias=False)
        self.bn_fc = nn.BatchNorm1d(24)
        self.act_fc = nn.ReLU()
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.act2(self.bn2(self.conv2(h)))
        h = self.shared(self.bn_dw(self.dw(h)) + h)  # shared ReLU: used twice
        h = self.shared(h)
        h = torch.relu(self.bn_pw(self.pw(h)))
        return self.head(self.act_fc(self.bn_fc(self.fc(h.flatten(1)))))


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    model = BNNet()
    for i, m in enumerate(model.modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _random_bn(m, i)
    return model.eval()


def _x(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def _count(model: nn.Module, cls: type[nn.Module]) -> int:
    return sum(type(m) is cls for m in model.modules())


def _run(model: nn.Module, method: str, **cfg: object) -> None:
    from slimtorch.core.methods import METHODS

    spec = METHODS.get(method)
    spec.apply(model, spec.config(**cfg), Run(Context(progress=False)))


# --- fold_bn, the pure function ------------------------------------------------------------
LAYERS = {
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d, (2, 4, 7, 7)),
    "conv2d_nobias": (lambda: nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d, (2, 4, 7, 7)),
    "grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2, stride=2), nn.BatchNorm2d, (2, 4, 9, 9)),
    "depthwise": (lambda: nn.Conv2d(6, 6, 3, groups=6, bias=False), nn.BatchNorm2d, (2, 6, 7, 7)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, dilation=2), nn.BatchNorm1d, (2, 4, 11)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, bias=False), nn.BatchNorm3d, (2, 2, 5, 5, 5)),
    "convT2d": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
        nn.BatchNorm2d,
        (2, 4, 5, 5),
    ),
    "linear": (lambda: nn.Linear(10, 6), nn.BatchNorm1d, (8, 10)),
    "linear_nobias": (lambda: nn.Linear(10, 6, bias=False), nn.BatchNorm1d, (8, 10)),
}


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_fold_bn_matches_layer_then_bn(case: str) -> None:
    torch.manual_seed(3)
    make, bn_cls, shape = LAYERS[case]
    layer = make().eval()
    bn = bn_cls(6 if case != "conv3d" else 4)
    _random_bn(bn, 7)
    x = torch.randn(shape)
    ref = bn(layer(x))
    transposed = isinstance(layer, nn.ConvTranspose2d)
    groups = getattr(layer, "groups", 1)
    w, b = fold_bn(layer.weight, layer.bias, BNParams.of(bn), transposed, groups)
    assert w.shape == layer.weight.shape and w.dtype == torch.float32
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias = nn.Parameter(b)
    out = layer(x)
    assert (out - ref).abs().max().item() < 1e-5
    assert ref.abs().max().item() > 0.5  # a real signal, not all zeros


def test_fold_bn_without_affine_is_normalisation() -> None:
    bn = nn.BatchNorm1d(3, affine=False)
    _random_bn(bn, 2)
    w = torch.eye(3)
    fw, fb = fold_bn(w, None, BNParams.of(bn))
    std = (bn.running_var + bn.eps).sqrt()  # type: ignore[operator]
    torch.testing.assert_close(fw, torch.diag(1 / std))
    torch.testing.assert_close(fb, -bn.running_mean / std)  # type: ignore[operator]


def test_fold_bn_refuses_a_bn_of_another_width() -> None:
    bn = nn.BatchNorm2d(5).eval()
    with pytest.raises(UnsupportedModelError, match="5 features but the layer has 6"):
        fold_bn(torch.randn(6, 3, 3, 3), None, BNParams.of(bn))


def test_bn_without_running_stats_cannot_fold() -> None:
    with pytest.raises(UnsupportedModelError, match="track_running_stats=False"):
        BNParams.of(nn.BatchNorm2d(4, track_running_stats=False))


# --- model-level fusion --------------------------------------------------------------------
def test_find_fusable_follows_the_graph() -> None:
    pairs = find_fusable(bn_net(), with_relu=True)
    found = {(p.layer, p.bn, p.relu) for p in pairs}
    assert found == {
        ("stem.0", "stem.1", "stem.2"),
        ("conv2", "bn2", "act2"),
        ("dw", "bn_dw", None),  # output feeds an add, then a shared ReLU
        ("pw", "bn_pw", None),  # functional relu
        ("fc", "bn_fc", "act_fc"),
    }


class ReadsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(3, 4, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv.weight.sum() + self.bn2(self.conv2(x))


def test_a_layer_whose_weight_is_read_elsewhere_is_left_alone() -> None:
    pairs = find_fusable(ReadsWeight().eval())
    assert [(p.layer, p.bn) for p in pairs] == [("conv2", "bn2")]


def test_fuse_batchnorm_keeps_outputs() -> None:
    model = bn_net()
    ref = model(_x())
    _run(model, "fuse.batchnorm")
    assert _count(model, nn.BatchNorm2d) == 0 and _count(model, nn.BatchNorm1d) == 0
    assert _count(model, FusedIdentity) == 5
    assert _count(model, FusedLayer) == 4  # every layer without bias; conv2 keeps its own
    assert type(model.conv2) is nn.Conv2d
    assert _count(model, nn.ReLU) == 4  # no ReLU touched by fuse.batchnorm
    assert (model(_x()) - ref).abs().max().item() < 1e-5


def test_fuse_conv_bn_relu_keeps_outputs_and_removes_relus() -> None:
    model = bn_net()
    ref = model(_x())
    _run(model, "fuse.conv_bn_relu")
    assert _count(model, nn.ReLU) == 1  # only the shared one stays
    assert _count(model, FusedIdentity) == 8  # 5 BatchNorms and 3 ReLUs
    assert isinstance(model.conv2, FusedLayer) and model.conv2.relu
    assert (model(_x()) - ref).abs().max().item() < 1e-5
    with torch.inference_mode():  # the oneDNN conv+relu path
        assert (model(_x()) - ref).abs().max().item() < 1e-5


def test_fused_layer_fast_and_plain_paths_agree() -> None:
    conv = nn.Conv2d(4, 8, 3, padding=1, stride=2, groups=2)
    fused = FusedLayer.wrap(conv, conv.weight.detach(), conv.bias.detach(), relu=True)  # type: ignore[union-attr]
    x = torch.randn(3, 4, 9, 9)
    plain = fused(x)
    with torch.no_grad():
        fast = fused(x)
    torch.testing.assert_close(fast, F.relu(conv(x)), atol=1e-6, rtol=0)
    torch.testing.assert_close(plain, fast, atol=1e-6, rtol=0)


def test_fused_layer_repacks_a_changed_weight_and_copies() -> None:
    import copy

    conv = nn.Conv2d(4, 8, 3, padding=1)
    fused = FusedLayer.wrap(conv, conv.weight.detach(), conv.bias.detach(), relu=True)  # type: ignore[union-attr]
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        first = fused(x)
        assert fused._packed is not None
        fused.layer.weight.mul_(2)  # e.g. a pruning mask applied in place
        second = fused(x)
        twin = copy.deepcopy(fused)
        assert twin._packed is None
        torch.testing.assert_close(twin(x), second)
    expected = F.relu(F.conv2d(x, fused.layer.weight, fused.layer.bias, padding=1))
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(first, second)


def test_fused_model_saves_and_loads_identically(tmp_path) -> None:
    model = bn_net()
    api.set_architecture(model, {"kind": "factory", "ref": f"{__name__}:bn_net"})
    _run(model, "fuse.conv_bn_relu")
    api.save(model, tmp_path / "art")
    loaded = api.load(tmp_path / "art", trust_factory=True)
    assert _count(loaded, FusedLayer) == 5 and _count(loaded, nn.BatchNorm2d) == 0
    assert torch.equal(loaded(_x()), model(_x()))


def test_fuse_respects_targets_and_ignore() -> None:
    model = bn_net()
    ref = model(_x())
    _run(model, "fuse.batchnorm", targets=["Conv2d"], ignore=["bn_dw"])
    assert isinstance(model.bn_dw, nn.BatchNorm2d) and isinstance(model.bn_fc, nn.BatchNorm1d)
    assert _count(model, FusedIdentity) == 3
    assert (model(_x()) - ref).abs().max().item() < 1e-5
    with pytest.raises(TargetError, match="no module matched"):
        _run(bn_net(), "fuse.batchnorm", targets=["Conv3d"])


def test_training_mode_bn_is_refused() -> None:
    model = bn_net().train()
    with pytest.raises(UnsupportedModelError, match=r"model\.eval"):
        _run(model, "fuse.batchnorm")


def test_model_without_batchnorm_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(UnsupportedModelError, match="no Conv/Linear layer followed"):
        _run(model, "fuse.batchnorm")


class Untraceable(nn.Module):
    def __init__(self, sequential: bool) -> None:
        super().__init__()
        layers = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()]
        self.body = nn.Sequential(*layers) if sequential else nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 2
        for layer in self.body:
            x = layer(x)
        return x


def test_untraceable_model_falls_back_to_sequential(caplog: pytest.LogCaptureFixture) -> None:
    model = Untraceable(sequential=True)
    _random_bn(model.body[1], 4)
    model.eval()
    ref = model(_x())
    with caplog.at_level(logging.WARNING):
        fuse_model(model, FuseConfig(), with_relu=True)
    assert "torch.fx cannot trace" in caplog.text
    assert isinstance(model.body[0], FusedLayer) and model.body[0].relu
    assert (model(_x()) - ref).abs().max().item() < 1e-5
    with pytest.raises(UnsupportedModelError, match=r"torch\.fx cannot trace the model"):
        fuse_model(Untraceable(sequential=False).eval(), FuseConfig(), with_relu=False)


def test_masks_survive_and_fused_layers_stay_compressible() -> None:
    model = bn_net()
    mask = torch.rand(model.dw.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        model.dw.weight.mul_(mask)
    set_state(model.dw, "weight", WeightState(mask=mask))
    _run(model, "fuse.batchnorm")
    inner = model.dw.layer
    state = get_state(inner, "weight")
    assert state is not None and torch.equal(state.mask, mask)  # type: ignore[arg-type]
    assert torch.all(inner.weight[~mask] == 0)
    names = {r.name for r in select_weights(model, types=("Conv2d", "Linear"))}
    assert {"dw.layer.weight", "stem.0.layer.weight", "conv2.weight", "fc.layer.weight"} <= names


def test_quantized_layer_is_refused() -> None:
    model = bn_net()
    q = QuantState("affine", 8, True, "per_tensor", torch.zeros(8, 1, 3, 3, dtype=torch.int8),
                   torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32))  # fmt: skip
    set_state(model.dw, "weight", WeightState(quant=q))
    with pytest.raises(ConfigError, match="before quantize"):
        _run(model, "fuse.batchnorm", targets=["dw"])


def test_bad_fuse_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="extra"):
        FuseConfig(sparsity=0.5)  # type: ignore[call-arg]
