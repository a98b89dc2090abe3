"""prune.layers: a depth-pruned Llama exports to transformers and GGUF, and the CLI runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

transformers = pytest.importorskip("transformers")

import slimtorch as st  # noqa: E402
from slimtorch.cli.main import main  # noqa: E402
from slimtorch.core.info import update_info  # noqa: E402
from slimtorch.export import export  # noqa: E402
from slimtorch.models import load_model  # noqa: E402
from slimtorch.testing.models import example_input, tiny_llama, with_example_input  # noqa: E402
from slimtorch.testing.tasks import tensor_task  # noqa: E402

VOCAB = 320
TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 8


def _pruned(layers: int = 4, drop: list[int] | None = None) -> nn.Module:
    model = with_example_input(tiny_llama(layers=layers, vocab=VOCAB, std=0.05))
    x = example_input(model, batch=4)
    stage = {"method": "prune.layers", "blocks": drop or [1, 2]}
    return st.compress(model, [stage], data=tensor_task(x, loss="next_token")).model.eval()


def test_hf_export_reloads_in_transformers_with_the_same_logits(tmp_path: Path) -> None:
    model = _pruned()
    export(model, to="hf", out=tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", local_files_only=True
    ).eval()
    assert len(loaded.model.layers) == 2
    x = example_input(model, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False})
    )


def test_gguf_export_writes_only_the_kept_blocks(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    _tokenizer(tmp_path)
    model = _pruned(layers=3, drop=[1])
    update_info(model, tokenizer=str(tmp_path / "tokenizer.json"))
    out = tmp_path / "m.gguf"
    export(model, to="gguf", out=out)
    reader = gguf.GGUFReader(str(out))
    field = reader.fields["llama.block_count"]
    assert int(field.parts[field.data[0]][0]) == 2
    blocks = {t.name.split(".")[1] for t in reader.tensors if t.name.startswith("blk.")}
    assert blocks == {"0", "1"}
    loaded = load_model(str(out)).model.eval()  # our GGUF reader (llama.cpp: export checks)
    x = example_input(model, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=5e-3)  # f16


def test_cli_compress_with_a_prune_layers_recipe(tmp_path: Path) -> None:
    src = tmp_path / "src"
    model: Any = tiny_llama(layers=4, vocab=VOCAB, std=0.05)
    model.save_pretrained(src)
    _tokenizer(src)
    recipe = tmp_path / "r.yaml"
    stage = {"method": "prune.layers", "count": 2, "calibration": {"samples": 4, "batch_size": 2}}
    recipe.write_text(yaml.safe_dump({"stages": [stage]}))
    out = tmp_path / "out"
    argv = ["compress", "--model", str(src), "--recipe", str(recipe), "--out", str(out),
            "--data", "builtin:austen", "--llm-windows", "0", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    loaded = st.load(out)
    assert loaded.config.num_hidden_layers == 2  # type: ignore[union-attr]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stages": [{"method": "prune.layers", "count": 4}]}))
    argv[4], argv[6] = str(bad), str(tmp_path / "out2")
    assert main(argv) == 2
    assert not (tmp_path / "out2").exists()


def test_per_layer_types_follow_the_kept_blocks_through_hf_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_sliding_window=True, sliding_window=4, max_window_layers=1, use_cache=False,
    )  # fmt: skip
    model: Any = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="eager")
    model = with_example_input(model.eval())
    x = torch.randint(0, VOCAB, (2, 16))
    stage = {"method": "prune.layers", "blocks": [1]}
    out: Any = st.compress(model, [stage], data=tensor_task(x, loss="next_token")).model.eval()
    assert out.config.layer_types == ["full_attention", "sliding_attention"]
    assert [b.self_attn.layer_idx for b in out.model.layers] == [0, 1]
    export(out, to="hf", out=tmp_path / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", local_files_only=True, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, out(x).logits, rtol=1e-5, atol=1e-5)
        ids = x[:1, :6]
        cached = out.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True)
        plain = out.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
