"""Per-layer sensitivity scan: fragile layers show larger drops, exact restore, JSON, CLI."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.cli.commands import sensitivity as cmd_sensitivity
from slimtorch.core.errors import ArtifactError, ConfigError, TargetError, UserInputError
from slimtorch.formats.state import iter_states
from slimtorch.recipe import parse_recipe
from slimtorch.search.sensitivity import (
    check_choice,
    scan,
    scan_layers,
    single_choice_stages,
    task_evaluator,
)
from slimtorch.search.sensitivity_table import (
    LayerSensitivity,
    Point,
    Sensitivity,
    most_sensitive,
    to_markdown,
)
from slimtorch.testing.models import example_input, tiny_cnn, tiny_lstm, tiny_transformer


def _mlp() -> nn.Module:
    """``robust`` holds only 0 and +-1 (80% zeros): on every grid, and pruning up to 80%
    removes only zeros. ``fragile`` is dense Gaussian: every choice perturbs it."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential()
    model.add_module("robust", nn.Linear(16, 32))
    model.add_module("act", nn.ReLU())
    model.add_module("fragile", nn.Linear(32, 8))
    with torch.no_grad():
        signs = torch.randint(0, 2, (32, 16), generator=gen).float() * 2 - 1
        keep = torch.rand(32, 16, generator=gen) < 0.2
        model.robust.weight.copy_(signs * keep)
        model.fragile.weight.copy_(torch.randn(8, 32, generator=gen))
    return model.eval()


def _mse_evaluator(model: nn.Module) -> tuple:
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).clone()

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return float(((m(x) - ref) ** 2).mean())

    return evaluate


def test_fragile_layer_drops_more_and_robust_layer_not_at_all() -> None:
    model = _mlp()
    sens = scan(
        model,
        _mse_evaluator(model),
        higher_is_better=False,
        prune=(0.5, 0.9),
        bits=(8, 4, 2),
        codebook=(4, 2),
        progress=False,
        metric="mse",
    )
    assert [e.name for e in sens.layers] == ["robust", "fragile"]
    assert sens.baseline == 0.0
    robust = sens.layer("robust")
    assert (robust.params, robust.dense_bytes, robust.type) == (512, 2048, "Linear")
    for kind, value in [("prune", 0.5), ("bits", 8), ("bits", 4), ("bits", 2), ("codebook", 2)]:
        robust_drop, fragile_drop = (
            sens.drop("robust", kind, value),
            sens.drop("fragile", kind, value),
        )
        # 0 and +-1 lie on every grid (up to the float rounding of the scale)
        assert 0 <= robust_drop < 1e-5 and fragile_drop > 100 * max(robust_drop, 1e-6), kind
    # the robust layer has 20% nonzeros: 90% sparsity must remove some of them
    assert sens.drop("robust", "prune", 0.9) > 0
    # fragile: more aggressive = worse
    assert sens.drop("fragile", "bits", 2) > sens.drop("fragile", "bits", 4)
    assert sens.drop("fragile", "bits", 4) > sens.drop("fragile", "bits", 8)
    assert sens.drop("fragile", "prune", 0.9) > sens.drop("fragile", "prune", 0.5)
    assert most_sensitive(sens, 1)[0]["layer"] == "fragile"


def _outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(example_input(model))
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("build", [tiny_cnn, tiny_lstm, tiny_transformer])
def test_scan_restores_the_model_bit_exactly(build) -> None:
    model = build().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out_before = _outputs(model)
    calls = []

    def evaluate(m: nn.Module) -> float:
        calls.append(1)
        return float(_outputs(m).abs().mean())

    sens = scan(
        model,
        evaluate,
        higher_is_better=True,
        prune=(0.5,),
        bits=(3,),
        codebook=(2,),
        progress=False,
    )
    assert len(calls) == 1 + 3 * len(sens.layers)
    assert torch.equal(_outputs(model), out_before)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert iter_states(model) == []
    # every trial changed the model (a choice that did nothing would be a bug)
    assert all(p.quality != sens.baseline for e in sens.layers for p in e.bits)


def test_layer_discovery() -> None:
    assert scan_layers(tiny_cnn()) == ["conv", "conv1d", "fc1", "fc2"]
    assert scan_layers(tiny_lstm()) == ["lstm", "gru", "head"]  # embeddings only on request
    # MultiheadAttention covers its out_proj
    assert scan_layers(tiny_transformer()) == ["attn", "ff.0", "ff.2", "head"]
    assert scan_layers(tiny_lstm(), ["emb", "head"]) == ["emb", "head"]


