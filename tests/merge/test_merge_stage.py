"""Recipe stages merge.*: the model being compressed is the base; masks survive; bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import slimtorch as st
from slimtorch.core.errors import ConfigError, TargetError
from slimtorch.merge import methods as M
from slimtorch.recipe import load_recipe
from slimtorch.testing.models import tiny_cnn


def _other(tmp: Path, seed: int) -> tuple[str, dict[str, torch.Tensor]]:
    model = tiny_cnn()
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    path = tmp / f"other{seed}.safetensors"
    save_file(sd, str(path))
    return str(path), sd


def _compress(stage: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = st.compress(model, {"stages": [stage]})
    return before, result.model


def test_linear_stage_averages_with_the_model(tmp_path: Path) -> None:
    path, other = _other(tmp_path, 1)
    before, merged = _compress(
        {"method": "merge.linear", "models": [path], "weights": [3.0], "base_weight": 1.0}
    )
    for k, v in merged.state_dict().items():
        assert torch.equal(v, M.linear([before[k], other[k]], [1.0, 3.0])), k


def test_task_stages_use_the_model_as_base(tmp_path: Path) -> None:
    (p1, o1), (p2, o2) = _other(tmp_path, 1), _other(tmp_path, 2)
    before, ties = _compress({"method": "merge.ties", "models": [p1, p2], "density": 0.3})
    _, dare = _compress(
        {"method": "merge.dare", "models": [p1, p2], "density": 0.5, "seed": 5, "consensus": True}
    )
    _, slerp = _compress({"method": "merge.slerp", "model": p1, "t": 0.25})
    _, ta = _compress({"method": "merge.task_arithmetic", "models": [p1], "scale": 0.5})
    for k in before:
        b, x, y = before[k], o1[k], o2[k]
        assert torch.equal(ties.state_dict()[k], M.ties(b, [x, y], [1, 1], 0.3))
        gen = M.tensor_generator(5, k)
        want = M.dare(b, [x, y], [1, 1], 0.5, gen, consensus=True, rescale="density")
        assert torch.equal(dare.state_dict()[k], want)
        assert torch.equal(slerp.state_dict()[k], M.slerp(0.25, b, x))
        assert torch.equal(ta.state_dict()[k], M.task_arithmetic(b, [x], [1.0], lam=0.5))


def test_targets_limit_what_changes_and_masks_survive(tmp_path: Path) -> None:
    path, _ = _other(tmp_path, 1)
    recipe = {
        "stages": [
            {"method": "prune.magnitude", "sparsity": 0.5, "targets": ["Linear"]},
            {"method": "merge.linear", "models": [path], "targets": ["Linear"]},
        ]
    }
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = st.compress(model, recipe).model
    linear = [n for n, m in merged.named_modules() if isinstance(m, torch.nn.Linear)]
    for k, v in merged.state_dict().items():
        if k.rpartition(".")[0] in linear:
            assert not torch.equal(v, before[k]), k
            if k.endswith("weight"):
                assert float((v == 0).float().mean()) >= 0.5  # the pruning mask is kept
        else:
            assert torch.equal(v, before[k]), k


def test_bad_stage_configs(tmp_path: Path) -> None:
    path, _ = _other(tmp_path, 1)
    with pytest.raises(ConfigError, match="one weight per model"):
        load_recipe({"stages": [{"method": "merge.linear", "models": [path], "weights": [1, 2]}]})
    with pytest.raises(ConfigError, match="density"):
        load_recipe({"stages": [{"method": "merge.ties", "models": [path], "density": 0}]})
    with pytest.raises(ConfigError, match="models"):
        load_recipe({"stages": [{"method": "merge.ties", "models": []}]})
    with pytest.raises(TargetError, match="no module matched"):
        _compress({"method": "merge.linear", "models": [path], "targets": ["LSTM"]})
    with pytest.raises(ConfigError, match="not found"):
        _compress({"method": "merge.linear", "models": [str(tmp_path / "missing")]})
    save_file({"x": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ConfigError, match="hold different tensors"):
        _compress({"method": "merge.linear", "models": [str(tmp_path / "wrong.safetensors")]})


def test_quantized_weights_are_refused(tmp_path: Path) -> None:
    path, _ = _other(tmp_path, 1)
    recipe = {
        "stages": [
            {"method": "quantize.rtn", "bits": 8, "targets": ["Linear"]},
            {"method": "merge.linear", "models": [path]},
        ]
    }
    with pytest.raises(ConfigError, match="before quantization"):
        st.compress(tiny_cnn(), recipe)
