"""quantize.rotate and quantize.activations: the rotated model computes the same logits (tied
and untied heads, online Hadamards), saves and loads, composes with RTN / dynamic int8 /
per-token activations, helps 4-bit activations, and refuses models it does not fit."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.cli.main import main
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.core.info import model_info, update_info
from slimtorch.recipe.recipe import load_recipe
from slimtorch.runtime import ActQuantLinear, Int8DynamicLinear, OnlineHadamardLinear
from slimtorch.testing.models import tiny_llama, tiny_stack

CTX = Context(progress=False)


def _llama(tied: bool = False, outlier: float = 1.0, std: float = 0.2) -> Any:
    """A tiny Llama with random (non-unit) norm scales; ``outlier`` scales one channel of every
    norm (the activation outliers of real LLMs); ``tied`` shares embedding and head."""
    model: Any = tiny_llama(std=std, seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
                p[5] *= outlier
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
        arch = dict(model_info(model).architecture or {})
        arch["config"] = {**arch["config"], "tie_word_embeddings": True}
        update_info(model, architecture=arch)
    return model


X = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(7))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits  # type: ignore[no-any-return]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _compress(model: nn.Module, stages: list[dict[str, Any]]) -> Any:
    return st.compress(model, stages, ctx=CTX).model.eval()


@pytest.mark.parametrize(
    "options",
    [{}, {"rotation": "random", "heads": False, "seed": 3},
     {"online_hadamard": True, "online_o_proj": True}],
)  # fmt: skip
def test_rotated_model_has_the_same_logits_and_round_trips(
    options: dict[str, Any], tmp_path: Path
) -> None:
    model = _llama()
    before = _logits(model)
    out = _compress(model, [{"method": "quantize.rotate", **options}])
    after = _logits(out)
    assert _rel(after, before) < 1e-5
    norms = [p for n, p in out.named_parameters() if "norm" in n]
    assert all(bool((p == 1).all()) for p in norms)  # every scale folded into the Linears
    online = [m for m in out.modules() if isinstance(m, OnlineHadamardLinear)]
    assert len(online) == 4 * options.get("online_hadamard", 0)  # 2 blocks x down + o_proj
    st.save(out, tmp_path / "a")
    loaded = st.load(tmp_path / "a")
    assert torch.equal(_logits(loaded), after)


def test_tied_embedding_is_untied_and_rebuilt_untied(tmp_path: Path) -> None:
    model = _llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = _logits(model)
    out = _compress(model, [{"method": "quantize.rotate", "online_hadamard": True}])
    assert out.lm_head.weight is not out.model.embed_tokens.weight
    assert out.config.tie_word_embeddings is False
    assert model_info(out).architecture["config"]["tie_word_embeddings"] is False  # type: ignore[index]
    assert _rel(_logits(out), before) < 1e-5
    st.save(out, tmp_path / "t")
    loaded: Any = st.load(tmp_path / "t")  # rebuilt from the recorded (untied) config
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert _rel(_logits(loaded), before) < 1e-5


def test_4bit_activations_lose_less_with_rotation() -> None:
    model = _llama(outlier=10.0, std=0.05)  # one channel 10x: an activation outlier
    before = _logits(model)
    quant = [
        {"method": "quantize.rtn", "bits": 8, "granularity": "per_channel", "observer": "mse",
         "targets": ["Linear"], "ignore": ["lm_head"]},
        {"method": "quantize.activations", "bits": 4, "targets": ["Linear"],
         "ignore": ["lm_head"]},
    ]  # fmt: skip
    plain = _compress(copy.deepcopy(model), quant)
    rotated = _compress(model, [{"method": "quantize.rotate", "online_hadamard": True}, *quant])
    wrapped = [n for n, m in rotated.named_modules() if isinstance(m, ActQuantLinear)]
    assert len(wrapped) == 14 and "model.layers.0.mlp.down_proj.linear" in wrapped
    err = lambda m: float((_logits(m) - before).norm() / before.norm())  # noqa: E731
    assert err(rotated) < 0.75 * err(plain), (err(rotated), err(plain))  # measured 0.33, 0.53


def test_rotation_then_dynamic_int8_saves_and_loads(tmp_path: Path) -> None:
    model = _llama(std=0.05)
    before = _logits(model)
    out = _compress(model, [
        {"method": "quantize.rotate", "online_hadamard": True},
        {"method": "quantize.dynamic_int8", "targets": ["Linear"], "ignore": ["lm_head"],
         "embeddings": False},
    ])  # fmt: skip
    inner = out.get_submodule("model.layers.1.mlp.down_proj.linear")
    assert isinstance(inner, Int8DynamicLinear)
    after = _logits(out)
    assert _rel(after, before) < 0.05
    st.save(out, tmp_path / "w8a8")
    assert torch.allclose(_logits(st.load(tmp_path / "w8a8")), after, atol=1e-5)


def test_refusals() -> None:
    with pytest.raises(UnsupportedModelError, match="Llama-family"):
        _compress(tiny_stack(), [{"method": "quantize.rotate"}])
    with pytest.raises(UnsupportedModelError, match="first in the recipe"):
        _compress(_llama(), [{"method": "quantize.rtn", "bits": 4},
                             {"method": "quantize.rotate"}])  # fmt: skip
    with pytest.raises(ConfigError, match="no targets"):
        _compress(_llama(), [{"method": "quantize.rotate", "targets": ["Linear"]}])

    class GemmaNorm(nn.Module):  # (1 + w) * x / rms(x): no scale that folds into a Linear
        def __init__(self, width: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(width))
            self.eps = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    model = _llama()
    model.model.layers[1].post_attention_layernorm = GemmaNorm(64)
    with pytest.raises(UnsupportedModelError, match="x / rms"):
        _compress(model, [{"method": "quantize.rotate"}])
    with pytest.raises(Exception, match="bits"):
        _compress(_llama(), [{"method": "quantize.activations", "bits": 1}])


def test_presets_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _llama(std=0.05).save_pretrained(tmp_path / "hf")
    recipe = tmp_path / "rot.yaml"
    recipe.write_text(
        "stages:\n  - method: quantize.rotate\n    online_hadamard: true\n"
        "  - method: quantize.rtn\n    bits: 4\n    granularity: per_group\n    group_size: 32\n"
        "    targets: [Linear]\n    ignore: [lm_head]\n"
        "  - method: quantize.activations\n    bits: 8\n    targets: [Linear]\n"
        "    ignore: [lm_head]\n"
    )
    out = tmp_path / "m"
    code = main(["compress", "--model", str(tmp_path / "hf"), "--recipe", str(recipe),
                 "--out", str(out), "--llm-windows", "0", "--json"])  # fmt: skip
    assert code == 0 and (out / "manifest.json").exists()
    report = json.loads(capsys.readouterr().out)
    assert report["stages"][0]["method"] == "quantize.rotate"
    manifest = (out / "manifest.json").read_text()
    assert "OnlineHadamardLinear" in manifest and "ActQuantLinear" in manifest
    assert main(["compress", "--model", "builtin:lenet5-fashion", "--recipe", str(recipe),
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert not (tmp_path / "x").exists()
    for name in ("w4a16-quarot-gptq", "w4a8-quarot-gptq", "w4a4-quarot-gptq"):
        stages = load_recipe(name).stages
        assert stages[0].spec.name == "quantize.rotate" and len(stages) in (3, 4)


def test_w4a4_preset_with_gptq_round_trips(tmp_path: Path) -> None:
    from slimtorch.testing.tasks import tensor_task

    model = _llama(std=0.05)
    x = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(0))
    recipe = load_recipe("w4a4-quarot-gptq").to_dict()
    recipe["stages"][1]["calibration"] = {"samples": 16, "batch_size": 8}
    task = tensor_task(x, loss="next_token")
    out = st.compress(model, recipe, data=task, ctx=CTX).model.eval()
    inner = out.get_submodule("model.layers.0.mlp.down_proj.linear")
    assert isinstance(inner, ActQuantLinear)  # the rotated input, quantized per token
    st.save(out, tmp_path / "w4a4")
    assert torch.allclose(_logits(st.load(tmp_path / "w4a4")), _logits(out), atol=1e-5)
