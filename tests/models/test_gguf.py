"""GGUF reader: a tiny Llama written in llama.cpp's layout reads back as the same model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from slimtorch.core.errors import UserInputError  # noqa: E402
from slimtorch.models import gguf as reader  # noqa: E402
from slimtorch.models.registry import load_model, rebuild  # noqa: E402

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,"
    " must be in want of a wife. In  1813, 12 copies cost  3.50 pounds; 'tis odd, isn't it?"
)
LAYERS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SLIMTORCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute`` (written out independently)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def train_tokenizer(digits: bool) -> Any:
    """A tiny byte-level BPE (the reference the rebuilt tokenizer must reproduce)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 20, trainer)
    return tok


def llama_cpp_rope_freqs(cfg: Any) -> np.ndarray:
    """llama.cpp's converter's ``rope_freqs`` for a ``llama3`` rope scaling (its loop)."""
    rope = cfg.rope_parameters
    dim = cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def tiny_llama(vocab: int, tied: bool, rope_scaling: dict[str, Any] | None = None) -> Any:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        tie_word_embeddings=tied,
        rope_scaling=rope_scaling,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a misplaced norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def gguf_name(name: str) -> str:
    if name.startswith("model.layers."):
        _, _, n, rest = name.split(".", 3)
        module, _, kind = rest.rpartition(".")
        return f"blk.{n}.{LAYERS[module]}.{kind}"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[name]


