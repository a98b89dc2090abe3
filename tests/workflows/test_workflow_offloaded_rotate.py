"""``quantize.rotate`` (QuaRot) on the offloaded path (``--max-memory``): each block rotated as it
is read, the embedding / final norm / LM head where the run handles them. The artifact of
[rotate + RTN] and [rotate + GPTQ (+ 8-bit embedding and head)] is the in-memory one tensor for
tensor (tied and untied heads, online Hadamards), loads with the same logits, survives a kill
and a resume, and is the same from two torchrun ranks (slow); what does not fit is refused up
front with the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.recipe import load_recipe
from slimtorch.workflows.offloaded import compress_large

HERE = Path(__file__).resolve()
CTX = Context(progress=False)
ROTATE = {"method": "quantize.rotate", "online_hadamard": True}
RTN = {"method": "quantize.rtn", "bits": 4, "group_size": 16, "targets": ["Linear"],
       "ignore": ["lm_head"]}  # fmt: skip
GPTQ = {"method": "quantize.gptq", "bits": 4, "group_size": 16,
        "calibration": {"samples": 4, "batch_size": 2}}  # fmt: skip
HEADS = {"method": "quantize.rtn", "bits": 8, "granularity": "per_channel",
         "targets": ["Embedding", "lm_head", "embed_out"], "missing": "skip"}  # fmt: skip


def _checkpoint(path: Path, tied: bool, layers: int = 3) -> Path:
    """A tiny Llama whose norm scales are not 1 (folding them is then not trivial); widths with
    Paley factors: residual 48 = 12 x 4, heads of 12, down_proj input 96 = 12 x 8."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, use_cache=False, tie_word_embeddings=tied,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif p.dim() == 2:
                p.normal_(0, 0.1, generator=gen)
    model.save_pretrained(path)
    return path


def _text(path: Path) -> str:
    """A small calibration text (tokenizing the default corpus would take most of the test),
    written once (torchrun ranks read the file the test wrote)."""
    if path.is_file():
        return str(path)
    words = ["the", "rotation", "keeps", "every", "block's", "function", "while", "its",
             "outliers", "spread", "out"]  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    picks = torch.randint(0, len(words), (3000,), generator=gen).tolist()
    path.write_text(" ".join(words[i] for i in picks))
    return str(path)


def _in_memory(ckpt: Path, stages: list[dict[str, Any]], out: Path) -> None:
    import slimtorch as st
    from slimtorch.calibrate.tasks import make_task
    from slimtorch.models.hf import load_directory

    loaded = load_directory(ckpt)
    task = make_task("causal-lm", _text(ckpt.parent / "cal.txt"), "builtin:austen-lm")
    st.save(st.compress(loaded.model, {"stages": stages}, data=task, ctx=CTX).model, out)


def _offloaded(ckpt: Path, stages: list[dict[str, Any]], out: Path, work: Path) -> None:
    compress_large(ckpt, load_recipe({"stages": stages}), out, _text(ckpt.parent / "cal.txt"),
                   10**10, work, CTX, tokenizer="builtin:austen-lm")  # fmt: skip


def _assert_same(off: Path, mem: Path) -> None:
    from slimtorch.formats.artifact import read_artifact, read_manifest

    a, b = read_artifact(off), read_artifact(mem)
    assert a.tensors.keys() == b.tensors.keys() and a.states.keys() == b.states.keys()
    for name, t in b.tensors.items():
        assert torch.equal(a.tensors[name], t), name
    for name, s in b.states.items():  # the same codes, scales and zero points
        o = a.states[name]
        assert s.quant is not None and o.quant is not None, name
        assert torch.equal(o.quant.codes, s.quant.codes), name
        assert torch.equal(o.quant.scale, s.quant.scale), name
    ma, mb = read_manifest(off), read_manifest(mem)
    assert ma["modules"] == mb["modules"]
    assert ma.get("aliases", {}) == mb.get("aliases", {}) == {}  # the head is untied
    tie = [m["architecture"]["config"].get("tie_word_embeddings") for m in (ma, mb)]
    assert tie == [False, False]


def _logits(path: Path) -> torch.Tensor:
    import slimtorch as st

    model: Any = st.load(path)
    ids = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(ids).logits  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("stages", "tied"),
    [([ROTATE, RTN], False), ([ROTATE, GPTQ, HEADS], True),
     ([{**ROTATE, "online_hadamard": False, "online_o_proj": True}, GPTQ], False)],
    ids=["rtn", "gptq-heads-tied", "gptq-online-o"],
)  # fmt: skip
def test_offloaded_rotation_equals_in_memory(
    stages: list[dict[str, Any]], tied: bool, tmp_path: Path
) -> None:
    from slimtorch.formats.artifact import read_manifest
    from slimtorch.runtime import OnlineHadamardLinear

    ckpt = _checkpoint(tmp_path / "ckpt", tied)
    _offloaded(ckpt, stages, tmp_path / "off", tmp_path / "w")
    _in_memory(ckpt, stages, tmp_path / "mem")
    _assert_same(tmp_path / "off", tmp_path / "mem")
    assert read_manifest(tmp_path / "off")["metadata"]["offloaded"] is True
    online = [m for m in read_manifest(tmp_path / "off")["modules"]
              if m["type"] == "OnlineHadamardLinear"]  # fmt: skip
    assert len(online) == 3  # one per block
    assert torch.equal(_logits(tmp_path / "off"), _logits(tmp_path / "mem"))
    import slimtorch as st

    model: Any = st.load(tmp_path / "off")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), OnlineHadamardLinear) \
        is bool(stages[0]["online_hadamard"])  # fmt: skip
    assert all(bool((p == 1).all()) for n, p in model.named_parameters() if "norm" in n)