def test_existing_states_are_kept_and_impossible_choices_skipped() -> None:
    model = tiny_cnn().eval()
    recipe = {
        "stages": [
            {"method": "prune.magnitude", "sparsity": 0.5, "targets": ["fc1"]},
            {"method": "quantize.rtn", "bits": 8, "targets": ["fc2"]},
        ]
    }
    model = st.compress(model, recipe).model
    states = {(n, p): s for n, _, p, s in iter_states(model)}
    out = _outputs(model)
    with pytest.warns(UserWarning, match="fc2 prune=0.5 skipped"):
        sens = scan(
            model,
            lambda m: float(_outputs(m).sum()),
            higher_is_better=True,
            layers=["fc1", "fc2"],
            prune=(0.5,),
            bits=(4,),
            codebook=(),
            progress=False,
        )
    assert sens.layer("fc2").prune == [] and len(sens.layer("fc2").bits) == 1
    after = {(n, p): s for n, _, p, s in iter_states(model)}
    assert after.keys() == states.keys() and all(after[k] is states[k] for k in states)
    assert torch.equal(_outputs(model), out)


def test_single_choice_stages_are_valid_recipes() -> None:
    prune = single_choice_stages("fc1", "prune", 0.5)
    assert prune == [
        {"method": "prune.magnitude", "sparsity": 0.5, "scope": "layer", "targets": ["fc1"]}
    ]
    bits8 = single_choice_stages("fc1", "bits", 8)[0]
    assert (bits8["bits"], bits8["granularity"], bits8["symmetric"]) == (8, "per_channel", True)
    bits4 = single_choice_stages("fc1", "bits", 4.0)[0]
    assert (bits4["bits"], bits4["granularity"], bits4["group_size"]) == (4, "per_group", 128)
    book = single_choice_stages("a.b", "codebook", 3)
    assert book == [{"method": "share.kmeans", "bits": 3, "targets": ["a.b"]}]
    for stages in (prune, [bits8], [bits4], book):
        parse_recipe({"stages": stages})  # every stage validates


@pytest.mark.parametrize(
    ("kind", "value", "match"),
    [
        ("bits", 9, r"2\.\.8"),
        ("bits", 1, r"2\.\.8"),
        ("codebook", 4.5, "whole number"),
        ("prune", 1.0, r"\(0, 1\)"),
        ("prune", 0, r"\(0, 1\)"),
        ("prun", 0.5, "did you mean 'prune'"),
        ("bits", "x", "not a number"),
    ],
)
def test_bad_choices(kind, value, match) -> None:
    with pytest.raises(ConfigError, match=match):
        check_choice(kind, value)


def test_bad_scan_inputs_fail_before_any_evaluation() -> None:
    model = tiny_cnn()

    def never(m: nn.Module) -> float:
        raise AssertionError("evaluated")

    with pytest.raises(TargetError, match="did you mean 'fc1'"):
        scan(model, never, higher_is_better=True, layers=["fc11"])
    with pytest.raises(ConfigError, match=r"2\.\.8"):
        scan(model, never, higher_is_better=True, bits=(16,))
    with pytest.raises(ConfigError, match="nothing to scan"):
        scan(model, never, higher_is_better=True, prune=(), bits=(), codebook=())


def _table() -> Sensitivity:
    layer = LayerSensitivity(
        "enc.fc",
        "Linear",
        100,
        400,
        prune=[Point(0.5, 90.0, 1.0), Point(0.9, 80.0, 11.0)],
        bits=[Point(8, 91.0, 0.0), Point(4, 89.0, 2.0)],
    )
    return Sensitivity("accuracy", True, 91.0, [layer], model="builtin:x")


def test_drop_interpolates_between_measured_values() -> None:
    sens = _table()
    assert sens.drop("enc.fc", "prune", 0) == 0.0
    assert sens.drop("enc.fc", "prune", 0.25) == pytest.approx(0.5)
    assert sens.drop("enc.fc", "prune", 0.7) == pytest.approx(6.0)
    assert sens.drop("enc.fc", "bits", 32) == 0.0
    assert sens.drop("enc.fc", "bits", 6) == pytest.approx(1.0)
    assert sens.drop("enc.fc", "bits", 20) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="beyond the measured"):
        sens.drop("enc.fc", "prune", 0.95)
    with pytest.raises(ConfigError, match="beyond the measured"):
        sens.drop("enc.fc", "bits", 2)
    with pytest.raises(ConfigError, match="no codebook values"):
        sens.drop("enc.fc", "codebook", 4)
    with pytest.raises(TargetError, match=r"did you mean 'enc\.fc'"):
        sens.drop("enc.fcc", "bits", 8)


