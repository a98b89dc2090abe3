"""Builtin ``austen-lm``: a small Llama causal LM (grouped-query attention) trained by the project.

The model is ``transformers.LlamaForCausalLM`` (8 query heads sharing 2 key/value heads, SwiGLU,
RMSNorm, rotary positions, tied embeddings) trained on the train split of the Jane Austen novels
and the Wikipedia sample (``python -m slimtorch.zoo.train_austen_lm``). Its byte-level BPE
tokenizer (``tokenizer.json``) was trained offline with ``tokenizers`` on the same text.

The committed files in ``zoo/weights/austen_lm/`` form a Hugging Face directory
(``config.json``, ``model.safetensors``, ``tokenizer.json``): ``slimtorch`` loads it as
``builtin:austen-lm`` and transformers loads it with ``from_pretrained(local_files_only=True)``.
Quality: evaluator ``perplexity`` on the held-out split of ``builtin:austen`` (the last 10% of
each novel). Fine-tuning and calibration task: ``causal-lm``.
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from slimtorch.calibrate.text import TOKENIZERS
from slimtorch.core.errors import ArtifactError, UserInputError
from slimtorch.models.registry import MODELS, BuiltinModel

WEIGHTS_DIR = Path(__file__).parent / "weights" / "austen_lm"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
EXAMPLE_SEQ_LEN = 128
DEFAULT_TRAIN_DATA = "builtin:austen+builtin:wikipedia"
EVAL_DATA = "builtin:austen"
TRAIN_CMD = "python -m slimtorch.zoo.train_austen_lm --out src/slimtorch/zoo/weights/austen_lm"


def llama_config(vocab_size: int, **overrides: Any) -> Any:
    """The builtin's ``LlamaConfig`` (4 layers, hidden 256, 8 heads / 2 KV heads, context 256)."""
    from transformers import LlamaConfig

    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 640,  # SwiGLU, 2.5x; a multiple of 128 for group-wise quantization
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "architectures": ["LlamaForCausalLM"],
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


def _missing(path: Path) -> ArtifactError:
    return ArtifactError(
        f"builtin:austen-lm is missing {path}; reinstall slimtorch or retrain it with `{TRAIN_CMD}`"
    )


def read_config(directory: Path | None = None) -> Any:
    """The ``LlamaConfig`` saved in ``directory`` (default: the builtin's; no weights read)."""
    from transformers import LlamaConfig

    path = (directory or WEIGHTS_DIR) / CONFIG_FILE
    if not path.is_file():
        raise _missing(path)
    return LlamaConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))


