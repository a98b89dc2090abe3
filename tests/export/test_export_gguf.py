"""GGUF export: slimtorch's codes in llama.cpp's block types, read back exactly.

A tiny random Llama (hidden 64, 4 query / 2 KV heads, tied embeddings) with a tiny byte-level
BPE tokenizer, quantized onto grids that map exactly (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or not
(groups of 16: refused unless --requantize); the file is read back with ``gguf.GGUFReader``
and with slimtorch's own GGUF reader (which undoes the Q/K permutation), and in llama.cpp
when llama-cpp-python is installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

import slimtorch as st  # noqa: E402
from slimtorch.cli.main import main  # noqa: E402
from slimtorch.core.errors import UnsupportedModelError, UserInputError  # noqa: E402
from slimtorch.core.info import update_info  # noqa: E402
from slimtorch.export import export  # noqa: E402
from slimtorch.export.gguf import permute_rows, pre_tokenizer_name  # noqa: E402
from slimtorch.export.gguf_blocks import BYTES, pack  # noqa: E402
from slimtorch.formats.state import get_state  # noqa: E402
from slimtorch.models import load_model  # noqa: E402
from slimtorch.models.gguf import cached_directory, hf_name, load_gguf, unpermute  # noqa: E402

VOCAB = 512
INSTALL = "pip install llama-cpp-python==0.3.36"
TEXT = "the quick brown fox jumps over the lazy dog, 12345 times; isn't it odd? " * 40


def rtn(**kw: Any) -> dict[str, Any]:
    """A round-to-nearest stage on every Linear layer (4-bit symmetric groups of 32 unless
    ``kw`` says otherwise)."""
    stage = {"method": "quantize.rtn", "bits": 4, "symmetric": True}
    stage.update(granularity="per_group", group_size=32, targets=["Linear"])
    return {**stage, **kw}


EMBED8 = rtn(bits=8, targets=["Embedding"])
# recipe stages -> the GGUF type of the block weights and of token_embd (tied with the head)
MAPPINGS = {
    "Q4_0": ([rtn(), EMBED8], "Q4_0", "Q8_0"),
    "Q4_1": ([rtn(symmetric=False)], "Q4_1", "Q4_1"),
    "Q4_1-groups64": ([rtn(symmetric=False, group_size=64)], "Q4_1", "Q4_1"),
    "Q5_0": ([rtn(bits=5)], "Q5_0", "Q5_0"),
    "Q5_1": ([rtn(bits=5, symmetric=False)], "Q5_1", "Q5_1"),
    "Q8_0": ([rtn(bits=8)], "Q8_0", "Q8_0"),
    "Q8_0-per-channel": ([rtn(bits=8, granularity="per_channel")], "Q8_0", "Q8_0"),
    "dense": ([], "F16", "F16"),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init LlamaForCausalLM saved with its tokenizer.json / tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=256,
        initializer_range=0.2,  # sharp attention: a wrong Q/K permutation changes the logits
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(path / "tokenizer.json"))
    config_json = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "add_bos_token": False,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config_json))
    return path


def compressed(src: Path, stages: list[dict[str, Any]]) -> nn.Module:
    loaded = load_model(str(src))
    update_info(loaded.model, architecture=loaded.architecture, tokenizer=str(src))
    if not stages:
        return loaded.model.eval()
    return st.compress(loaded.model, {"stages": stages}).model.eval()


def ids(n: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x, use_cache=False).logits  # type: ignore[no-any-return]


def read_back(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of the file: (GGUF type, dequantized float32 [rows, cols])."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape.tolist())]
        values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        out[t.name] = (t.tensor_type.name, values.reshape(shape))
    return out


@pytest.mark.parametrize(
    ("ggml_type", "levels"),
    [("Q4_0", 16), ("Q4_1", 16), ("Q5_0", 32), ("Q5_1", 32), ("Q8_0", 256)],
)
def test_block_bytes_decode_with_ggufs_own_dequantizer(ggml_type: str, levels: int) -> None:
    rng = np.random.default_rng(0)
    rows, cols = 3, 96
    q = rng.integers(0, levels, size=(rows, cols))
    if ggml_type == "Q8_0":
        q = q - 128
    d = rng.uniform(0.01, 0.1, size=(rows, cols // 32)).astype(np.float16)
    m = rng.uniform(-1, 0, size=(rows, cols // 32)).astype(np.float16)
    data = pack(ggml_type, q, d, m)
    assert data.shape == (rows, cols // 32 * BYTES[ggml_type])
    qtype = gguf.GGMLQuantizationType[ggml_type]
    got = np.asarray(gguf.quants.dequantize(data, qtype)).reshape(rows, cols)
    d32 = np.repeat(d.astype(np.float32), 32, axis=1)
    m32 = np.repeat(m.astype(np.float32), 32, axis=1)
    offset = {"Q4_0": 8, "Q5_0": 16}.get(ggml_type)
    if offset is not None:
        want = d32 * (q - offset).astype(np.float32)
    elif ggml_type == "Q8_0":
        want = q.astype(np.float32) * d32
    else:
        want = d32 * q.astype(np.float32) + m32
    assert np.array_equal(got, want)


def test_permutation_is_the_inverse_of_the_readers() -> None:
    w = torch.arange(8 * 3 * 4, dtype=torch.float32).reshape(8 * 3, 4)
    permuted = torch.from_numpy(permute_rows(w.numpy(), 3))
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute(permuted, 3), w)


@pytest.mark.parametrize("case", list(MAPPINGS))
def test_each_grid_reads_back_exactly(case: str, llama_dir: Path, tmp_path: Path) -> None:
    stages, block_type, embed_type = MAPPINGS[case]
    model = compressed(llama_dir, stages)
    report = export(model, "gguf", tmp_path / "m.gguf")
    tensors = read_back(tmp_path / "m.gguf")
    assert report["file_type"] == block_type
    assert "output.weight" not in tensors  # tied: token_embd serves as the output
    assert len(tensors) == 1 + 2 * 9 + 1
    heads = {"attn_q": 4, "attn_k": 2}
    params = dict(model.named_parameters())
    for name, (kind, values) in tensors.items():
        hf = hf_name(name)
        want = params[hf].detach().numpy()
        stem = name.split(".")[-2]
        if stem in heads:  # llama.cpp's row order
            want = permute_rows(want, heads[stem])
        if values.ndim == 1:
            assert kind == "F32" and np.array_equal(values, want), name
            continue
        assert kind == (embed_type if name == "token_embd.weight" else block_type), name
        if kind == "F16":
            assert np.array_equal(values, want.astype(np.float16).astype(np.float32)), name
        elif kind in ("Q4_1", "Q5_1"):  # m = -zero_point * d rounded to fp16 (reported)
            change = np.abs(values - want).max()
            assert change <= report["offset_rounding_max_abs"], name
            assert report["offset_rounding_max_abs"] < 1e-3 * np.abs(want).max()
        else:  # fp16-exact scales: bit-identical
            assert np.array_equal(values, want), name
    assert report["scale_rounding_max_abs"] == 0.0
    assert report["llama_cpp"] == f"not installed ({INSTALL})" or isinstance(
        report["llama_cpp"], dict
    )


def test_slimtorchs_reader_gets_the_same_model_back(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Q/K permutation is undone by slimtorch.models.gguf (llama.cpp's layout), and the
    tokenizer rebuilt from the file's metadata encodes as the original."""
    from tokenizers import Tokenizer

    monkeypatch.setenv("SLIMTORCH_CACHE", str(tmp_path / "cache"))
    model = compressed(llama_dir, MAPPINGS["Q4_0"][0])
    export(model, "gguf", tmp_path / "m.gguf")
    back = load_gguf(tmp_path / "m.gguf")
    x = ids()
    torch.testing.assert_close(logits(back.model.eval(), x), logits(model, x), rtol=0, atol=1e-5)
    assert back.model.config.num_key_value_heads == 2
    rebuilt = Tokenizer.from_file(str(cached_directory(tmp_path / "m.gguf") / "tokenizer.json"))
    original = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    text = "<|im_start|>the lazy dog, 2024 times<|im_end|>"
    assert rebuilt.encode(text).ids == original.encode(text).ids
    meta = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert meta["tokenizer.ggml.pre"].contents() == "smollm"
    assert meta["tokenizer.ggml.bos_token_id"].contents() == 1
    assert meta["tokenizer.ggml.eos_token_id"].contents() == 2
    assert meta["tokenizer.ggml.token_type"].contents()[:3] == [3, 3, 3]  # control tokens
    assert meta["tokenizer.ggml.tokens"].contents()[-1] == f"[PAD{VOCAB - 1}]"
    assert meta["llama.attention.head_count_kv"].contents() == 2
    assert meta["llama.rope.dimension_count"].contents() == 16
    assert meta["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)


def test_pre_tokenizer_names() -> None:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == (
        "smollm"
    )
    assert pre_tokenizer_name({"type": "Whitespace"}) == "default"


def test_groups_of_16_are_refused_naming_the_layer(llama_dir: Path, tmp_path: Path) -> None:
    model = compressed(llama_dir, [rtn(group_size=16)])
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\..*--requantize"):
        export(model, "gguf", tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_requantize_writes_them_again(llama_dir: Path, tmp_path: Path) -> None:
    model = compressed(llama_dir, [rtn(group_size=16)])
    report = export(model, "gguf", tmp_path / "m.gguf", requantize="q8_0")
    assert report["requantize"] == "Q8_0"
    assert len(report["requantized"]) == 15  # 14 Linear layers and the tied head
    tensors = read_back(tmp_path / "m.gguf")
    assert tensors["blk.0.ffn_up.weight"][0] == "Q8_0"
    assert get_state(model.model.layers[0].mlp.up_proj, "weight") is not None
    diff = report["max_abs_diff_by_type"]["Q8_0 (requantized)"]
    assert 0 < diff < 0.01 * float(model.model.layers[0].mlp.up_proj.weight.detach().abs().max())
    with pytest.raises(UserInputError, match="Q8_0"):
        export(model, "gguf", tmp_path / "n.gguf", requantize="Q3_K")


def test_non_llama_models_are_refused_by_name(tmp_path: Path) -> None:
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=VOCAB)
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        export(model, "gguf", tmp_path / "m.gguf", inputs=(ids(),))
    assert not (tmp_path / "m.gguf").exists()


def test_sliding_window_mistral_is_refused(tmp_path: Path) -> None:
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
    )  # fmt: skip
    model = transformers.MistralForCausalLM(config).eval()
    with pytest.raises(UnsupportedModelError, match="sliding attention window"):
        export(model, "gguf", tmp_path / "m.gguf", inputs=(ids(),))


