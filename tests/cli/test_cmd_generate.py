"""`slimtorch generate` on bad input exits 2 with a message; `eval` of a model that is not a
causal LM has no decoding-speed keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import slimtorch as st
from slimtorch.cli.main import main
from slimtorch.core.context import Context
from slimtorch.models.registry import load_model

RTN = {"stages": [{"method": "quantize.rtn", "bits": 4, "group_size": 16}]}


def _llama_artifact(where: Path) -> Path:
    """A 4-bit artifact of a tiny random Llama saved as a HF directory without a tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(where / "hf")
    loaded = load_model(str(where / "hf"))
    assert loaded.tokenizer is None
    model = st.compress(loaded.model, RTN, ctx=Context(progress=False)).model
    st.save(model, where / "out", metadata={"architecture": loaded.architecture})
    return where / "out"


def test_generate_without_a_tokenizer_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifact = _llama_artifact(tmp_path / "llama")
    assert main(["generate", str(artifact), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "without a tokenizer" in err and "--tokenizer" in err and "Traceback" not in err
    assert main(["generate", str(artifact), "--prompt", "hi", "--tokenizer", "nope.json"]) == 2
    assert "no tokenizer at 'nope.json'" in capsys.readouterr().err
    assert main(["generate", str(artifact), "--prompt", "hi", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "hi"]) == 2


def test_generate_and_eval_of_a_model_that_is_not_a_causal_lm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "lenet")
    lenet = load_model("builtin:lenet5-fashion").model
    st.save(st.compress(lenet, "w4a16-rtn", ctx=Context(progress=False)).model, out)
    assert main(["generate", out, "--prompt", "hi", "--model", "builtin:lenet5-fashion"]) == 2
    assert "not a causal LM" in capsys.readouterr().err
    assert (
        main(
            ["eval", out, "--json", "--quiet", "--no-baseline", "--model", "builtin:lenet5-fashion"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["params"] > 0
    assert not {"tokens_per_s", "baseline_tokens_per_s", "decode_skipped"} & set(report)
