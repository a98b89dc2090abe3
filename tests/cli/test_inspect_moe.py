"""`slimtorch inspect` of a compressed mixture-of-experts model lists every expert's matrices as
compressed (issue 17: "every expert compressed (inspect)"), from the CLI end to end: a
transformers checkpoint (experts stored fused, 3-D) -> `slimtorch compress` -> `inspect --json`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimtorch.cli.main import main
from slimtorch.testing.models import tiny_moe

EXPERTS, LAYERS = 4, 2
GPTQ = {"method": "quantize.gptq", "bits": 4, "group_size": 16,
        "calibration": {"samples": 4, "batch_size": 2}}  # fmt: skip
RTN = {"method": "quantize.rtn", "bits": 4, "granularity": "per_group", "group_size": 16}


@pytest.mark.parametrize(("kind", "stage"), [("mixtral", GPTQ), ("qwen3_moe", RTN)])
def test_inspect_lists_every_expert_compressed(
    kind: str, stage: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_moe(kind, layers=LAYERS, experts=EXPERTS, vocab=2048).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "r.yaml").write_text(json.dumps({"stages": [stage]}))  # JSON is YAML
    argv = ["compress", "--model", str(tmp_path / "ckpt"), "--recipe", str(tmp_path / "r.yaml"),
            "--out", str(tmp_path / "art"), "--quiet", "--llm-windows", "0"]  # fmt: skip
    if stage is GPTQ:
        argv += ["--data", "builtin:austen", "--tokenizer", "builtin:austen-lm"]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "art"), "--json"]) == 0
    layers = {row["name"]: row for row in json.loads(capsys.readouterr().out)["layers"]}
    experts = [
        f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight"
        for i in range(LAYERS)
        for e in range(EXPERTS)
        for p in ("gate", "up", "down")
    ]
    missing = [n for n in experts if n not in layers]
    assert not missing, missing
    assert all(layers[n]["quant_bits"] == 4 and layers[n]["encoding"] == "quant" for n in experts)
    routers = [n for n in layers if n.endswith("mlp.gate.weight")]
    assert len(routers) == LAYERS and all(layers[n]["encoding"] == "dense" for n in routers)
