"""Width pruning of a decoder LM (issue 18 pt 2): the hidden (embedding) size with prune.hidden,
with attention heads (whole key/value groups) and MLP channels from prune.structured, then
distill.finetune; shapes, exactness on zero channels, save/load, transformers reload, CLI."""

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
from slimtorch.core.context import Context  # noqa: E402
from slimtorch.core.errors import ConfigError, UnsupportedModelError  # noqa: E402
from slimtorch.export import export  # noqa: E402
from slimtorch.graph.hidden import find_hidden, prune_hidden  # noqa: E402
from slimtorch.testing.models import (  # noqa: E402
    example_input,
    tiny_bert,
    tiny_llama,
    with_example_input,
)
from slimtorch.testing.tasks import tensor_task  # noqa: E402

VOCAB = 320
ZERO = [3, 10, 40, 63]
MLP = r"re:model\.layers\.\d+\.mlp\.(gate|up)_proj"


def _llama(seed: int = 0) -> nn.Module:
    return with_example_input(tiny_llama(layers=2, vocab=VOCAB, std=0.1, seed=seed))


def _tied_qwen2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, use_cache=False,
    )  # fmt: skip
    model: Any = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return with_example_input(model.eval())


def _zero_channels(model: Any, zero: list[int]) -> None:
    """Make hidden channels ``zero`` zero everywhere in the residual stream."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, zero] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[zero] = 0
            layer.mlp.down_proj.weight[zero] = 0


def _logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).logits  # type: ignore[no-any-return]


@pytest.mark.parametrize("factory", [_llama, _tied_qwen2])
def test_removing_zero_channels_keeps_the_logits(factory: Any) -> None:
    model = factory()
    _zero_channels(model, ZERO)
    x = example_input(model, batch=2)
    before = _logits(model, x)
    keep = torch.tensor([c for c in range(64) if c not in ZERO])
    prune_hidden(model, keep)
    assert model.config.hidden_size == 60 and model.model.embed_tokens.weight.shape == (VOCAB, 60)
    assert model.model.layers[0].self_attn.q_proj.in_features == 60
    assert model.model.layers[1].mlp.down_proj.weight.shape[0] == 60
    assert model.lm_head.weight.shape == (VOCAB, 60)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(_logits(model, x), before, rtol=1e-4, atol=1e-4)


def test_without_rescaling_the_norms_the_logits_move() -> None:
    model: Any = _llama()
    _zero_channels(model, ZERO)
    x = example_input(model, batch=2)
    before = _logits(model, x)
    prune_hidden(model, torch.tensor([c for c in range(64) if c not in ZERO]), rescale=False)
    assert float((_logits(model, x) - before).abs().max()) > 1e-3


def _width_recipe(steps: int = 0) -> list[dict[str, Any]]:
    stages: list[dict[str, Any]] = [
        {"method": "prune.hidden", "ratio": 0.25, "round_to": 8},
        {"method": "prune.structured", "ratio": 0.5, "targets": [MLP, "LlamaAttention"],
         "importance": "activation", "calibration_batches": 1},
    ]  # fmt: skip
    if steps:
        stages.append({"method": "distill.finetune", "distill": {"alpha": 1.0},
                       "train": {"steps": steps, "lr": 1e-3, "batch_size": 4}})  # fmt: skip
    return stages


def _pruned(steps: int = 0) -> tuple[Any, torch.Tensor]:
    model = _llama(seed=1)
    x = example_input(model, batch=8)
    task = tensor_task(x, loss="next_token")
    out = st.compress(model, _width_recipe(steps), data=task, ctx=Context(progress=False)).model
    return out.eval(), x


def test_hidden_heads_and_mlp_shapes_save_load_and_transformers_reload(tmp_path: Path) -> None:
    model, x = _pruned()
    layer = model.model.layers[0]
    assert model.config.hidden_size == 48 and model.config.head_dim == 8
    assert layer.self_attn.q_proj.weight.shape == (32, 48)  # 1 of 2 kv groups: 4 query heads
    assert layer.self_attn.k_proj.weight.shape == (8, 48)
    assert layer.mlp.gate_proj.weight.shape == (64, 48) and layer.mlp.down_proj.in_features == 64
    assert layer.input_layernorm.weight.shape == (48,)
    y = _logits(model, x)
    assert y.shape == (8, x.shape[1], VOCAB) and bool(torch.isfinite(y).all())
    st.save(model, tmp_path / "a")
    torch.testing.assert_close(_logits(st.load(tmp_path / "a"), x), y, rtol=0, atol=0)
    export(model, to="hf", out=tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (48, 1, 64)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", local_files_only=True
    )
    torch.testing.assert_close(_logits(loaded, x), y, rtol=1e-5, atol=1e-5)


def test_distillation_after_width_pruning_lowers_the_kl_to_the_original() -> None:
    original: Any = _llama(seed=1)
    x = example_input(original, batch=8)
    teacher = _logits(original, x).log_softmax(-1)

    def kl(model: Any) -> float:
        student = _logits(model, x).log_softmax(-1)
        return float((teacher.exp() * (teacher - student)).sum(-1).mean())

    pruned, recovered = _pruned()[0], _pruned(steps=30)[0]
    assert kl(recovered) < 0.8 * kl(pruned)


def test_activation_importance_keeps_the_loud_channels() -> None:
    model: Any = _llama()
    zero = [*ZERO, 20, 21, 30, 50]  # 8: the kept 56 is a multiple of the 8 heads
    _zero_channels(model, zero)
    x = example_input(model, batch=4)
    stage = {"method": "prune.hidden", "ratio": len(zero) / 64}
    before = _logits(model, x)
    out: Any = st.compress(model, [stage], data=tensor_task(x, loss="next_token")).model
    torch.testing.assert_close(_logits(out, x), before, rtol=1e-4, atol=1e-4)


def test_refusals_name_the_problem() -> None:
    with pytest.raises(UnsupportedModelError, match="hidden size"):
        find_hidden(tiny_bert())
    with pytest.raises(ConfigError, match="--data"):
        st.compress(_llama(), [{"method": "prune.hidden", "ratio": 0.25}])
    with pytest.raises(ConfigError, match="keeps all"):
        st.compress(_llama(), [{"method": "prune.hidden", "ratio": 0.005, "importance": "l2"}])
    with pytest.raises(ConfigError, match="in \\[0, 64\\)"):
        prune_hidden(_llama(), torch.tensor([0, 64]))


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog. " * 8], trainer)
    tok.save(str(path / "tokenizer.json"))


def test_cli_width_recipe_with_distillation(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    src = tmp_path / "src"
    model: Any = tiny_llama(layers=2, vocab=VOCAB, std=0.1)
    model.save_pretrained(src)
    _tokenizer(src)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"stages": _width_recipe(steps=2)}))
    out = tmp_path / "out"
    argv = ["compress", "--model", str(src), "--recipe", str(recipe), "--out", str(out),
            "--data", "builtin:austen", "--llm-windows", "0", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    loaded: Any = st.load(out)
    assert loaded.config.hidden_size == 48
    assert loaded.model.layers[1].mlp.up_proj.weight.shape == (64, 48)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stages": [{"method": "prune.hidden", "ratio": 1.5}]}))
    argv[4], argv[6] = str(bad), str(tmp_path / "out2")
    assert main(argv) == 2
    assert not (tmp_path / "out2").exists()
