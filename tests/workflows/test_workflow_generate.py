"""`slimtorch generate` and the decoding speed `eval` reports, on a tiny random Llama saved as a
Hugging Face directory with its own tiny byte-level BPE tokenizer.json (the helpers of
test_workflow_llm), compressed to 4 bits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_workflow_llm import _save_llm
from tokenizers import Tokenizer

import slimtorch as st
from slimtorch.calibrate.text import load_text
from slimtorch.cli.main import main
from slimtorch.core.context import Context
from slimtorch.workflows.compress import CompressOptions, compress_to_dir
from slimtorch.workflows.evaluate import evaluate_dir
from slimtorch.workflows.generate import generate_dir

CTX = Context(progress=False)
RTN = "stages:\n  - method: quantize.rtn\n    bits: 4\n    group_size: 16\n"
PROMPT = "The history of the city"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    text = load_text("builtin:wikipedia").encode("ascii", "ignore").decode()
    (root / "wiki.txt").write_text(text, encoding="utf-8")
    model = _save_llm(root / "model", True, text)
    (root / "rtn.yaml").write_text(RTN)
    options = CompressOptions(data=str(root / "wiki.txt"), llm_windows=0)
    compress_to_dir(str(model), str(root / "rtn.yaml"), root / "out", options, CTX)
    return root / "out"


def _transformers_greedy(artifact: Path, new_tokens: int) -> str:
    model = st.load(artifact)
    tok = Tokenizer.from_file(str(artifact.parent / "model" / "tokenizer.json"))
    ids = torch.tensor([tok.encode(PROMPT).ids])
    with torch.inference_mode():
        out = model.generate(ids, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)
    return str(tok.decode(out[0, ids.shape[1] :].tolist()))


def test_generate_is_transformers_greedy_decode(artifact: Path) -> None:
    result = generate_dir(artifact, PROMPT, max_new_tokens=16)
    assert result["text"] == _transformers_greedy(artifact, 16)
    assert result["prompt"] == PROMPT and 0 < result["new_tokens"] <= 16
    assert result["tokens_per_s"] > 0 and result["seconds"] > 0
    assert result["tokenizer"].endswith("tokenizer.json")


def test_cli_generate_json_and_text(artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(artifact), "--prompt", PROMPT, "--max-new-tokens", "8",
                 "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["text"] == _transformers_greedy(artifact, 8)
    assert set(result) >= {"text", "prompt", "new_tokens", "seconds", "tokens_per_s"}
    assert main(["generate", str(artifact), "--prompt", PROMPT, "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(PROMPT + result["text"]) and "tokens/s" in out


def test_eval_reports_decoding_speed_of_a_causal_lm(artifact: Path) -> None:
    report = evaluate_dir(artifact, ctx=CTX, llm_suite=(0, 64))
    assert report["tokens_per_s"] > 0 and report["baseline_tokens_per_s"] > 0
    assert report["decode_kernel_layers"] > 0  # timed as served: 4-bit layers on the kernel
    dequantized = evaluate_dir(artifact, ctx=CTX, llm_suite=(0, 64), kernels=False)
    assert "decode_kernel_layers" not in dequantized and dequantized["tokens_per_s"] > 0
    skipped = evaluate_dir(artifact, ctx=CTX, llm_suite=(0, 64), decode=False)
    assert "tokens_per_s" not in skipped and "baseline_tokens_per_s" not in skipped
    alone = evaluate_dir(artifact, ctx=CTX, baseline=False, llm_suite=(0, 64))
    assert alone["tokens_per_s"] > 0 and "baseline_tokens_per_s" not in alone
