"""k-quant GGUF blocks (Q4_K, Q5_K, Q6_K) and llama.cpp's Q4_K_M mix: slimtorch's encoders
decode bit-exactly with the ``gguf`` package's dequantizer, importance weighting lowers the
weighted error, the mix picks llama.cpp's types (and its fallbacks), and llama.cpp loads and
runs the file of a tiny Llama whose rows are multiples of 256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from slimtorch.cli.main import main  # noqa: E402
from slimtorch.core.errors import UserInputError  # noqa: E402
from slimtorch.core.info import update_info  # noqa: E402
from slimtorch.export.gguf import export_gguf  # noqa: E402
from slimtorch.export.gguf_kquants import BLOCK_BYTES, encode  # noqa: E402
from slimtorch.export.gguf_mix import fallback, mix_type, use_more_bits  # noqa: E402
from slimtorch.models import load_model  # noqa: E402

VOCAB = 512
TEXT = "the quick brown fox jumps over the lazy dog, 12345 times; isn't it odd? " * 40
TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q8_0")


def weights(rows: int = 48, cols: int = 512, seed: int = 0) -> np.ndarray:
    """Gaussian weights with the awkward cases: a zero row, a constant row, an all-positive
    row, a row with one huge outlier, a zero super-block."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w[1] = 0.0
    w[2] = 0.3
    w[3] = np.abs(w[3])
    w[4, 7] = 4.0
    w[5, :256] = 0.0
    return w


def decoded(data: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType[ggml_type]
    return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32).reshape(shape)


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("importance", [False, True])
def test_blocks_decode_bit_exactly_with_ggufs_dequantizer(ggml_type: str, importance: bool) -> None:
    w = weights()
    imp = np.random.default_rng(1).random(w.shape[1]).astype(np.float32) if importance else None
    enc = encode(w, ggml_type, imp)
    per_row = w.shape[1] // (256 if ggml_type.endswith("_K") else 32) * BLOCK_BYTES[ggml_type]
    assert enc.data.dtype == np.uint8 and enc.data.shape == (w.shape[0], per_row)
    assert np.array_equal(decoded(enc.data, ggml_type, w.shape), enc.values)
    assert np.all(enc.values[1] == 0) and np.all(enc.values[5, :256] == 0)
    # a quantizer, not noise: errors of the size of the grid step
    rmse = float(np.sqrt(((enc.values - w)[6:] ** 2).mean()))
    bound = {"Q4_K": 1.6e-3, "Q5_K": 8e-4, "Q6_K": 4.2e-4, "Q5_0": 9.5e-4, "Q8_0": 1.2e-4}
    assert rmse < bound[ggml_type], rmse


def test_k_quants_beat_the_32_blocks_of_equal_bits() -> None:
    """Per-sub-block scales and mins at ~4.5 / 5.5 bits per weight: smaller errors than
    llama.cpp's reference Q4_0 / Q5_0 (gguf.quants.quantize) at the same bits."""
    w = weights()[6:]
    err = {t: float(((encode(w, t).values - w) ** 2).mean()) for t in ("Q4_K", "Q5_K")}
    for ggml_type, k_type in (("Q4_0", "Q4_K"), ("Q5_0", "Q5_K")):
        ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType[ggml_type])
        ref_err = float(((decoded(ref, ggml_type, w.shape) - w) ** 2).mean())
        assert err[k_type] < 0.8 * ref_err, (k_type, err[k_type], ref_err)


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q5_K", "Q6_K", "Q5_0"])
def test_importance_lowers_the_weighted_error(ggml_type: str) -> None:
    """Columns with 100x the importance (mean squared activation) of the others: the
    importance-weighted error sum_i imp_i (w_i - w^_i)^2 drops by at least 15%."""
    w = weights(64, 512, seed=3)[6:]
    imp = np.where(np.arange(512) % 8 == 0, 100.0, 1.0).astype(np.float32)
    plain = encode(w, ggml_type).values
    weighted = encode(w, ggml_type, imp).values

    def cost(v: np.ndarray) -> float:
        return float((imp * (v - w) ** 2).sum())

    assert cost(weighted) < 0.85 * cost(plain), (cost(weighted), cost(plain))


