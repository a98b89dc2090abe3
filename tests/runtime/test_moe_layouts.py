"""Fused experts stored transposed, interleaved and with biases (gpt-oss, Llama 4) run as one
Linear per expert: same logits, every method reaches them, fused back for transformers, read
offloaded from the checkpoints transformers writes (and gpt-oss's MXFP4 blocks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from safetensors import safe_open
from safetensors.torch import save_file

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.formats.floats import decode_e2m1
from slimtorch.runtime.moe import (
    ExpertLayout,
    UnfusedExperts,
    checkpoint_names,
    fused_state,
    unfuse,
    unfuse_experts,
)
from slimtorch.runtime.moe_layouts import Part, decode_mxfp4, fused_form

KINDS = ["gpt_oss", "llama4"]
EXPERTS, LAYERS = 4, 2
MOE = {"gpt_oss": "mlp", "llama4": "feed_forward"}  # the MoE block's name in a decoder layer


def tiny(kind: str, vocab: int = 128, hidden: int = 64, intermediate: int = 32) -> Any:
    """A small random-init gpt-oss or Llama 4 (text) causal LM, eval, carrying its ``hf``
    architecture; weights N(0, 0.1) (biases too), gpt-oss's layer 0 gate/up x10 so that its
    SwiGLU clamps at ``limit``."""
    import transformers

    from slimtorch.core.info import update_info

    torch.manual_seed(0)
    common: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=EXPERTS, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    config: Any
    if kind == "gpt_oss":
        config = transformers.GptOssConfig(num_experts_per_tok=2, sliding_window=8, **common)
        cls: Any = transformers.GptOssForCausalLM
    else:
        config = transformers.Llama4TextConfig(
            num_experts_per_tok=1, intermediate_size_mlp=2 * intermediate, **common
        )
        cls = transformers.Llama4ForCausalLM
    model = cls._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("router.bias"):
                p.normal_(0, 0.1)
        if kind == "gpt_oss":
            model.model.layers[0].mlp.experts.gate_up_proj.mul_(10)
    arch = {"kind": "hf", "class": cls.__name__, "config": config.to_dict()}
    update_info(model, architecture={**arch, "attn_implementation": "eager", "dtype": "float32"})
    return model


def _ids(batch: int = 2, length: int = 12, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def _experts(kind: str, layer: int = 0) -> str:
    return f"model.layers.{layer}.{MOE[kind]}.experts"


@pytest.mark.parametrize("kind", KINDS)
def test_unfused_model_gives_the_same_logits(kind: str) -> None:
    model = tiny(kind)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        names = unfuse_experts(model)
        after = model(ids).logits
    assert names == [_experts(kind, i) for i in range(LAYERS)]
    experts = model.get_submodule(names[0])
    assert isinstance(experts, UnfusedExperts)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    ours = [n for n in linears if ".experts." in n]
    assert len(ours) == LAYERS * EXPERTS * 3
    assert all((linears[n].bias is not None) == (kind == "gpt_oss") for n in ours)
    if kind == "gpt_oss":  # the clamped SwiGLU was exercised: some gates exceed the limit
        assert experts.layout == ExpertLayout(True, True, True, 1.702, 7.0)
        with torch.no_grad():
            x = model.model.layers[0].post_attention_layernorm(model.model.embed_tokens(ids))
            assert float(experts.experts()[0].gate_proj(x).max()) > 7.0
    else:
        assert experts.layout == ExpertLayout(transposed=True)
        assert type(model.model.layers[0].feed_forward.router).__name__ == "Llama4Router"


@pytest.mark.parametrize("kind", KINDS)
def test_fused_state_rebuilds_the_exact_fused_layout(kind: str) -> None:
    fused = tiny(kind).get_submodule(_experts(kind))
    stored = {k: v.detach().clone() for k, v in fused.named_parameters()}
    back = fused_state(unfuse(fused))
    assert sorted(back) == sorted(stored)
    for key, value in stored.items():
        assert torch.equal(back[key], value), key
    gate = unfuse(fused).experts()[1].gate_proj.weight  # gpt-oss: even columns, transposed
    cols = slice(0, None, 2) if kind == "gpt_oss" else slice(0, fused.gate_up_proj.shape[2] // 2)
    assert torch.equal(gate, fused.gate_up_proj[1][:, cols].T)


def test_layouts_that_are_not_understood_are_refused_by_name() -> None:
    class Odd(torch.nn.Module):
        def __init__(self, bias: bool, gate_up: tuple[int, ...]) -> None:
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(gate_up))
            self.down_proj = torch.nn.Parameter(torch.zeros(2, 4, 4))
            if bias:
                self.gate_up_proj_bias = torch.nn.Parameter(torch.zeros(2, 8))
            self.act_fn = torch.nn.SiLU()

        def forward(self, x, index, weights):  # type: ignore[no-untyped-def]
            return x

    with pytest.raises(UnsupportedModelError, match="expert biases other than"):
        unfuse(Odd(True, (2, 8, 4)))
    with pytest.raises(UnsupportedModelError, match="neither"):
        unfuse(Odd(False, (2, 6, 4)))

    class Packed(Odd):  # transformers' MXFP4 kernels' experts hold uint8 blocks
        def __init__(self) -> None:
            super().__init__(False, (2, 8, 4))
            self.gate_up_proj = torch.nn.Parameter(
                torch.zeros(2, 8, 2, dtype=torch.uint8), requires_grad=False
            )

    with pytest.raises(UnsupportedModelError, match="dequantize=True"):
        unfuse(Packed())

    class CustomGate(Odd):
        alpha, limit = 1.0, 3.0

        def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
            gate, up = gate_up.chunk(2, dim=-1)
            return torch.relu(gate) * up

    with pytest.raises(UnsupportedModelError, match="gate function"):
        fused_form(CustomGate(False, (2, 8, 4)))


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_and_every_expert_quantized_by_rtn(kind: str, tmp_path: Path) -> None:
    import slimtorch as st
    from slimtorch.formats.state import get_state

    result = st.compress(tiny(kind), {"stages": [{"method": "quantize.rtn", "bits": 4}]})
    quantized = {n for n, m in result.model.named_modules() if get_state(m, "weight")}
    assert len({n for n in quantized if ".experts." in n}) == LAYERS * EXPERTS * 3
    st.save(result.model, tmp_path / "art")
    loaded = st.load(tmp_path / "art")
    assert (
        loaded.get_submodule(_experts(kind)).layout
        == result.model.get_submodule(_experts(kind)).layout
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, result.model(_ids()).logits)


@pytest.mark.parametrize("every", [False, True], ids=["routed", "calibrate_all_experts"])
@pytest.mark.parametrize("kind", KINDS)
def test_gptq_reaches_every_expert(kind: str, every: bool) -> None:
    """gpt-oss with calibrate_all_experts: no expert starves. Llama 4's experts get their
    rows pre-scaled by the router (zeros where not chosen): starved ones fall back to RTN."""
    import slimtorch as st
    from slimtorch.core.info import model_info
    from slimtorch.formats.state import get_state
    from slimtorch.testing.tasks import tensor_task

    model = tiny(kind)
    task = tensor_task(_ids(1, 3), loss="next_token")  # 3 tokens: some experts starve
    calibration = {"samples": 1, "batch_size": 1, "calibrate_all_experts": every}
    stage = {"method": "quantize.gptq", "bits": 4, "group_size": 32, "calibration": calibration}
    result = st.compress(model, {"stages": [stage]}, data=task)
    quantized = {n for n, m in result.model.named_modules() if get_state(m, "weight")}
    experts = {n for n in quantized if ".experts." in n}
    assert len(experts) == LAYERS * EXPERTS * 3
    starved = set(model_info(result.model).data_free_layers or [])
    assert experts - starved  # the routed experts: GPTQ proper, not the RTN fallback
    assert bool(starved) == (not every or kind == "llama4")
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


@pytest.mark.parametrize(
    "recipe",
    [
        "w4a16-awq",
        "kmeans4",
        {"stages": [{"method": "prune.wanda", "sparsity": 0.5, "calibration": {"samples": 4}}]},
        {"stages": [{"method": "prune.sparsegpt", "sparsity": 0.5, "calibration": {"samples": 4}}]},
    ],
    ids=["awq", "kmeans", "wanda", "sparsegpt"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_every_weight_method_reaches_every_expert(kind: str, recipe: Any) -> None:
    import slimtorch as st
    from slimtorch.formats.state import get_state
    from slimtorch.testing.tasks import tensor_task

    model = tiny(kind)
    result = st.compress(model, recipe, data=tensor_task(_ids(4, 16), loss="next_token"))
    touched = [
        n
        for n, m in result.model.named_modules()
        if ".experts." in n and isinstance(m, torch.nn.Linear) and get_state(m, "weight")
    ]
    assert len(touched) == LAYERS * EXPERTS * 3
    if recipe == "w4a16-awq" and kind == "gpt_oss":  # the norm before the experts was scaled
        norm = "model.layers.1.post_attention_layernorm.weight"
        assert not torch.equal(result.model.get_parameter(norm), model.get_parameter(norm))


@pytest.mark.parametrize("kind", KINDS)
def test_export_hf_reloads_in_transformers_with_the_same_logits(kind: str, tmp_path: Path) -> None:
    import transformers

    import slimtorch as st
    from slimtorch.export import export

    result = st.compress(tiny(kind), {"stages": [{"method": "quantize.rtn", "bits": 4}]})
    st.save(result.model, tmp_path / "art")
    loaded = st.load(tmp_path / "art")
    export(loaded, to="hf", out=tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    fused = again.get_submodule(_experts(kind))
    assert type(fused).__name__ == {"gpt_oss": "GptOssExperts", "llama4": "Llama4TextExperts"}[kind]
    with torch.no_grad():
        torch.testing.assert_close(
            again(_ids()).logits, loaded(_ids()).logits, rtol=1e-4, atol=1e-5
        )


def test_checkpoint_names_of_transposed_interleaved_biased_and_mxfp4_tensors() -> None:
    pre = "model.layers.1.mlp.experts"
    oss = ExpertLayout(transposed=True, interleaved=True)
    names = checkpoint_names(f"{pre}.gate_up_proj", (2, 16, 64), oss)  # [E, H, 2I]
    assert names[f"{pre}.1.gate_proj.weight"] == Part(1, 0, 64, 2, True)
    assert names[f"{pre}.0.up_proj.weight"] == Part(0, 1, 64, 2, True)
    assert checkpoint_names(f"{pre}.down_proj", (2, 32, 16), oss)[f"{pre}.1.down_proj.weight"] == (
        Part(1, 0, 16, 1, True)
    )
    bias = checkpoint_names(f"{pre}.gate_up_proj_bias", (2, 64), oss)
    assert bias[f"{pre}.1.up_proj.bias"] == Part(1, 1, 64, 2)
    assert checkpoint_names(f"{pre}.down_proj_bias", (2, 16), oss)[f"{pre}.0.down_proj.bias"] == (
        Part(0, 0, 16)
    )
    blocks = checkpoint_names(f"{pre}.gate_up_proj_blocks", (2, 64, 1, 16), oss)
    assert blocks[f"{pre}.0.gate_proj.weight"] == Part(
        0, 0, 64, 2, False, f"{pre}.gate_up_proj_scales"
    )
    assert checkpoint_names(f"{pre}.gate_up_proj_scales", (2, 64, 1), oss) == {}
    llama = checkpoint_names(f"{pre}.gate_up_proj", (2, 16, 64), ExpertLayout(transposed=True))
    assert llama[f"{pre}.1.up_proj.weight"] == Part(1, 32, 64, 1, True)


def _mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [E, rows, cols]`` (cols a multiple of 32) as MXFP4 blocks and scales (a power-of-two
    scale per 32 values, E2M1 codes rounded), with the values they decode to."""
    from slimtorch.formats.floats import encode_e2m1, encode_e8m0, floor_log2

    e, rows, cols = w.shape
    g = w.reshape(e, rows, cols // 32, 32)
    amax = g.abs().amax(-1).clamp(min=2.0**-100)
    scale = torch.ldexp(torch.ones_like(amax), floor_log2(amax) - 2)  # amax / scale in [4, 8)
    codes = encode_e2m1(g / scale[..., None]).to(torch.int64)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    values = (decode_e2m1(codes) * scale[..., None]).reshape(e, rows, cols)
    return blocks, encode_e8m0(scale), values


def test_decode_mxfp4_equals_transformers_dequantizer() -> None:
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    w = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(0))
    blocks, scales, values = _mxfp4(w)
    ours = decode_mxfp4(blocks, scales)
    assert torch.equal(ours, values)
    theirs = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(ours, theirs.transpose(1, 2))  # theirs: [E, cols, rows]


