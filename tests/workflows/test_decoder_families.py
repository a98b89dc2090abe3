"""Decoder families x LLM presets, through the CLI on tiny Hugging Face directories.

Every layer-wise preset (the presets whose description starts with "LLM"), structured-50 and
``export --to hf`` (driven through the workflows behind the commands) either work on each family's tiny random-init checkpoint (saved with
``save_pretrained`` beside a tiny tokenizer; Gemma2/Gemma3/Cohere2 alternate sliding-window and
global attention, calibrated on sequences longer than the window) or exit 2 with a message
naming what is unsupported (a UserInputError, which ``slimtorch`` prints without a traceback):
never any other exception (exit 1). Working means: the artifact reloads
with ``slimtorch.load`` and gives the logits of the in-memory ``slimtorch.compress`` of the same
recipe on the same data, and its ``export --to hf`` directory loads in transformers with those
logits. The default suite runs a few cells; the whole matrix is marked slow
(``python tests/workflows/test_decoder_families.py`` prints it as a table).
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
import yaml

from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError

PRESETS_DIR = Path(__file__).parents[2] / "src" / "slimtorch" / "recipe" / "presets"
VOCAB = 512
HIDDEN = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)
DECODER = dict(**HIDDEN, num_hidden_layers=2, num_key_value_heads=2, vocab_size=VOCAB)
SLIDING = dict(num_hidden_layers=4, sliding_window=16)  # calibration windows are longer

# family -> (config class, model class, config keywords); only those transformers here has
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", DECODER),
    "mistral": ("MistralConfig", "MistralForCausalLM", DECODER),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", DECODER),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**DECODER, "head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**DECODER, "pad_token_id": 0}),
    "phi": ("PhiConfig", "PhiForCausalLM", DECODER),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**DECODER, "head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**DECODER, "head_dim": 16, **SLIDING}),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {**DECODER, "head_dim": 16, **SLIDING, "sliding_window_pattern": 2},
    ),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", {**DECODER, **SLIDING}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", DECODER),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", DECODER),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", DECODER),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=512),
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            vocab_size=VOCAB,
            max_position_embeddings=512,
        ),
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {**HIDDEN, "num_hidden_layers": 2, "vocab_size": VOCAB},
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB),
    ),
    "gptj": (
        "GPTJConfig",
        "GPTJForCausalLM",
        dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=VOCAB, n_positions=512),
    ),
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB),
    ),
}
FAMILIES = {k: v for k, v in FAMILIES.items() if hasattr(transformers, v[1])}


def presets() -> list[str]:
    """The layer-wise LLM presets (description "LLM ...") and structured-50."""
    found = []
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        if yaml.safe_load(path.read_text())["description"].startswith("LLM"):
            found.append(path.stem)
    return [*found, "structured-50"]


@cache
def _tokenizer_json() -> str:
    """A tiny byte-level BPE (fewer tokens than ``VOCAB``) trained on builtin:wikipedia text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from slimtorch.calibrate.text import load_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 64, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([load_text("builtin:wikipedia")[:50_000]], trainer)
    return str(tok.to_str())


def save_family(family: str, path: Path) -> Path:
    """A random-init checkpoint of ``family`` with its tokenizer.json, saved in ``path``."""
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kwargs, use_cache=False)
    getattr(transformers, model_cls)(config).save_pretrained(path)
    (path / "tokenizer.json").write_text(_tokenizer_json())
    return path


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # type: ignore[no-any-return]


def _exit2(exc: UserInputError) -> str:
    """What ``slimtorch`` prints for it (``main`` exits 2 on a UserInputError, no traceback)."""
    return str(exc).strip()


def run_cell(family: str, preset: str, tmp: Path) -> str:
    """Compress ``family`` with ``preset`` and export it to hf (the workflows behind
    ``slimtorch compress`` and ``slimtorch export``); "ok", or "compress/export exit 2: <the
    message>". Any other exception is exit 1 (a traceback) and fails. Asserts what "ok" means."""
    import slimtorch as st
    from slimtorch.calibrate.tasks import make_task
    from slimtorch.core.info import update_info
    from slimtorch.models import load_model
    from slimtorch.recipe import load_recipe
    from slimtorch.workflows.compress import CompressOptions, compress_to_dir
    from slimtorch.workflows.export import export_dir

    src = save_family(family, tmp / f"{family}-hf")
    out = tmp / f"{family}-{preset}"
    # data only where the recipe needs it (structured-50 then skips its optional fine-tuning)
    data = "builtin:wikipedia" if load_recipe(preset).needs_data else None
    options = CompressOptions(data=data, llm_windows=0)
    try:
        compress_to_dir(str(src), preset, out, options, Context(progress=False))
    except UserInputError as exc:
        assert not out.exists()
        return "compress exit 2: " + _exit2(exc)
    ids = torch.randint(0, VOCAB - 64, (2, 40), generator=torch.Generator().manual_seed(3))
    reloaded = _logits(st.load(out).eval(), ids)
    assert torch.isfinite(reloaded).all()
    loaded = load_model(str(src))
    update_info(loaded.model, architecture=loaded.architecture)  # as compress_to_dir does
    task = data and make_task("causal-lm", data, str(src / "tokenizer.json"))
    in_memory = st.compress(loaded.model, preset, data=task or None).model.eval()
    torch.testing.assert_close(reloaded, _logits(in_memory, ids), rtol=1e-4, atol=1e-4)
    exported = tmp / f"{out.name}-export"
    try:
        export_dir(out, "hf", exported)
    except UserInputError as exc:
        assert not exported.exists()
        return "export exit 2: " + _exit2(exc)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    torch.testing.assert_close(_logits(hf_model, ids), reloaded, rtol=1e-4, atol=1e-4)
    return "ok"


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny models: one thread is faster than several fighting over a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DEFAULT = [("llama", "w4a16-gptq"), ("gemma2", "w4a16-gptq"), ("gpt2", "wanda-2of4")]


@pytest.mark.parametrize(("family", "preset"), DEFAULT)
def test_default_cells(family: str, preset: str, tmp_path: Path) -> None:
    assert run_cell(family, preset, tmp_path) == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("preset", presets())
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matrix(family: str, preset: str, tmp_path: Path) -> None:
    result = run_cell(family, preset, tmp_path)
    assert result == "ok" or "exit 2: " in result


if __name__ == "__main__":  # the matrix as a table: python tests/workflows/test_decoder_families.py
    import tempfile

    only = sys.argv[1:] or sorted(FAMILIES)
    torch.set_num_threads(1)
    for fam in only:
        for name in presets():
            with tempfile.TemporaryDirectory() as d:
                try:
                    cell = run_cell(fam, name, Path(d))
                except Exception as exc:  # exit 1 in the CLI: a defect to fix
                    cell = f"FAILED ({type(exc).__name__}): " + str(exc).strip()[:400]
            print(f"{fam:10s} {name:18s} {cell}", flush=True)
