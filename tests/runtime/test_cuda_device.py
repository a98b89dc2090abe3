"""``Context.device`` / ``--device``: checked and normalised; a missing GPU is a clear error."""

from __future__ import annotations

import argparse

import pytest
import torch

from slimtorch.cli.options import add_common, context
from slimtorch.core.context import Context, resolve_device
from slimtorch.core.errors import ConfigError

HAS_CUDA = torch.cuda.is_available()


def test_resolve_device() -> None:
    assert resolve_device("cpu") == "cpu" and resolve_device(torch.device("cpu")) == "cpu"
    assert resolve_device(" CPU ") == "cpu"
    assert resolve_device("auto") == ("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(ConfigError, match="--device cpu"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="not supported"):
        resolve_device("meta")


@pytest.mark.skipif(HAS_CUDA, reason="checks the message without a GPU")
def test_cuda_without_gpu_says_what_to_do() -> None:
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="auto"):
        Context(device="cuda:0")


def test_context_device_and_cli_flag() -> None:
    assert Context().device == "cpu" and Context().torch_device == torch.device("cpu")
    assert Context(device="auto").device in ("cpu", "cuda")
    parser = argparse.ArgumentParser()
    add_common(parser)
    args = parser.parse_args(["--device", "cpu", "--seed", "3", "--quiet"])
    ctx = context(args)
    assert (ctx.device, ctx.seed, ctx.progress) == ("cpu", 3, False)
    assert context(parser.parse_args([])).device == "cpu"
    if not HAS_CUDA:
        with pytest.raises(ConfigError, match="no CUDA"):
            context(parser.parse_args(["--device", "cuda"]))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (CI has none)")
def test_cuda_device_resolves() -> None:
    assert resolve_device("cuda") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(ConfigError, match="visible"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
