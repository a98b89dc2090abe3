"""quantize.fp8 / quantize.mxfp4 / quantize.nvfp4 from Python, a YAML recipe and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import slimtorch as st
from slimtorch.cli.main import main
from slimtorch.core.context import Context
from slimtorch.core.errors import TargetError
from slimtorch.formats.state import get_state
from slimtorch.runtime import Fp8Linear
from slimtorch.runtime.fp8 import fake_quantize_rows_fp8
from slimtorch.testing.models import example_input, tiny_cnn, tiny_llama
from slimtorch.workflows.inspect import inspect_dir

QUIET = Context(progress=False)
BITS = {"mxfp4": 4.25, "nvfp4": 4.5, "fp8": 8 + 32 / 256}  # fp8: a float32 scale per row


def _linear_bits(layers: list[dict], name: str) -> float:
    return next(r["bits"] for r in layers if r["name"] == name)


@pytest.mark.parametrize("preset", ["mxfp4", "nvfp4", "fp8"])
def test_preset_saves_compactly_and_reloads_exactly(preset: str, tmp_path: Path) -> None:
    model = tiny_llama(hidden=128, intermediate=256, std=0.05)
    x = example_input(model)
    out = st.compress(model, preset, ctx=QUIET).model
    proj = out.model.layers[0].mlp.down_proj
    q = get_state(proj, "weight").quant  # type: ignore[union-attr]
    assert q is not None and q.scheme == "float"
    st.save(out, tmp_path / "a")
    loaded = st.load(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(out(x).logits, loaded(x).logits)
    info = inspect_dir(tmp_path / "a")
    bits = _linear_bits(info["layers"], "model.layers.0.mlp.down_proj.weight")
    assert bits == pytest.approx(BITS[preset], abs=0.07)  # [128, 256]: scales included
    lq = get_state(loaded.model.layers[0].mlp.down_proj, "weight").quant  # type: ignore[union-attr]
    assert lq is not None and lq.element == q.element and lq.scale_format == q.scale_format


def test_fp8_dynamic_swaps_linears_and_simulates_w8a8(tmp_path: Path) -> None:
    model = tiny_llama()
    x = example_input(model)
    recipe = {"stages": [{"method": "quantize.fp8", "activations": "dynamic",
                          "ignore": ["lm_head"]}]}  # fmt: skip
    out = st.compress(model, recipe, ctx=QUIET).model
    proj = out.model.layers[0].self_attn.q_proj
    assert isinstance(proj, Fp8Linear) and proj.activations == "dynamic"
    assert isinstance(out.lm_head, nn.Linear)
    h = torch.randn(3, proj.in_features)
    with torch.no_grad():
        expected = nn.functional.linear(fake_quantize_rows_fp8(h), proj.dequantized_weight())
        assert torch.allclose(proj(h), expected, atol=1e-6, rtol=0)
    st.save(out, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(st.load(tmp_path / "a")(x).logits, out(x).logits)


def test_recipe_yaml_and_bad_inputs(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"method": "quantize.nvfp4", "ignore": ["fc2"]}]}))
    model = tiny_cnn()
    out = st.compress(model, str(path), ctx=QUIET).model
    states = [n for n, m in out.named_modules() if get_state(m, "weight") is not None]
    assert states and all("fc2" not in n for n in states)
    with pytest.raises(TargetError, match="Linear layers only"):
        st.compress(tiny_cnn(), {"stages": [{"method": "quantize.fp8", "activations": "dynamic",
                                             "targets": ["Conv2d"]}]})  # fmt: skip
    with pytest.raises(Exception, match="activations"):
        st.compress(tiny_cnn(), {"stages": [{"method": "quantize.fp8", "activations": "static"}]})


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    code = main(["compress", "--model", "builtin:lenet5-fashion", "--recipe", "mxfp4",
                 "--out", str(out)])  # fmt: skip
    assert code == 0 and (out / "manifest.json").exists()
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert any(r.get("quant_bits") == 4 and r["bits"] < 4.6 for r in rows)
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - method: quantize.mxfp4\n    block: 7\n")
    assert main(["compress", "--model", "builtin:lenet5-fashion", "--recipe", str(bad),
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert not (tmp_path / "x").exists()