def test_json_round_trip_and_markdown(tmp_path: Path) -> None:
    sens = _table()
    path = sens.save(tmp_path / "s.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]  # no temporary left
    raw = json.loads(path.read_text())
    assert raw["kind"] == "slimtorch.sensitivity" and raw["version"] == 1
    assert set(raw) == {
        "kind",
        "version",
        "model",
        "metric",
        "higher_is_better",
        "baseline",
        "layers",
    }
    assert set(raw["layers"][0]) == {
        "name", "type", "params", "dense_bytes", "prune", "bits", "codebook"
    }  # fmt: skip
    back = Sensitivity.load(path)
    assert back == sens and back.to_dict() == sens.to_dict()
    md = to_markdown(sens)
    assert "| enc.fc | Linear | 100 | +1 | +11 | +0 | +2 |" in md
    assert "| layer | type | params | prune 0.5 | prune 0.9 | bits 8 | bits 4 |" in md


def test_load_refuses_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "other"}))
    with pytest.raises(ArtifactError, match="not a sensitivity table"):
        Sensitivity.load(bad)
    bad.write_text(json.dumps({**_table().to_dict(), "version": 2}))
    with pytest.raises(ArtifactError, match="version 2"):
        Sensitivity.load(bad)
    bad.write_text(json.dumps({**_table().to_dict(), "layers": [{"name": "x"}]}))
    with pytest.raises(ArtifactError, match="malformed"):
        Sensitivity.load(bad)
    with pytest.raises(ArtifactError, match="does not exist"):
        Sensitivity.load(tmp_path / "missing.json")


def _cli_args(out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cmd_sensitivity.add_parser(parser.add_subparsers())
    base = ["sensitivity", "--model", "builtin:lenet5-fashion", "--out", str(out), "--quiet"]
    return parser.parse_args([*base, *extra])


def test_cli_on_lenet(tmp_path: Path) -> None:
    out = tmp_path / "sens"
    args = _cli_args(out, "--samples", "200", "--prune", "0.9", "--bits", "2", "--codebook", "")
    start = time.perf_counter()
    result = cmd_sensitivity.run(args)
    assert time.perf_counter() - start < 30
    assert result["metric"] == "accuracy" and result["trials"] == 2 * result["layers"] == 8
    sens = Sensitivity.load(out / "sensitivity.json")
    assert [e.name for e in sens.layers] == ["conv1", "conv2", "fc1", "fc2"]
    assert all(e.codebook == [] for e in sens.layers)
    assert (out / "sensitivity.md").read_text().startswith("Sensitivity of builtin:lenet5-fashion")
    assert "most sensitive" in cmd_sensitivity.render(result)
    with pytest.raises(UserInputError, match="--force"):
        cmd_sensitivity.run(args)
    with pytest.raises(UserInputError, match="comma-separated"):
        cmd_sensitivity.run(_cli_args(out, "--force", "--prune", "half"))
    with pytest.raises(ConfigError, match=r"2\.\.8"):
        cmd_sensitivity.run(_cli_args(out, "--force", "--bits", "12"))


def test_task_evaluator_subsamples_lenet_accuracy() -> None:
    loaded = st.models.load_model("builtin:lenet5-fashion")
    evaluate, metric, higher = task_evaluator(loaded, None, 50)
    assert (metric, higher) == ("accuracy", True)
    value = evaluate(loaded.model)
    assert 0 <= value <= 100 and (value * 50 / 100) == pytest.approx(round(value * 50 / 100))
    with pytest.raises(UserInputError, match="at least 1"):
        task_evaluator(loaded, None, 0)


@pytest.mark.slow  # imports transformers and loads MiniLM: ~5-25 s on a shared machine
def test_task_evaluator_lee_on_a_few_documents() -> None:
    loaded = st.models.load_model("builtin:minilm")
    # --data is MiniLM's training data (sentences), not what it is measured on: ignored
    evaluate, metric, higher = task_evaluator(loaded, "builtin:sentences", 4)
    assert (metric, higher) == ("lee_pearson", True)
    value = evaluate(loaded.model)
    assert -1.0 <= value <= 1.0 and value == evaluate(loaded.model)
    with pytest.raises(UserInputError, match="at least 3 documents"):
        task_evaluator(loaded, None, 2)


def test_task_evaluator_other_evaluators_and_bad_input(monkeypatch) -> None:
    from slimtorch.eval.quality import EVALUATORS, Quality
    from slimtorch.models.registry import LoadedModel

    model = tiny_cnn()
    seen = []

    def toy(m: nn.Module, ctx, data) -> Quality:
        seen.append(data)
        return Quality("toy_error", float(_outputs(m).abs().sum()), higher_is_better=False)

    monkeypatch.setitem(EVALUATORS._items, "toy", toy)
    loaded = LoadedModel(model, "x:y", {"kind": "factory"}, evaluator="toy", data="d")
    evaluate, metric, higher = task_evaluator(loaded)
    assert (metric, higher) == ("toy_error", False) and evaluate(model) > 0 and seen == ["d", "d"]
    with pytest.raises(UserInputError, match="split must be"):
        task_evaluator(loaded, split="test")  # type: ignore[arg-type]
    with pytest.raises(UserInputError, match="your own evaluate"):
        task_evaluator(LoadedModel(model, "x:y", {"kind": "factory"}))
