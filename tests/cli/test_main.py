"""The CLI: exit codes, --json figures, errors without tracebacks."""

from __future__ import annotations

import json

import pytest

from slimtorch.cli.main import main

FACTORY = "slimtorch.testing.models:tiny_cnn"
KEYS = {
    "bytes_on_disk",
    "dense_bytes",
    "compression_ratio",
    "params",
    "nonzero_params",
    "latency_ms",
    "metric",
    "value",
}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_recipes_lists_presets(capsys) -> None:
    code, out, _ = _run(capsys, "recipes", "--json")
    assert code == 0
    assert {"int8", "int4", "dynamic-int8", "sparse90-int8", "nm24", "binary", "ternary"} <= set(
        json.loads(out)["presets"]
    )
    code, out, _ = _run(capsys, "recipes")
    assert code == 0 and "sparse90-int8" in out


def test_compress_eval_inspect(capsys, tmp_path) -> None:
    out_dir = str(tmp_path / "a")
    code, out, err = _run(
        capsys,
        "compress",
        "--model",
        FACTORY,
        "--recipe",
        "int8",
        "--out",
        out_dir,
        "--input-shape",
        "2,1,8,8",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert set(report) >= KEYS
    assert report["compression_ratio"] > 1.5  # tiny model: manifest overhead dominates
    assert report["latency_ms"] > 0 and report["baseline_latency_ms"] > 0
    assert report["baseline_params"] == report["params"]  # int8 keeps every parameter
    code, out, err = _run(capsys, "eval", out_dir, "--model", FACTORY, "--json")
    assert code == 0, err
    assert set(json.loads(out)) >= KEYS and json.loads(out)["baseline_params"] > 0
    code, out, err = _run(capsys, "inspect", out_dir)
    assert code == 0, err
    assert "fc1.weight" in out and "quant" in out


def test_deep_compression_preset_from_the_cli(capsys, tmp_path) -> None:
    out_dir = str(tmp_path / "dc")
    args = ["compress", "--model", FACTORY, "--recipe", "deep-compression", "--out", out_dir]
    code, out, err = _run(capsys, *args, "--input-shape", "2,1,8,8", "--json")
    assert code == 0, err
    assert json.loads(out)["compression_ratio"] > 1.0
    code, out, err = _run(capsys, "inspect", out_dir, "--json")
    assert code == 0, err
    layers = {r["name"]: r for r in json.loads(out)["layers"]}
    assert any(r["encoding"].startswith("coded:") and r["codebook_size"] for r in layers.values())
    code, out, err = _run(capsys, "inspect", out_dir)
    assert code == 0 and "coded:" in out


def test_existing_out_refused_with_exit_2(capsys, tmp_path) -> None:
    (tmp_path / "a").mkdir()
    code, _, err = _run(
        capsys, "compress", "--model", FACTORY, "--recipe", "int8", "--out", str(tmp_path / "a")
    )
    assert code == 2 and "--force" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("recipe_text", "needle"),
    [
        ("stages:\n  - method: prune.magnitud\n", "did you mean 'prune.magnitude'"),
        ("stages:\n  - method: quantize.rtn\n    bitz: 8\n", "'bitz'"),
        ("stages:\n  - method: quantize.rtn\n    bits: 9\n", "bits"),
        ("stages:\n  - method: prune.magnitude\n    sparsity: 1.0\n", "sparsity"),
        ("stages:\n  - method: quantize.rtn\n    targets: [LSTM]\n", "model has"),
    ],
)
def test_bad_recipes_exit_2(capsys, tmp_path, recipe_text: str, needle: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text)
    code, _, err = _run(
        capsys, "compress", "--model", FACTORY, "--recipe", str(path), "--out", str(tmp_path / "o")
    )
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_model_and_bad_artifact_exit_2(capsys, tmp_path) -> None:
    code, _, err = _run(
        capsys,
        "compress",
        "--model",
        "builtin:nope",
        "--recipe",
        "int8",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 2 and "known" in err.lower()
    code, _, err = _run(capsys, "eval", str(tmp_path / "missing"))
    assert code == 2
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    code, _, err = _run(capsys, "inspect", str(tmp_path / "junk"))
    assert code == 2 and "Traceback" not in err


def test_before_after_table_shows_the_original_parameters(capsys, tmp_path) -> None:
    """Structured pruning: the "original" column holds the model before, not after."""
    out_dir = str(tmp_path / "s")
    args = ["compress", "--model", FACTORY, "--recipe", "structured-50", "--out", out_dir]
    code, out, err = _run(capsys, *args, "--input-shape", "2,1,8,8")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("params "))
    before, after = (int(v.replace(",", "")) for v in row.split()[1:3])
    assert after < 0.8 * before


def test_artifact_of_a_factory_runs_no_code_unless_asked(capsys, tmp_path) -> None:
    out_dir = str(tmp_path / "a")
    args = ["compress", "--model", FACTORY, "--recipe", "int8", "--out", out_dir]
    code, _, err = _run(capsys, *args, "--input-shape", "2,1,8,8")
    assert code == 0, err
    code, _, err = _run(capsys, "eval", out_dir)
    assert code == 2 and "--trust-factory" in err and "Traceback" not in err
    code, out, err = _run(capsys, "eval", out_dir, "--trust-factory", "--json")
    assert code == 0, err
    assert json.loads(out)["baseline_params"] == json.loads(out)["params"]