def write_gguf(
    path: Path,
    model: Any,
    tok: Any,
    pre: str,
    arch: str = "llama",
    q8: bool = False,
    rope_freqs: np.ndarray | None = None,
) -> None:
    """``model`` and ``tok`` as llama.cpp's converter writes them (names, Q/K permutation)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(5000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    data = json.loads(tok.to_str())
    vocab = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t, _ in vocab])
    writer.add_token_merges([" ".join(m) for m in data["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_chat_template("{{ messages }}")
    if cfg.rope_parameters.get("rope_type") == "llama3":
        freqs = llama_cpp_rope_freqs(cfg) if rope_freqs is None else rope_freqs
        writer.add_tensor("rope_freqs.weight", freqs)
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = value.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_key_value_heads)
        if q8 and array.ndim == 2:
            quant = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name(name), quant, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("tied", "pre"), [(True, "smollm"), (False, "gpt-2")])
def test_reads_back_same_model_and_tokenizer(tmp_path: Path, tied: bool, pre: str) -> None:
    tok = train_tokenizer(digits=pre == "smollm")
    model = tiny_llama(tok.get_vocab_size(), tied)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model, tok, pre)

    loaded = load_model(str(path))
    assert loaded.source == str(path) and loaded.task == "causal-lm"
    cfg = loaded.model.config
    assert (cfg.num_key_value_heads, cfg.tie_word_embeddings) == (2, tied)
    assert cfg.rope_parameters["rope_theta"] == 5000.0
    ids = tok.encode(TEXT).ids
    assert torch.allclose(logits(loaded.model, ids), logits(model, ids), atol=1e-5, rtol=0)

    # the rebuilt tokenizer is the original one: same ids, and text round-trips
    assert loaded.tokenizer is not None
    ours = tokenizers.Tokenizer.from_file(loaded.tokenizer)
    for text in (TEXT, "  spaced\tout 2024\n\nnew <|endoftext|> end "):
        assert ours.encode(text).ids == tok.encode(text).ids
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    config = json.loads((Path(loaded.tokenizer).parent / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["chat_template"] == "{{ messages }}"

    # the architecture is a plain hf spec: the artifact rebuilds without the GGUF file
    spec = json.loads(json.dumps(loaded.architecture))
    assert spec["kind"] == "hf" and spec["class"] == "LlamaForCausalLM"
    rebuilt = rebuild(spec)
    rebuilt.load_state_dict(loaded.model.state_dict())
    assert torch.equal(logits(rebuilt, ids), logits(loaded.model, ids))
    assert reader.architecture(path)["config"]["num_hidden_layers"] == 2


def test_quantized_tensors_dequantize(tmp_path: Path) -> None:
    tok = train_tokenizer(digits=False)
    model = tiny_llama(tok.get_vocab_size(), tied=True)
    path = tmp_path / "q8.gguf"
    write_gguf(path, model, tok, "gpt-2", q8=True)
    loaded = reader.load_gguf(path)
    ref, got = model.state_dict(), loaded.model.state_dict()
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        scale = ref[name].abs().max() / 127  # Q8_0: at most half a step per block of 32
        assert (got[name] - ref[name]).abs().max() <= scale * 0.51
    ids = tok.encode(TEXT).ids
    assert (logits(loaded.model, ids) - logits(model, ids)).abs().max() < 0.05


def test_cache_hit_does_not_dequantize(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = train_tokenizer(digits=False)
    model = tiny_llama(tok.get_vocab_size(), tied=True)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model, tok, "gpt-2")
    first = reader.load_gguf(path)
    entries = list((cache / "gguf").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()

    def fail(*args: Any) -> None:
        raise AssertionError("dequantized again on a cache hit")

    monkeypatch.setattr(gguf.quants, "dequantize", fail)
    second = reader.load_gguf(path)
    ids = tok.encode(TEXT).ids
    assert torch.equal(logits(first.model, ids), logits(second.model, ids))
    os.utime(path, ns=(0, 0))  # a changed file is a cache miss: converted again
    with pytest.raises(AssertionError, match="dequantized again"):
        reader.load_gguf(path)
    assert [p.name for p in (cache / "gguf").iterdir()] == [entries[0].name]  # no temp left


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserInputError, match=r"architecture 'qwen2'.*'llama'"):
        load_model(str(path))


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"not gguf at all")
    with pytest.raises(UserInputError, match="not a readable GGUF file"):
        load_model(str(path))
    with pytest.raises(UserInputError, match="no GGUF file"):
        load_model(str(tmp_path / "missing.gguf"))


def test_unpermute_inverts_llama_cpp() -> None:
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for heads in (1, 2, 3):
        back = reader.unpermute(torch.from_numpy(llama_cpp_permute(w, heads)), heads)
        assert torch.equal(back, torch.from_numpy(w))


def test_unknown_pre_tokenizer_loads_without_tokenizer(tmp_path: Path) -> None:
    tok = train_tokenizer(digits=False)
    model = tiny_llama(tok.get_vocab_size(), tied=True)
    path = tmp_path / "odd.gguf"
    write_gguf(path, model, tok, "some-future-pre")
    loaded = load_model(str(path))
    assert loaded.tokenizer is None
    with pytest.raises(UserInputError, match="--tokenizer"):
        reader.tokenizer_path(path)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_llama3_rope_scaling_from_rope_freqs(tmp_path: Path) -> None:
    tok = train_tokenizer(digits=False)
    model = tiny_llama(tok.get_vocab_size(), tied=True, rope_scaling=dict(LLAMA3_ROPE))
    factors = llama_cpp_rope_freqs(model.config)
    assert len(set(factors.round(3).tolist())) > 2  # fast, slow and smoothed dimensions
    path = tmp_path / "l3.gguf"
    write_gguf(path, model, tok, "gpt-2")
    loaded = load_model(str(path))
    assert loaded.model.config.rope_parameters["rope_type"] == "llama3"
    assert loaded.model.config.rope_parameters["factor"] == 8.0
    ids = tok.encode(TEXT * 3).ids
    assert torch.allclose(logits(loaded.model, ids), logits(model, ids), atol=1e-5, rtol=0)

    odd = tmp_path / "odd-rope.gguf"
    write_gguf(odd, model, tok, "gpt-2", rope_freqs=factors[::-1].copy())
    with pytest.raises(UserInputError, match="not Llama 3's rope scaling"):
        load_model(str(odd))


def test_unwritable_cache_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = train_tokenizer(digits=False)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_llama(tok.get_vocab_size(), tied=True), tok, "gpt-2")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SLIMTORCH_CACHE", str(blocker))
    with pytest.raises(UserInputError, match="SLIMTORCH_CACHE"):
        load_model(str(path))