def test_bad_shapes_and_importance_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of Q4_K's block of 256"):
        encode(np.zeros((2, 576), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="importance has 3 entries"):
        encode(np.zeros((2, 256), np.float32), "Q6_K", np.ones(3, np.float32))
    with pytest.raises(ValueError, match="cannot encode Q3_K"):
        encode(np.zeros((2, 256), np.float32), "Q3_K")


def test_the_mix_is_llama_cpps() -> None:
    more = [i for i in range(30) if use_more_bits(i, 30)]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert mix_type("Q4_K_M", "blk.5.attn_v.weight", 30, False) == "Q6_K"
    assert mix_type("Q4_K_M", "blk.4.ffn_down.weight", 30, False) == "Q4_K"
    assert mix_type("Q4_K_M", "blk.4.attn_q.weight", 30, False) == "Q4_K"
    assert mix_type("Q4_K_M", "token_embd.weight", 30, True) == "Q6_K"
    assert mix_type("Q4_K_S", "blk.3.attn_v.weight", 30, False) == "Q5_K"
    assert mix_type("Q6_K", "blk.3.attn_q.weight", 30, False) == "Q6_K"
    # SmolLM2-135M: 576-wide rows fall back, ffn_down's 1536 do not; 40-wide ones go F16
    assert [fallback(t, 576) for t in ("Q4_K", "Q5_K", "Q6_K")] == ["Q5_0", "Q5_1", "Q8_0"]
    assert fallback("Q4_K", 1536) == "Q4_K" and fallback("Q6_K", 40) == "F16"


# --- the exporter on tiny Llamas ---------------------------------------------------------


def tiny_llama(path: Path, hidden: int, inter: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=256, initializer_range=0.05,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return path


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows of 256 and 512: every weight takes its k-quant type."""
    return tiny_llama(tmp_path_factory.mktemp("wide-llama"), 256, 512)


@pytest.fixture(scope="module")
def narrow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows of 64 and 128: llama.cpp's fallbacks (Q5_0, Q8_0)."""
    return tiny_llama(tmp_path_factory.mktemp("narrow-llama"), 64, 128)


def model_of(src: Path) -> Any:
    loaded = load_model(str(src))
    update_info(loaded.model, architecture=loaded.architecture, tokenizer=str(src))
    return loaded.model.eval()


def ids() -> tuple[torch.Tensor]:
    return (torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(1)),)


def test_q4_k_m_of_a_wide_llama_reads_back_and_runs_in_llama_cpp(
    wide: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m.gguf"
    report = export_gguf(model_of(wide), ids(), out, requantize="q4_k_m")
    # layer 1 of 2 is a use_more_bits layer: attn_v and ffn_down Q6_K; the tied head Q6_K
    assert report["tensors"] == {"F32": 5, "Q4_K": 12, "Q6_K": 3}
    assert report["file_type"] == "Q4_K_M" and report["encoded"] == 15
    assert report["fallback"] == {}
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["blk.0.attn_v.weight"] == types["blk.0.ffn_down.weight"] == "Q4_K"
    assert types["token_embd.weight"] == "Q6_K"
    assert int(reader.fields["general.file_type"].contents()) == int(
        gguf.LlamaFileType.MOSTLY_Q4_K_M
    )
    check = report["llama_cpp"]
    if isinstance(check, dict):  # llama.cpp computes what the decoded weights compute
        assert report["verified"] == "gguf reader + llama.cpp"
        assert check["kld_mean"] < 0.01 and check["top1_agreement"] >= 0.9, check


def test_narrow_rows_take_llama_cpps_fallbacks(narrow: Path, tmp_path: Path) -> None:
    report = export_gguf(model_of(narrow), ids(), tmp_path / "m.gguf", requantize="Q4_K_M")
    assert report["tensors"] == {"F32": 5, "Q5_0": 12, "Q8_0": 3}
    assert report["fallback"] == {"Q4_K->Q5_0": 12, "Q6_K->Q8_0": 3}


def test_an_imatrix_changes_the_rounding_and_a_wrong_one_is_refused(
    wide: Path, tmp_path: Path
) -> None:
    from safetensors.numpy import save_file

    model = model_of(wide)
    plain = export_gguf(model, ids(), tmp_path / "a.gguf", requantize="Q4_K")
    imatrix = tmp_path / "imatrix.safetensors"
    imp = np.where(np.arange(256) % 4 == 0, 50.0, 1.0).astype(np.float32)
    save_file({"blk.0.attn_q.weight": imp}, str(imatrix))
    weighted = export_gguf(model, ids(), tmp_path / "b.gguf", requantize="Q4_K", imatrix=imatrix)
    assert weighted["imatrix"] == str(imatrix)
    a, b = gguf.GGUFReader(str(tmp_path / "a.gguf")), gguf.GGUFReader(str(tmp_path / "b.gguf"))
    name = "blk.0.attn_q.weight"
    ta = next(t for t in a.tensors if t.name == name)
    tb = next(t for t in b.tensors if t.name == name)
    assert not np.array_equal(np.asarray(ta.data), np.asarray(tb.data))
    other = "blk.0.attn_k.weight"  # no importance row: the same bytes as without the file
    oa = next(t for t in a.tensors if t.name == other)
    ob = next(t for t in b.tensors if t.name == other)
    assert np.array_equal(np.asarray(oa.data), np.asarray(ob.data))
    assert plain["tensors"]["Q4_K"] == 15
    save_file({"blk.0.attn_q.weight": np.ones(99, np.float32)}, str(imatrix))
    with pytest.raises(UserInputError, match=r"99 entries for blk\.0\.attn_q\.weight"):
        export_gguf(model, ids(), tmp_path / "c.gguf", requantize="Q4_K", imatrix=imatrix)
    with pytest.raises(UserInputError, match="--imatrix weights the rounding of a k-quant mix"):
        export_gguf(model, ids(), tmp_path / "c.gguf", imatrix=imatrix)
    with pytest.raises(UserInputError, match="does not exist"):
        export_gguf(model, ids(), tmp_path / "c.gguf", requantize="Q4_K_M", imatrix="nope.gguf")
    assert not (tmp_path / "c.gguf").exists()


def test_cli_writes_a_mix_and_refuses_an_unknown_one(
    wide: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import slimtorch as st

    model = model_of(wide)
    update_info(model, input={"shape": [1, 16], "dtype": "int64"})
    artifact = tmp_path / "art"
    st.save(model, artifact)
    out = tmp_path / "m.gguf"
    args = ["export", str(artifact), "--to", "gguf", "--out", str(out), "--json"]
    assert main([*args, "--requantize", "Q6_K"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tensors"] == {"F32": 5, "Q6_K": 15}
    bad = tmp_path / "bad.gguf"
    code = main(
        ["export", str(artifact), "--to", "gguf", "--out", str(bad), "--requantize", "Q3_K_M"]
    )
    assert code == 2 and "k-quant mix" in capsys.readouterr().err
    assert not bad.exists()


def test_the_gptq_preset_keeps_its_codes_and_encodes_ffn_down(narrow: Path, tmp_path: Path) -> None:
    """gguf-q4_k_m-gptq: GPTQ's Q5_0 codes and RTN's Q8_0 codes written unchanged; ffn_down,
    left float by the preset, encoded by the Q4_K_M mix the exporter reads from the preset's
    name (here with llama.cpp's fallbacks: 128-wide rows)."""
    from slimtorch.core.context import Context
    from slimtorch.workflows.compress import CompressOptions, compress_to_dir
    from slimtorch.workflows.export import export_dir

    artifact = tmp_path / "art"
    options = CompressOptions(data="builtin:wikipedia", llm_windows=0)
    compress_to_dir(str(narrow), "gguf-q4_k_m-gptq", artifact, options, Context(progress=False))
    report = export_dir(artifact, "gguf", tmp_path / "m.gguf")
    assert report["requantize"] == "Q4_K_M" and report["file_type"] == "Q4_K_M"
    assert report["codes_kept"] == 13 and report["encoded"] == 2
    assert report["tensors"] == {"F32": 5, "Q5_0": 11, "Q8_0": 4}
    assert report["max_abs_diff_by_type"]["Q8_0 (codes)"] == 0.0
    assert report["max_abs_diff_by_type"]["Q5_0 (codes)"] == 0.0
