"""`slimtorch generate --kv-bits` and `evaluate_dir(kv=...)`: the quantized KV cache on a 4-bit
artifact of a tiny random Llama with its own tokenizer (test_workflow_llm's helpers): the same
greedy text as the float cache at 8 bits, bytes per token reported, bad options exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_workflow_llm import _save_llm

from slimtorch.calibrate.text import load_text
from slimtorch.cli.main import main
from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.workflows.compress import CompressOptions, compress_to_dir
from slimtorch.workflows.evaluate import evaluate_dir
from slimtorch.workflows.generate import generate_dir

CTX = Context(progress=False)
RTN = "stages:\n  - method: quantize.rtn\n    bits: 4\n    group_size: 16\n"
PROMPT = "The history of the city"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("genkv")
    text = load_text("builtin:wikipedia").encode("ascii", "ignore").decode()
    (root / "wiki.txt").write_text(text, encoding="utf-8")
    model = _save_llm(root / "model", True, text)  # 2 layers, 2 KV heads of 8 channels
    (root / "rtn.yaml").write_text(RTN)
    options = CompressOptions(data=str(root / "wiki.txt"), llm_windows=0)
    compress_to_dir(str(model), str(root / "rtn.yaml"), root / "out", options, CTX)
    return root / "out"


def test_generate_with_the_8_bit_cache_matches_the_float_cache(artifact: Path) -> None:
    fp = generate_dir(artifact, PROMPT, max_new_tokens=24)
    kv = generate_dir(artifact, PROMPT, max_new_tokens=24, kv=(8, 4, 4))
    assert kv["text"] == fp["text"] and "kv_cache" not in fp
    info = kv["kv_cache"]
    assert (info["bits"], info["group"], info["window"]) == (8, 4, 4)
    # float32 cache: 2 layers x 2 heads x 2 (K, V) x 8 channels x 4 bytes
    assert info["fp_bytes_per_token"] == 256
    assert info["tokens"] > 8 and info["bytes_per_token"] < 256 and info["ratio"] > 1


def test_cli_generate_kv_json_and_text(artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", str(artifact), "--prompt", PROMPT, "--max-new-tokens", "8"]
    assert main([*args, "--kv-bits", "4", "--kv-group", "8", "--kv-window", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kv_cache"]["bits"] == 4 and result["kv_cache"]["window"] == 0
    assert main([*args, "--kv-bits", "8", "--kv-group", "8"]) == 0
    assert "KV cache 8-bit (group 8, window 128)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--kv-bits", "3"], "--kv-bits must be one of [2, 4, 8]"),
        (["--kv-bits", "4", "--kv-group", "6"], "--kv-group must be a power of two"),
        (["--kv-bits", "4", "--kv-window", "-1"], "--kv-window must be >= 0"),
        (["--kv-group", "8"], "need --kv-bits"),
        (["--kv-bits", "8"], "must divide the head dimension 8"),  # default group 32
    ],
)
def test_cli_generate_bad_kv_options_exit_2(
    artifact: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    assert main(["generate", str(artifact), "--prompt", PROMPT, *options]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_evaluate_reports_the_quantized_cache(artifact: Path) -> None:
    report = evaluate_dir(
        artifact, ctx=CTX, baseline=False, decode=False, llm_suite=(1, 64), kv=(4, 4, 8)
    )
    kv = report["kv_cache"]
    assert (kv["prefill"], kv["chunk"], kv["window_tokens"]) == (16, 32, 64)
    assert kv["positions"] == 2 * (63 - 16)  # one window per text, positions 16..62
    assert 0 < kv["kld_mean"] < 1 and 0 < kv["top1_agreement"] <= 1
    assert kv["bytes_per_token"] < kv["fp_bytes_per_token"] == 256
    with pytest.raises(UserInputError, match="--llm-windows >= 1"):
        evaluate_dir(artifact, ctx=CTX, baseline=False, llm_suite=(0, 64), kv=(4, 4, 8))
