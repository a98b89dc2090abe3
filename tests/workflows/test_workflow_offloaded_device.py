"""The devices of the offloaded path (``--max-memory`` with ``--device``): what is computed on
the device, what is written from the CPU, and resuming on another device. Runs on the CPU; the
GPU runs themselves are in tests/runtime/test_cuda_offloaded.py (marked ``cuda``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from slimtorch.calibrate import offload, offload_work
from slimtorch.calibrate.offload import Checkpoint, empty_parameters, materialize
from slimtorch.calibrate.offload_work import (
    OffloadPlan,
    WorkDir,
    input_device,
    place_buffers,
    to_host,
)
from slimtorch.core.context import Context
from slimtorch.formats.artifact import read_artifact
from slimtorch.formats.state import QuantState, WeightState
from slimtorch.models.hf import from_config, read_architecture
from slimtorch.recipe import load_recipe
from slimtorch.workflows.offloaded import compress_large

META = torch.device("meta")
GPTQ = {"stages": [{"method": "quantize.gptq", "bits": 4, "group_size": 16,
                    "calibration": {"samples": 4, "batch_size": 2}}]}  # fmt: skip


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, use_cache=False, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _skeleton(root: Path) -> torch.nn.Module:
    with empty_parameters():
        return from_config(read_architecture(root))


def _plan(tmp_path: Path) -> OffloadPlan:
    return OffloadPlan(tmp_path / "out", {}, tmp_path / "work", "key")


def test_blocks_and_outside_layers_are_materialized_on_the_device(checkpoint: Path) -> None:
    """Read on the CPU, then placed on the device asked for (``meta`` stands in for a GPU
    here: a value read on the CPU and left there would be on ``cpu``); the tie of the
    embedding and the LM head survives; on the CPU the values are the checkpoint's."""
    ckpt = Checkpoint(checkpoint)
    model = _skeleton(checkpoint)
    ties = offload._ties(model)
    assert ties == {"lm_head.weight": "model.embed_tokens.weight"}
    blocks = offload.find_blocks(model)
    offload._materialize_outside(model, blocks, ckpt, ties, META)
    assert model.model.embed_tokens.weight.device == META
    assert model.lm_head.weight is model.model.embed_tokens.weight
    block = model.get_submodule(blocks.names[1])
    materialize(block, blocks.names[1], ckpt, ties, META)
    assert {p.device for p in block.parameters()} == {META}
    materialize(block, blocks.names[1], ckpt, ties)  # default: the CPU
    value = block.self_attn.q_proj.weight
    assert value.device.type == "cpu"
    assert torch.equal(value, ckpt.get(f"{blocks.names[1]}.self_attn.q_proj.weight").float())


def test_place_buffers_moves_buffers_and_leaves_parameters(checkpoint: Path) -> None:
    model = _skeleton(checkpoint)
    real = {n for n, b in model.named_buffers()}
    assert real and all(b.device.type == "cpu" for b in model.buffers())
    place_buffers(model, META)
    assert {n for n, b in model.named_buffers() if b.device == META} == real
    assert all(p.device == META for p in model.parameters())  # never materialized here
    place_buffers(model, torch.device("cpu"))  # meta cannot come back: left as it is
    assert all(b.device == META for b in model.buffers())


def test_inputs_files_are_cpu_and_resume_onto_the_device_of_the_call(tmp_path: Path) -> None:
    """A resumed block's saved inputs go to the device of the call they feed (``meta`` here,
    a GPU in a real run), whatever device wrote them: the files hold CPU tensors."""
    work = WorkDir(_plan(tmp_path), None)
    work.start()
    hidden = [torch.randn(2, 5, 8), torch.randn(1, 8, 5).transpose(1, 2)]  # not contiguous
    calls = [((h,), {"mask": None}) for h in hidden]
    work.save_inputs(1, calls)
    saved = load_file(str(work.inputs_file(1)))
    assert all(t.device.type == "cpu" for t in saved.values())
    back = work.load_inputs(1, calls)
    assert all(torch.equal(b[0][0], h) and b[1] == {"mask": None} for b, h in zip(back, hidden))
    on_meta = [((torch.empty(h.shape, device=META),), {"mask": None}) for h in hidden]
    moved = work.load_inputs(1, on_meta)
    assert [input_device(c) for c in moved] == [META, META]
    assert [c[0][0].shape for c in moved] == [h.shape for h in hidden]
    assert input_device(((), {})) == torch.device("cpu")