def test_rotated_offloaded_run_resumes_after_a_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted as block 2 (of 3) is rotated, the same command resumes after block 1: the
    outside layers are rotated again before the saved inputs of block 2 are read, and the
    artifact is the uninterrupted one."""
    from slimtorch.quantize.stages.rotate import RotateParts

    stages = [ROTATE, GPTQ, HEADS]
    ckpt = _checkpoint(tmp_path / "ckpt", tied=True)
    _offloaded(ckpt, stages, tmp_path / "whole", tmp_path / "w1")
    original = RotateParts.compress

    def crash(self: RotateParts, name: str, block: Any, stats: Any) -> None:
        if name == "model.layers.2":
            raise KeyboardInterrupt
        original(self, name, block, stats)

    monkeypatch.setattr(RotateParts, "compress", crash)
    with pytest.raises(KeyboardInterrupt):
        _offloaded(ckpt, stages, tmp_path / "again", tmp_path / "w2")
    progress = json.loads((tmp_path / "w2" / "progress.json").read_text())
    assert progress["done"] == 1 and not (tmp_path / "again").exists()
    monkeypatch.setattr(RotateParts, "compress", original)
    _offloaded(ckpt, stages, tmp_path / "again", tmp_path / "w2")
    _assert_same(tmp_path / "again", tmp_path / "whole")
    assert not (tmp_path / "w2").exists()


def test_refusals(tmp_path: Path) -> None:
    """Rotation after another stage, a model that is no Llama (a Mixtral: MoE blocks, refused
    in memory too) and a block whose output the rotation changes: refused before any block is
    written, naming the fix (the w4a8/w4a4 presets' per-token activations run offloaded:
    test_workflow_offloaded_swaps.py)."""
    from slimtorch.testing.models import tiny_moe

    ckpt = _checkpoint(tmp_path / "ckpt", tied=False, layers=2)
    with pytest.raises(ConfigError, match=r"quantize\.rotate must come before every other stage"):
        _offloaded(ckpt, [GPTQ, ROTATE], tmp_path / "o", tmp_path / "w")
    moe: Any = tiny_moe("mixtral", vocab=2048, hidden=32, intermediate=32, experts=4, top_k=1)
    moe.save_pretrained(tmp_path / "moe")
    with pytest.raises(UnsupportedModelError, match=r"model.layers.0 has no 'mlp.gate_proj'"):
        _offloaded(tmp_path / "moe", [ROTATE, GPTQ], tmp_path / "o", tmp_path / "w")
    with pytest.raises(ConfigError, match="no targets"):
        _offloaded(ckpt, [{**ROTATE, "targets": ["Linear"]}], tmp_path / "o", tmp_path / "w")
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_each_block_is_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``verify`` offloaded: a block whose rotated output is not its output rotated (here: a
    block that skips its residual, which no rotation commutes with) fails naming the block."""
    from transformers.models.llama import modeling_llama

    ckpt = _checkpoint(tmp_path / "ckpt", tied=False, layers=2)
    forward = modeling_llama.LlamaDecoderLayer.forward

    def no_residual(self: Any, hidden_states: torch.Tensor, *args: Any, **kw: Any) -> Any:
        out = forward(self, hidden_states, *args, **kw)
        first = out[0] if isinstance(out, tuple) else out
        odd = first - hidden_states + hidden_states.abs()  # |h|: not equivariant
        return (odd, *out[1:]) if isinstance(out, tuple) else odd

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", no_residual)
    with pytest.raises(UnsupportedModelError, match=r"output of model.layers.0"):
        _offloaded(ckpt, [ROTATE, RTN], tmp_path / "o", tmp_path / "w")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ two ranks (torchrun)


@pytest.mark.slow
def test_two_ranks_give_the_one_process_artifact(tmp_path: Path) -> None:
    """``--max-memory`` under torchrun (2 gloo ranks; the estimate without the process's own
    memory so that the tiny checkpoint runs offloaded): the one-process artifact."""
    ckpt = _checkpoint(tmp_path / "ckpt", tied=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"stages": [ROTATE, GPTQ, HEADS]}))
    assert _cli(ckpt, recipe, tmp_path / "one", tmp_path / "w1")["offloaded"] is True
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*cmd, str(HERE), str(ckpt), str(recipe), str(tmp_path / "two"), str(tmp_path / "w2")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _assert_same(tmp_path / "two", tmp_path / "one")
    assert not (tmp_path / "w2").exists()


def _cli(ckpt: Path, recipe: Path, out: Path, work: Path) -> dict[str, Any]:
    from slimtorch.workflows import offloaded
    from slimtorch.workflows.compress import CompressOptions, compress_to_dir

    offloaded._resident_now = lambda: 0  # type: ignore[assignment]
    text = _text(ckpt.parent / "cal.txt")
    options = CompressOptions(max_memory="1MB", work_dir=str(work), llm_windows=0,
                              tokenizer="builtin:austen-lm", data=text)  # fmt: skip
    return compress_to_dir(str(ckpt), str(recipe), out, options, CTX)


if __name__ == "__main__":  # a rank of test_two_ranks_give_the_one_process_artifact
    from slimtorch.calibrate import distributed
    from slimtorch.calibrate.distributed import exit_rank

    try:
        distributed.init_from_env("cpu")
        try:
            report = _cli(*(Path(a) for a in sys.argv[1:5]))
            assert report.get("offloaded") is True or report["out"] is None
        finally:
            distributed.shutdown()
    except BaseException:
        traceback.print_exc()
        exit_rank(1)
    exit_rank(0)
