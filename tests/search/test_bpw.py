"""``slimtorch auto --max-bpw``: per-tensor GGUF types under a bits-per-weight budget. The
allocation meets the budget, the plan is what gguf's reader sees in the written file, the scan's
predicted KL divergence tracks the measured one, a rerun reuses the scan, bad budgets exit 2."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from slimtorch.calibrate.text import TOKEN_WINDOWS  # noqa: E402
from slimtorch.cli.main import main  # noqa: E402
from slimtorch.core.errors import UserInputError  # noqa: E402
from slimtorch.export.gguf_mix import encode_typed  # noqa: E402
from slimtorch.search import bpw_scan  # noqa: E402
from slimtorch.search.bpw import (  # noqa: E402
    budget_bytes,
    check_max_bpw,
    parse_types,
    plan,
    summary,
    tensor_bytes,
    type_options,
)
from slimtorch.workflows.auto_bpw import BpwJob, auto_bpw  # noqa: E402

TEXT = "a small brown fox ran past the old mill, then home again; 987 times it went. " * 30


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer tied Llama with rows of 256 and 512 (k-quants fit) and its own tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("bpw-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=400, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=128, initializer_range=0.08,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path / "model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(path / "model" / "tokenizer.json"))
    (path / "model" / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    (path / "text.txt").write_text(TEXT)
    return path


def job(llama: Path, out: Path, **kw: Any) -> BpwJob:
    settings: dict[str, Any] = dict(data=str(llama / "text.txt"), samples=4, tokens=32)
    return BpwJob(model=str(llama / "model"), out=str(out), **{**settings, **kw})


def random_costs(n: int, seed: int) -> dict[str, dict[str, tuple[int, float]]]:
    rng = random.Random(seed)
    costs = {}
    for i in range(n):
        numel = 256 * rng.randint(1, 40)
        sens = rng.random() ** 3
        costs[f"t{i}"] = {
            t: (tensor_bytes(t, (1, numel)), sens * err)
            for t, err in (("Q4_0", 1.0), ("Q5_0", 0.3), ("Q8_0", 0.004), ("Q6_K", 0.06))
        }
    return costs


@pytest.mark.parametrize("max_bpw", [4.5, 4.9, 5.6, 6.3, 8.5])
def test_the_allocation_meets_the_bits_per_weight_budget(max_bpw: float) -> None:
    costs = random_costs(60, seed=int(max_bpw * 10))
    numel = sum(o["Q4_0"][0] * 32 // 18 for o in costs.values()) + 1000
    fixed = 1000 * 4
    assign = plan(costs, budget_bytes(max_bpw, numel, fixed))
    if 8 * (sum(o["Q4_0"][0] for o in costs.values()) + fixed) / numel > max_bpw:
        assert assign is None  # not even Q4_0 everywhere fits
        return
    assert assign is not None
    got = summary(costs, assign, numel, fixed)
    assert got["bpw"] <= max_bpw
    # the budget is spent: no single upgrade of one tensor to a better type still fits
    left = max_bpw * numel / 8 - got["tensor_bytes"]
    for name, options in costs.items():
        b0, d0 = options[assign[name]]
        assert not any(d < d0 and b - b0 <= left for b, d in options.values()), name
    # and it beats the uniform type of nearest size under the budget
    uniform = [t for t in ("Q8_0", "Q6_K", "Q5_0", "Q4_0")
               if summary(costs, dict.fromkeys(costs, t), numel, fixed)["bpw"] <= max_bpw]  # fmt: skip
    best = summary(costs, dict.fromkeys(costs, uniform[0]), numel, fixed)
    assert got["predicted_kld"] <= best["predicted_kld"]


def test_type_options_follow_the_row_length() -> None:
    assert type_options((8, 576), ("Q4_0", "Q4_K", "Q8_0")) == ["Q4_0", "Q8_0"]
    assert type_options((8, 1536), ("Q4_0", "Q4_K", "Q8_0")) == ["Q4_0", "Q4_K", "Q8_0"]
    assert type_options((8, 100), ("Q4_0", "Q4_K")) == ["F16"]
    assert tensor_bytes("Q4_K", (4, 512)) == 4 * 2 * 144
    assert tensor_bytes("Q5_0", (4, 64)) == 4 * 2 * 22
    assert parse_types("q4_0, Q8_0") == ("Q4_0", "Q8_0")
    with pytest.raises(UserInputError, match="Q3_K"):
        parse_types("Q4_0,Q3_K")


@pytest.mark.parametrize("importance", [False, True])
def test_q4_0_blocks_decode_bit_exactly(importance: bool) -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 128)).astype(np.float32)
    imp = rng.random(128).astype(np.float32) if importance else None
    ggml_type, data, values = encode_typed("w", w, "Q4_0", imp)
    decoded = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_0).reshape(w.shape)
    assert ggml_type == "Q4_0" and np.array_equal(decoded, values)
    reference = gguf.quants.dequantize(
        gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0), gguf.GGMLQuantizationType.Q4_0
    ).reshape(w.shape)
    weight = imp if imp is not None else np.ones(128, dtype=np.float32)
    ours = float((weight * (values - w) ** 2).sum())
    theirs = float((weight * (reference - w) ** 2).sum())
    assert ours <= theirs * (0.95 if importance else 1.0 + 1e-6)


@pytest.mark.parametrize("value", ["abc", "nan", "4.0", "-1", "40"])
def test_bad_max_bpw_is_refused(value: str) -> None:
    with pytest.raises(UserInputError, match="--max-bpw"):
        check_max_bpw(value)


def test_cli_exits_2_on_a_bad_budget_and_writes_nothing(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    base = ["auto", "--model", str(llama / "model"), "--out", str(out)]
    assert main([*base, "--max-bpw", "four"]) == 2
    assert "--max-bpw 'four' is not a number" in capsys.readouterr().err
    assert main([*base, "--max-bpw", "3"]) == 2
    assert "outside 4.5..32" in capsys.readouterr().err
    assert main([*base, "--max-bpw", "5", "--max-drop", "0.1"]) == 2
    assert "--max-drop does not apply" in capsys.readouterr().err
    assert not out.exists()


def test_plan_meets_the_budget_and_gguf_reads_the_chosen_types(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    args = ["auto", "--model", str(llama / "model"), "--out", str(out), "--max-bpw", "5.2",
            "--data", str(llama / "text.txt"), "--scan-samples", "4", "--scan-tokens", "32",
            "--json"]  # fmt: skip
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    doc = json.loads((out / "plan.json").read_text())
    assert report["bpw"] <= 5.2 and report["bpw"] > 4.9  # the budget is used, not exceeded
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    written = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {k: written[k] for k in doc["types"]} == doc["types"] == report["types"]
    assert len(set(doc["types"].values())) > 1  # a mix, not one type
    numel = sum(int(np.prod(t.shape)) for t in reader.tensors)
    assert 8 * sum(int(t.n_bytes) for t in reader.tensors) / numel <= 5.2
    check = report["written"]["llama_cpp"]
    if isinstance(check, dict):  # llama.cpp loads it and computes the decoded weights' logits
        assert check["top1_agreement"] >= 0.9 and check["kld_mean"] < 0.01, check


def test_rerun_reuses_the_scan_and_a_size_budget_is_met(
    llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    first = auto_bpw(job(llama, out, max_bpw=6.0))
    assert not first["scan"]["fisher_cached"] and first["scan"]["tensors_cached"] == 0

    def no_scan(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the scan ran again")

    monkeypatch.setattr(bpw_scan, "fisher_and_importance", no_scan)
    monkeypatch.setattr(bpw_scan, "tensor_costs", no_scan)
    size = first["written"]["bytes"] - 40_000
    again = auto_bpw(job(llama, out, max_bpw=None, max_size=str(size)))
    assert again["scan"]["fisher_cached"] and again["scan"]["tensors_cached"] == 15
    assert again["written"]["bytes"] <= size < first["written"]["bytes"]
    with pytest.raises(UserInputError, match="no plan fits"):
        auto_bpw(job(llama, out, max_bpw=None, max_size="100KB"))


def test_a_new_type_list_keeps_the_fisher_pass(
    llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    auto_bpw(job(llama, out, max_bpw=6.0, types="Q4_0,Q8_0"))

    def no_fisher(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the Fisher pass ran again")

    monkeypatch.setattr(bpw_scan, "fisher_and_importance", no_fisher)
    again = auto_bpw(job(llama, out, max_bpw=6.0, types="Q4_0,Q5_0,Q8_0"))
    assert again["scan"]["fisher_cached"] and again["scan"]["tensors_cached"] == 0
    assert "Q5_0" in bpw_scan._read_lines(out / "scan.jsonl")["blk.0.attn_q.weight"]


def test_the_predicted_kld_tracks_the_measured_one(llama: Path, tmp_path: Path) -> None:
    """Second order: on the scan windows, the summed predicted KLD of a uniform plan is within
    a factor 2 of the KLD measured with the decoded weights (Q4_0, Q5_0, Q8_0), and ranks them."""
    from slimtorch.models.registry import load_model

    out = tmp_path / "out"
    auto_bpw(job(llama, out, max_bpw=8.5, types="Q4_0,Q5_0,Q8_0"))
    base = load_model(str(llama / "model")).model.eval()
    costs = bpw_scan._read_lines(out / "scan.jsonl")
    importance = {k: v.numpy() for k, v in _load(out / "importance.safetensors").items()}
    windows = TOKEN_WINDOWS.get("train")
    ids = torch.as_tensor(
        windows(str(llama / "text.txt"), llama / "model" / "tokenizer.json", 4, 32)
    )
    measured = {}
    for t in ("Q4_0", "Q5_0", "Q8_0"):
        model = load_model(str(llama / "model")).model.eval()
        with torch.no_grad():
            for name, p in bpw_scan.planned_weights(model).items():
                w = p.detach().numpy()
                _, _, v = encode_typed(name, w, t, importance.get(name))
                p.copy_(torch.from_numpy(v))
            lp, lq = (torch.log_softmax(m(ids).logits, -1) for m in (base, model))
        measured[t] = float((lp.exp() * (lp - lq)).sum(-1).mean())
        predicted = sum(c[t][1] for c in costs.values())
        assert 0.5 < predicted / measured[t] < 2.0, (t, predicted, measured[t])
    assert measured["Q4_0"] > measured["Q5_0"] > measured["Q8_0"]


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