def _to_mxfp4_checkpoint(model: Any, out: Path) -> None:
    """``model`` (gpt-oss) saved as the Hub stores it: experts as MXFP4 ``*_blocks`` /
    ``*_scales`` ([E, out rows, in / 32, 16]), the rest bf16 -> float; the model's expert
    weights are replaced by the values the blocks decode to."""
    model.save_pretrained(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for layer in range(LAYERS):
        experts = model.model.layers[layer].mlp.experts
        for proj in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{proj}"
            stored = tensors.pop(key).transpose(1, 2)  # [E, out rows, in]
            blocks, scales, values = _mxfp4(stored.float())
            tensors[f"{key}_blocks"] = blocks.reshape(*scales.shape, 16)
            tensors[f"{key}_scales"] = scales
            with torch.no_grad():
                getattr(experts, proj).copy_(values.transpose(1, 2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("layout", ["gpt_oss", "llama4", "gpt_oss_mxfp4"])
def test_the_offloaded_reader_gives_every_unfused_parameter(layout: str, tmp_path: Path) -> None:
    from slimtorch.calibrate.offload import Checkpoint

    kind = layout.removesuffix("_mxfp4")
    model = tiny(kind, intermediate=32)
    if layout.endswith("mxfp4"):
        _to_mxfp4_checkpoint(model, tmp_path)
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            assert f.get_slice("model.layers.0.mlp.experts.gate_up_proj_blocks").get_shape() == [
                EXPERTS, 64, 2, 16
            ]  # fmt: skip
    else:
        model.save_pretrained(tmp_path)
    unfuse_experts(model)
    reader = Checkpoint(tmp_path)
    for name, param in model.named_parameters():
        assert name in reader.where, name
        assert torch.equal(reader.get(name).float(), param.detach()), name


def _offloaded_and_in_memory(
    ck: Path, dense: Path, tmp_path: Path, monkeypatch: Any
) -> tuple[Any, Any]:
    """``ck`` compressed offloaded and ``dense`` (the same values) in memory: the artifacts."""
    from slimtorch.core.context import Context
    from slimtorch.formats.artifact import read_artifact
    from slimtorch.workflows import offloaded
    from slimtorch.workflows.compress import CompressOptions, compress_to_dir

    monkeypatch.setattr(offloaded, "_resident_now", lambda: 0)  # see test_distributed_offload
    stage = {"method": "quantize.gptq", "bits": 4, "group_size": 16,
             "calibration": {"samples": 2, "batch_size": 1}}  # fmt: skip
    (tmp_path / "r.yaml").write_text(json.dumps({"stages": [stage]}))
    common = {"tokenizer": "builtin:austen-lm", "llm_windows": 0, "data": "builtin:austen"}
    reports = {}
    for name, budget, source in (("off", "1MB", ck), ("mem", None, dense)):
        options = CompressOptions(max_memory=budget, work_dir=str(tmp_path / "w"), **common)
        reports[name] = compress_to_dir(
            str(source), str(tmp_path / "r.yaml"), tmp_path / name, options,
            Context(progress=False),
        )  # fmt: skip
    assert reports["off"]["offloaded"] is True
    return read_artifact(tmp_path / "off"), read_artifact(tmp_path / "mem")


@pytest.mark.parametrize("layout", ["gpt_oss", "llama4", "gpt_oss_mxfp4"])
def test_offloaded_compression_equals_the_in_memory_one(
    layout: str, tmp_path: Path, monkeypatch: Any
) -> None:
    """--max-memory reads transposed / interleaved / biased / MXFP4 experts per expert; the
    in-memory run gets the checkpoint through transformers (the MXFP4 one: the same values
    saved dense, as transformers without Accelerate does not load MXFP4 on a CPU)."""
    import slimtorch as st

    kind = layout.removesuffix("_mxfp4")
    model = tiny(kind, vocab=2048, hidden=32, intermediate=32)
    if layout.endswith("mxfp4"):
        _to_mxfp4_checkpoint(model, tmp_path / "ck")
    model.save_pretrained(tmp_path / "dense")  # after the MXFP4 round trip: the values it holds
    ck = tmp_path / ("ck" if layout.endswith("mxfp4") else "dense")
    a, b = _offloaded_and_in_memory(ck, tmp_path / "dense", tmp_path, monkeypatch)
    assert sorted(a.states) == sorted(b.states)
    experts = [k for k in a.states if ".experts." in k]
    assert len(experts) == LAYERS * EXPERTS * 3
    for key, state in a.states.items():
        assert state.quant is not None and b.states[key].quant is not None
        assert torch.equal(state.quant.codes, b.states[key].quant.codes), key
    if kind == "gpt_oss":
        bias = "model.layers.1.mlp.experts.3.up_proj.bias"
        torch.testing.assert_close(a.tensors[bias], b.tensors[bias], rtol=0, atol=0)
    ids = _ids(vocab=2048)
    with torch.no_grad():
        torch.testing.assert_close(
            st.load(tmp_path / "off")(ids).logits, st.load(tmp_path / "mem")(ids).logits
        )


def test_inspect_lists_every_expert_of_a_gpt_oss_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimtorch.cli.main import main

    tiny("gpt_oss", vocab=2048).save_pretrained(tmp_path / "ckpt")
    stage = {"method": "quantize.rtn", "bits": 4, "granularity": "per_group", "group_size": 16}
    (tmp_path / "r.yaml").write_text(json.dumps({"stages": [stage]}))
    argv = ["compress", "--model", str(tmp_path / "ckpt"), "--recipe", str(tmp_path / "r.yaml"),
            "--out", str(tmp_path / "art"), "--quiet", "--llm-windows", "0"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "art"), "--json"]) == 0
    layers = {row["name"]: row for row in json.loads(capsys.readouterr().out)["layers"]}
    for i in range(LAYERS):
        for e in range(EXPERTS):
            for p in ("gate", "up", "down"):
                row = layers[f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight"]
                assert row["quant_bits"] == 4 and row["encoding"] == "quant"
                assert f"model.layers.{i}.mlp.experts.{e}.{p}_proj.bias" in layers
    assert not any(n.endswith("gate_up_proj") for n in layers)


def test_a_hub_mxfp4_checkpoint_loads_in_memory_as_float(tmp_path: Path) -> None:
    """gpt-oss as the Hub stores it (MXFP4 experts) loads without Accelerate or GPU kernels:
    dequantized to the values the blocks hold, with no MXFP4 claim left in its config, and
    a compressed copy exports to a directory transformers reloads."""
    import transformers

    import slimtorch as st
    from slimtorch.export import export
    from slimtorch.models.hf import load_directory

    model = tiny("gpt_oss").eval()
    _to_mxfp4_checkpoint(model, tmp_path / "ck")  # model now holds the decoded values
    loaded = load_directory(tmp_path / "ck")
    assert "quantization_config" not in loaded.architecture["config"]
    assert getattr(loaded.model.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(_ids()).logits, model(_ids()).logits)
    result = st.compress(loaded.model, {"stages": [{"method": "quantize.rtn", "bits": 4}]})
    st.save(result.model, tmp_path / "art")
    again = st.load(tmp_path / "art")
    export(again, to="hf", out=tmp_path / "hf")
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(_ids()).logits, again(_ids()).logits, rtol=1e-4, atol=1e-5
        )
