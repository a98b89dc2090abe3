"""The compress, evaluate and inspect workflows, on the real builtin LeNet-5 and Fashion-MNIST."""

from __future__ import annotations

from slimtorch.core.context import Context
from slimtorch.workflows.compress import compress_to_dir
from slimtorch.workflows.evaluate import evaluate_dir
from slimtorch.workflows.inspect import inspect_dir

CTX = Context(progress=False)
KEYS = {
    "bytes_on_disk",
    "dense_bytes",
    "compression_ratio",
    "params",
    "nonzero_params",
    "latency_ms",
    "metric",
    "value",
    "baseline_value",
    "baseline_latency_ms",
}


def test_int8_lenet5_keeps_accuracy_and_shrinks(tmp_path) -> None:
    report = compress_to_dir("builtin:lenet5-fashion", "int8", tmp_path / "a", ctx=CTX)
    assert set(report) >= KEYS
    assert report["metric"] == "accuracy"
    assert abs(report["value"] - report["baseline_value"]) <= 0.3
    assert report["compression_ratio"] > 3.5
    again = evaluate_dir(tmp_path / "a", ctx=CTX)
    assert again["value"] == report["value"]
    assert again["baseline_value"] == report["baseline_value"]
    rows = inspect_dir(tmp_path / "a")["layers"]
    assert {r["name"] for r in rows} >= {"conv1.weight", "fc1.weight"}
    assert all(r["encoding"] in {"quant", "dense"} for r in rows)


def test_local_hugging_face_directory(tmp_path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    import slimtorch as st

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    BertModel(config).save_pretrained(tmp_path / "hf")
    report = compress_to_dir(str(tmp_path / "hf"), "int4", tmp_path / "a", ctx=CTX)
    assert report["compression_ratio"] > 3 and report["latency_ms"] > 0
    assert report["metric"] is None  # no evaluator is known for an arbitrary directory
    from slimtorch.models import load_model

    loaded = load_model(str(tmp_path / "hf"))
    compressed = st.compress(loaded.model, "int4").model  # same deterministic recipe
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    reloaded = st.load(tmp_path / "a")
    assert type(reloaded).__name__ == "BertModel"
    with torch.no_grad():
        assert torch.equal(reloaded(ids).last_hidden_state, compressed(ids).last_hidden_state)


def test_a_recorded_source_naming_code_is_not_run(tmp_path, monkeypatch) -> None:
    """A manifest whose ``source`` names Python code: the baseline is refused, nothing runs."""
    import json

    import pytest

    from slimtorch.core.errors import UserInputError
    from slimtorch.workflows import evaluate

    report = compress_to_dir("builtin:lenet300-fashion", "int8", tmp_path / "a", ctx=CTX)
    assert report["baseline_value"] is not None
    manifest = tmp_path / "a" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["metadata"]["source"] = "os:abort"
    manifest.write_text(json.dumps(data))
    monkeypatch.setattr(evaluate, "load_model", lambda spec: pytest.fail(f"loaded {spec}"))
    with pytest.raises(UserInputError, match="--trust-factory"):
        evaluate_dir(tmp_path / "a", ctx=CTX)
    assert evaluate.names_code("os:abort") and not evaluate.names_code("builtin:lenet5-fashion")
