"""LowRankLinear / LowRankConv2d: forward maths, config round trip, bad configs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from slimtorch.core.errors import ArtifactError
from slimtorch.runtime.lowrank import LowRankConv2d, LowRankLinear


def test_low_rank_linear_computes_a_at_b() -> None:
    g = torch.Generator().manual_seed(0)
    a, b, bias = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g), torch.randn(6)
    mod = LowRankLinear.from_factors(a, b, bias)
    x = torch.randn(3, 4, 5, generator=g)
    torch.testing.assert_close(mod(x), x @ (a @ b).T + bias)
    assert mod.config() == {"in_features": 5, "out_features": 6, "rank": 2, "bias": True}
    nobias = LowRankLinear.from_factors(a, b, None)
    torch.testing.assert_close(nobias(x), x @ (a @ b).T)


def test_low_rank_linear_rebuilds_from_json_config() -> None:
    mod = LowRankLinear.from_factors(torch.randn(6, 2), torch.randn(2, 5), None)
    cfg = json.loads(json.dumps(mod.config()))
    again = LowRankLinear.from_config(cfg)
    again.load_state_dict(mod.state_dict())
    x = torch.randn(2, 5)
    assert torch.equal(again(x), mod(x))
    assert set(mod.state_dict()) == {"down.weight", "up.weight"}


def test_low_rank_conv_rebuilds_from_json_config() -> None:
    conv = nn.Conv2d(3, 8, (3, 5), stride=2, padding=(1, 2), dilation=1, padding_mode="reflect")
    w = conv.weight.detach().reshape(8, -1)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    a, b = u[:, :4] * s[:4], vh[:4]
    mod = LowRankConv2d.from_conv(conv, a, b)
    cfg = json.loads(json.dumps(mod.config()))
    again = LowRankConv2d.from_config(cfg)
    again.load_state_dict(mod.state_dict())
    x = torch.randn(2, 3, 11, 11)
    assert torch.equal(again(x), mod(x))
    assert again.down.kernel_size == (3, 5) and again.down.padding_mode == "reflect"
    w4 = (a @ b).reshape(conv.weight.shape)
    ref = nn.functional.conv2d(nn.functional.pad(x, (2, 2, 1, 1), mode="reflect"), w4, conv.bias, 2)
    torch.testing.assert_close(mod(x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("cls", "cfg"),
    [
        (LowRankLinear, {"in_features": 4, "out_features": 2}),
        (LowRankLinear, {"in_features": "x", "out_features": 2, "rank": 1, "bias": True}),
        (LowRankConv2d, {"in_channels": 3, "out_channels": 4, "rank": 2, "bias": True}),
    ],
)
def test_bad_configs_raise_artifact_error(cls: type, cfg: dict[str, object]) -> None:
    with pytest.raises(ArtifactError, match="re-save the artifact"):
        cls.from_config(cfg)