def test_cli_end_to_end(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from slimtorch.core.context import Context
    from slimtorch.workflows.compress import CompressOptions, compress_to_dir

    recipe = tmp_path / "q4_0.yaml"
    recipe.write_text(json.dumps({"stages": [rtn(), EMBED8]}))
    artifact = tmp_path / "art"
    compress_to_dir(str(llama_dir), str(recipe), artifact, CompressOptions(llm_windows=0),
                    Context(progress=False))  # fmt: skip
    out = tmp_path / "f.gguf"
    code = main(["export", str(artifact), "--to", "gguf", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert out.is_file() and report["file_type"] == "Q4_0" and report["codes_kept"] == 15
    # again without --force: exit 2, the file untouched
    before = out.stat().st_mtime_ns
    assert main(["export", str(artifact), "--to", "gguf", "--out", str(out)]) == 2
    assert out.stat().st_mtime_ns == before
    # a bad --requantize: exit 2, nothing written
    bad = tmp_path / "bad.gguf"
    assert (
        main(["export", str(artifact), "--to", "gguf", "--out", str(bad), "--requantize", "Q9"])
        == 2
    )
    assert "--requantize" in capsys.readouterr().err
    assert not bad.exists()
    # replaced with --force; the plain-text summary
    assert main(["export", str(artifact), "--to", "gguf", "--out", str(out), "--force"]) == 0
    text = capsys.readouterr().out
    assert "file type Q4_0" in text and "llama.cpp" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "f.gguf", "q4_0.yaml"]


@pytest.mark.parametrize(
    ("preset", "block_type"), [("gguf-q4_0-gptq", "Q4_0"), ("gguf-q4_1-gptq", "Q4_1")]
)
def test_gguf_presets_export_exactly(
    preset: str, block_type: str, llama_dir: Path, tmp_path: Path
) -> None:
    """GPTQ in llama.cpp's layout: every block weight in ``block_type``, the embedding (tied
    with the head) in Q8_0, read back exactly up to the reported fp16 offsets."""
    from slimtorch.core.context import Context
    from slimtorch.workflows.compress import CompressOptions, compress_to_dir
    from slimtorch.workflows.export import export_dir

    artifact = tmp_path / "art"
    options = CompressOptions(data="builtin:wikipedia", llm_windows=0)
    compress_to_dir(str(llama_dir), preset, artifact, options, Context(progress=False))
    report = export_dir(artifact, "gguf", tmp_path / "m.gguf")
    assert report["tensors"] == {"F32": 5, block_type: 14, "Q8_0": 1}
    assert report["requantized"] == [] and report["scale_rounding_max_abs"] == 0.0
    assert report["max_abs_diff_by_type"]["Q8_0 (codes)"] == 0.0
    if block_type == "Q4_0":
        assert report["max_abs_diff_by_type"]["Q4_0 (codes)"] == 0.0


def test_llama_cpp_computes_the_same_logits(llama_dir: Path, tmp_path: Path) -> None:
    """llama.cpp quantizes activations to 8 bits for quantized matmuls: measured here mean KLD
    7e-4..1.7e-3 and top-1 agreement >= 0.92 for the quantized types, 7e-6 / 1.0 for F16; the
    same model exported without the Q/K permutation gives KLD 2.1, top-1 0.03."""
    pytest.importorskip("llama_cpp", reason=f"llama.cpp is not installed: {INSTALL}")
    for case, (stages, _, _) in MAPPINGS.items():
        model = compressed(llama_dir, stages)
        report = export(model, "gguf", tmp_path / f"{case}.gguf")
        check = report["llama_cpp"]
        assert isinstance(check, dict), case
        assert report["verified"] == "gguf reader + llama.cpp"
        assert check["top1_agreement"] >= 0.85, (case, check)
        assert check["kld_mean"] < (1e-4 if case == "dense" else 1e-2), (case, check)


@pytest.mark.slow
def test_smollm2_rtn_q4_0_exports_and_runs_in_llama_cpp(tmp_path: Path) -> None:
    """builtin:smollm2-135m, 4-bit symmetric RTN in groups of 32 with an 8-bit embedding:
    every tensor exact, llama.cpp's logits agree (when it is installed)."""
    loaded = load_model("builtin:smollm2-135m")
    update_info(loaded.model, architecture=loaded.architecture)
    model = st.compress(loaded.model, {"stages": [rtn(), EMBED8]}).model.eval()
    report = export(model, "gguf", tmp_path / "smollm2-q4_0.gguf")
    assert report["file_type"] == "Q4_0"
    assert report["tensors"] == {"F32": 61, "Q4_0": 210, "Q8_0": 1}
    assert report["max_abs_diff_by_type"]["Q4_0 (codes)"] == 0.0
    assert report["max_abs_diff_by_type"]["Q8_0 (codes)"] == 0.0
    assert report["tokenizer"]["pre"] == "smollm"
    assert report["bytes"] < 1.05 * 91_726_912  # llama.cpp's own Q4_0 file of this model
    from slimtorch.zoo import smollm2

    ours = gguf.GGUFReader(str(tmp_path / "smollm2-q4_0.gguf")).fields
    theirs = gguf.GGUFReader(str(smollm2.gguf_path())).fields
    # add_space_prefix came from the original tokenizer_config.json, which the builtin (rebuilt
    # from the GGUF metadata) does not have; false is llama.cpp's default for BPE anyway
    for key in theirs:
        if (
            key.startswith(("llama.", "tokenizer.ggml."))
            and key != "tokenizer.ggml.add_space_prefix"
        ):
            assert ours[key].contents() == theirs[key].contents(), key
    if isinstance(report["llama_cpp"], dict):  # measured: KLD 0.0082, top-1 0.84 (random ids)
        assert report["llama_cpp"]["kld_mean"] < 0.02
        assert report["llama_cpp"]["top1_agreement"] >= 0.75


@pytest.mark.slow
def test_smollm2_metadata_is_llama_cpps(tmp_path: Path) -> None:
    """The tokenizer.ggml.* values built from builtin:smollm2-135m's tokenizer.json equal the
    ones in the GGUF file llama.cpp's converter wrote (the builtin's source)."""
    from slimtorch.calibrate.text import tokenizer_file
    from slimtorch.export.gguf import tokenizer_metadata
    from slimtorch.zoo import smollm2

    load_model("builtin:smollm2-135m")  # converts the GGUF file once (cached)
    meta = tokenizer_metadata(tokenizer_file("builtin:smollm2-135m"), 49152)
    fields = gguf.GGUFReader(str(smollm2.gguf_path())).fields
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id",
                "unknown_token_id", "padding_token_id", "add_bos_token"):  # fmt: skip
        assert meta[key] == fields[f"tokenizer.ggml.{key}"].contents(), key
    assert meta["chat_template"] == fields["tokenizer.chat_template"].contents()