def _state(codes: torch.Tensor, codebook: torch.Tensor | None = None) -> WeightState:
    q = QuantState("affine", 4, False, "per_channel", codes, torch.ones(codes.shape[0], 1),
                   torch.zeros(codes.shape[0], 1, dtype=torch.int32), codebook=codebook)  # fmt: skip
    return WeightState(mask=codes > 0, quant=q)


def test_to_host_passes_cpu_tensors_as_they_are() -> None:
    """On the CPU nothing is copied: the artifact is written from the very tensors (and
    state objects) it was before the device path existed."""
    w = torch.randn(4, 4)
    tensors = {"a.weight": w, "b.weight": w.detach(), "c.bias": torch.zeros(4)}
    states = {"a.weight": _state(torch.randint(0, 16, (4, 4)))}
    out, out_states = to_host(tensors, states)
    assert all(out[k] is v for k, v in tensors.items())
    assert out_states["a.weight"] is states["a.weight"]


def test_to_host_copies_device_tensors_keeping_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off the host, every tensor and every tensor field of a state is copied, and views of one
    storage share one copy (a tied LM head, a codebook two layers share), so the artifact finds
    the same aliases. The "host" is ``meta`` here so that CPU tensors count as on a device."""
    monkeypatch.setattr(offload_work, "HOST", META)
    w, book = torch.randn(4, 4), torch.randn(16)
    tensors = {"embed.weight": w.detach(), "head.weight": w.detach(), "other": w.clone()}
    states = {"embed.weight": _state(torch.randint(0, 16, (4, 4)), book),
              "head.weight": _state(torch.randint(0, 16, (4, 4)), book)}  # fmt: skip
    out, out_states = to_host(tensors, states)
    assert all(t.device == META for t in out.values())
    assert out["embed.weight"] is out["head.weight"] and out["other"] is not out["head.weight"]
    for state in out_states.values():
        q = state.quant
        assert q is not None and state.mask is not None and state.mask.device == META
        assert {q.codes.device, q.scale.device, q.zero_point.device} == {META}
        assert (q.scheme, q.bits, q.granularity) == ("affine", 4, "per_channel")
    a, b = (out_states[k].quant for k in ("embed.weight", "head.weight"))
    assert a is not None and b is not None and a.codebook is b.codebook
    assert states["embed.weight"].quant.codes.device.type == "cpu"  # type: ignore[union-attr]


def test_resume_reads_cpu_inputs_and_gives_the_same_artifact(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An offloaded GPTQ run killed after block 0 resumes from the saved (CPU) inputs to the
    artifact of an uninterrupted run, bit for bit; every tensor handed to the artifact writer
    and to the inputs files is a CPU tensor."""
    rec = load_recipe(GPTQ)
    ctx = Context(progress=False)
    compress_large(checkpoint, rec, tmp_path / "whole", None, 10**10, tmp_path / "w1", ctx,
                   tokenizer="builtin:austen-lm")  # fmt: skip
    devices: set[str] = set()
    writer, saver = offload.write_artifact, offload_work.save_file

    def write(path: Path, tensors: dict, states: dict, *args: object, **kw: object) -> None:
        devices.update(t.device.type for t in tensors.values())
        devices.update(s.quant.codes.device.type for s in states.values() if s.quant)
        writer(path, tensors, states, *args, **kw)

    def save(tensors: dict, path: str) -> None:
        devices.update(t.device.type for t in tensors.values())
        saver(tensors, path)

    done = WorkDir.block_done

    def stop_after_first(self: WorkDir, block: int) -> None:
        done(self, block)
        if block == 0:
            raise KeyboardInterrupt  # a kill after block 0 was marked done

    monkeypatch.setattr(offload, "write_artifact", write)
    monkeypatch.setattr(offload_work, "save_file", save)
    monkeypatch.setattr(WorkDir, "block_done", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        compress_large(checkpoint, rec, tmp_path / "again", None, 10**10, tmp_path / "w2", ctx,
                       tokenizer="builtin:austen-lm")  # fmt: skip
    assert (tmp_path / "w2" / "inputs00001.rank0.safetensors").is_file()
    monkeypatch.setattr(WorkDir, "block_done", done)
    compress_large(checkpoint, rec, tmp_path / "again", None, 10**10, tmp_path / "w2", ctx,
                   tokenizer="builtin:austen-lm")  # fmt: skip
    assert devices == {"cpu"}
    whole, again = read_artifact(tmp_path / "whole"), read_artifact(tmp_path / "again")
    assert whole.tensors.keys() == again.tensors.keys() and len(again.states) == 3 * 7
    for name, t in whole.tensors.items():
        assert torch.equal(again.tensors[name], t), name
    for name, s in whole.states.items():
        assert torch.equal(again.states[name].quant.codes, s.quant.codes), name  # type: ignore[union-attr]