def from_config(config: Any) -> nn.Module:
    """A fresh fp32 ``LlamaForCausalLM`` (sdpa attention) for ``config``."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()  # type: ignore[no-any-return]


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors state dict (fp16 or fp32) into ``model`` as fp32, strictly."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise _missing(path)
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"{path} does not fit the config beside it (missing {missing[:4]}, unexpected"
            f" {unexpected[:4]}); retrain with `{TRAIN_CMD}`"
        )
    if tied:
        model.tie_weights()  # type: ignore[operator]


def build(pretrained: bool) -> nn.Module:
    """The builtin; ``pretrained=False`` builds the architecture from its config only."""
    model = from_config(read_config())
    # Where the tokenizer lives: the perplexity evaluator looks here (as for from_pretrained).
    config: Any = model.config
    config._name_or_path = str(WEIGHTS_DIR)
    if pretrained:
        load_weights(model, WEIGHTS_DIR / WEIGHTS_FILE)
    return model.eval()


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | Path) -> Any:
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` (or a directory holding it)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        if path.parent == WEIGHTS_DIR:
            raise _missing(path)
        raise UserInputError(
            f"no tokenizer at {path}; give a tokenizer.json file or a directory holding one"
        )
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


def builtin_tokenizer_path() -> Path:
    """``tokenizer.json`` of the builtin."""
    return WEIGHTS_DIR / TOKENIZER_FILE


def text_split(spec: str, split: Literal["train", "heldout"]) -> str:
    """The ``split`` of text specs joined by ``+`` (``builtin:austen``, ``builtin:wikipedia``,
    a ``.txt`` path): per novel / article / file, held out = its last 10% of characters."""
    from slimtorch.calibrate.text import load_text
    from slimtorch.zoo import data_text

    parts = []
    for part in (p.strip() for p in spec.split("+")):
        if part == "builtin:austen":
            parts.append(data_text.austen_split(split))
        elif part == "builtin:wikipedia":
            articles = data_text.load_wikipedia()
            parts.append("\n\n".join(data_text.split_text(a, split) for a in articles))
        else:
            parts.append(data_text.split_text(load_text(part), split))
    return "\n\n".join(parts)


CHUNK_CHARS = 1 << 16


def safe_cuts(text: str, size: int | None = None) -> list[int]:
    """Cut points about every ``size`` characters where byte-level BPE cannot merge across.

    A cut goes right after a newline with a non-space character on both sides: GPT-2's
    pre-tokenizer regex makes that newline a piece of its own wherever the text ends, so
    encoding the chunks one by one gives exactly the tokens of the whole text.
    """
    size = size or CHUNK_CHARS
    cuts, pos = [0], size
    while pos < len(text):
        i = text.find("\n", pos)
        while i != -1 and (
            i + 1 >= len(text) or text[i + 1].isspace() or i == 0 or text[i - 1].isspace()
        ):
            i = text.find("\n", i + 1)
        if i == -1:
            break
        cuts.append(i + 1)
        pos = i + 1 + size
    cuts.append(len(text))
    return cuts


def _chunkable(tokenizer: Any) -> bool:
    """Whether :func:`safe_cuts` keeps ``tokenizer``'s tokens: no normalizer, no added token
    holding a newline, and a pre-tokenizer that is GPT-2's byte-level regex split (no prefix
    space), alone or after ``Digits`` splits (SmolLM2, StarCoder: digits split off never cross
    a cut, which lies between a newline and a non-space character)."""
    if tokenizer.normalizer is not None or tokenizer.pre_tokenizer is None:
        return False
    added = [str(t.content) for t in tokenizer.get_added_tokens_decoder().values()]
    if any("\n" in content for content in added):
        return False
    pre = json.loads(tokenizer.pre_tokenizer.__getstate__())
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
    if not steps:
        return False
    *first, last = steps
    return (
        last.get("type") == "ByteLevel"
        and not last.get("add_prefix_space", True)
        and bool(last.get("use_regex", False))
        and all(step.get("type") == "Digits" for step in first)
    )


def encode(text: str, tokenizer: Any) -> torch.Tensor:
    """Token ids (int64) of ``text`` as one stream, no special tokens added.

    A long text under a byte-level BPE tokenizer is encoded in chunks cut where no merge can
    cross (:func:`safe_cuts`): the same ids, without the tokenizer's per-token objects for
    the whole text at once (encoding 6 MB of text whole peaks at about 1 GB; SmolLM2's
    2.8M-character Wikipedia train split: +400 MB whole, +18 MB in chunks). Short texts are
    encoded whole.
    """
    cuts = safe_cuts(text) if len(text) > CHUNK_CHARS and _chunkable(tokenizer) else [0, len(text)]
    parts = [
        torch.tensor(tokenizer.encode(text[a:b], add_special_tokens=False).ids, dtype=torch.int64)
        for a, b in itertools.pairwise(cuts)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


@functools.lru_cache(maxsize=8)
def encoded_split(
    spec: str, split: Literal["train", "heldout"], tokenizer_path: str | None = None
) -> torch.Tensor:
    """Token ids of ``split`` of ``spec`` under a tokenizer (default: the builtin's); cached."""
    tok = load_tokenizer(tokenizer_path or builtin_tokenizer_path())
    ids = encode(text_split(spec, split), tok)
    if ids.numel() < 2:
        raise UserInputError(f"the {split} split of {spec!r} has under 2 tokens; give more text")
    return ids


def example_inputs(batch: int) -> tuple[torch.Tensor]:
    """``(input_ids,)`` int64 ``[batch, 128]``: consecutive windows of held-out Austen text."""
    ids = encoded_split(EVAL_DATA, "heldout")
    n = ids.numel() // EXAMPLE_SEQ_LEN
    rows = [(i % n) * EXAMPLE_SEQ_LEN for i in range(batch)]
    return (torch.stack([ids[r : r + EXAMPLE_SEQ_LEN] for r in rows]),)


MODELS.add(
    "austen-lm",
    BuiltinModel(
        name="austen-lm",
        summary="Llama causal LM with GQA (4 layers, hidden 256, 8/2 heads) on Austen + Wikipedia",
        build=build,
        evaluator="perplexity",
        data=EVAL_DATA,
        example_inputs=example_inputs,
        task="causal-lm",
    ),
)
TOKENIZERS.add("austen-lm", builtin_tokenizer_path)
