"""``slimtorch moe CONFIG.yaml --out DIR``: a Mixtral mixture-of-experts model built from dense
Llama/Mistral models (mergekit-moe's YAML and maths, :mod:`slimtorch.merge.moe`).

Attention, norms, embeddings and LM head come from ``base_model``; expert ``e`` of every layer is
the MLP of ``experts[e].source_model``; the routers come from the prompts (``gate_mode``). The
output is a Hugging Face directory (``MixtralForCausalLM``, transformers v5 fused experts) with
the base's tokenizer, written tensor by tensor and atomically.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import yaml

from slimtorch.core.errors import ConfigError
from slimtorch.formats.quant_parts import dtype_from_name
from slimtorch.formats.streaming import StreamingSafetensorsDir, TensorSpec
from slimtorch.merge.moe import (
    MoeConfig,
    cheap_embedding,
    degenerate_layers,
    fused_experts,
    hidden_summary,
    noise_and_scale,
    parse_moe_config,
    random_gates,
    unit,
)
from slimtorch.merge.stream import TensorSource, open_source

_FAMILIES = ("llama", "mistral")


def _hf_config(src: TensorSource) -> dict[str, Any]:
    if src.kind != "hf" or src.root is None:
        raise ConfigError(f"{src.spec}: a MoE is built from Hugging Face model directories")
    cfg = dict(json.loads((src.root / "config.json").read_text(encoding="utf-8")))
    if cfg.get("model_type") not in _FAMILIES:
        raise ConfigError(
            f"{src.spec} is a {cfg.get('model_type')!r} model; mergekit-moe's Mixtral output takes"
            f" {' or '.join(_FAMILIES)} models"
        )
    return cfg


def _tokenizer(root: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(root))
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _tokenize(tok: Any, prompts: tuple[str, ...]) -> Any:
    return tok(
        [(tok.bos_token or "") + p for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )


def gate_vectors(
    config: MoeConfig, base: TensorSource, cfg: dict[str, Any], tok: Any, seed: int
) -> torch.Tensor:
    """``(layers, experts, hidden)``: every layer's router rows."""
    layers, hidden, n = cfg["num_hidden_layers"], cfg["hidden_size"], len(config.experts)
    if config.gate_mode in ("random", "uniform_random"):
        gen = torch.Generator().manual_seed(seed)
        return random_gates(layers, n, hidden, config.gate_mode == "uniform_random", gen)
    if config.gate_mode == "cheap_embed":
        embed = base.read("model.embed_tokens.weight")

        def summary(enc: Any) -> torch.Tensor:
            return cheap_embedding(embed, enc["input_ids"], enc["attention_mask"], layers)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base.root), dtype=torch.bfloat16)

        def summary(enc: Any) -> torch.Tensor:
            with torch.no_grad():
                out = model(**enc, output_hidden_states=True, return_dict=True)
            return hidden_summary(out.hidden_states, config.gate_mode == "hidden_avg")

    rows = []
    for expert in config.experts:
        v = summary(_tokenize(tok, expert.positive_prompts))
        if expert.negative_prompts:
            v = v - summary(_tokenize(tok, expert.negative_prompts))
        rows.append(unit(v))
    return torch.stack(rows, dim=0).permute(1, 0, 2)


def _out_config(base_root: Path, config: MoeConfig, dtype: torch.dtype | None) -> bytes:
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(str(base_root))
    if not isinstance(cfg, transformers.MistralConfig):
        mistral = transformers.MistralConfig(**cfg.to_dict())
        mistral.sliding_window = None
        mistral.max_position_embeddings = cfg.max_position_embeddings
        cfg = mistral
    out = transformers.MixtralConfig(**cfg.to_dict())
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts = len(config.experts)
    out.num_experts_per_tok = config.experts_per_token
    out.sliding_window = None
    if dtype is not None:
        out.dtype = dtype
    with tempfile.TemporaryDirectory() as tmp:
        out.save_pretrained(tmp)
        return (Path(tmp) / "config.json").read_bytes()


def _files(base_root: Path, config: MoeConfig, dtype: Any, tok: Any, text: str) -> dict[str, bytes]:
    files = {"config.json": _out_config(base_root, config, dtype)}
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files |= {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    files["mergekit_moe_config.yml"] = text.encode("utf-8")
    return files


def build_moe(
    config_path: str | Path,
    out: str | Path,
    force: bool = False,
    seed: int = 0,
    allow_all_same: bool = False,
) -> dict[str, Any]:
    """Build the MoE model that the mergekit-moe YAML at ``config_path`` describes into
    ``out``; JSON-able facts (experts, router mode, degenerate layers, size, time)."""
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"MoE config {path} does not exist; give a mergekit-moe YAML file")
    text = path.read_text(encoding="utf-8")
    try:
        config = parse_moe_config(yaml.safe_load(text), allow_all_same)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    start = time.perf_counter()
    with ExitStack() as stack:
        sources = {}
        for spec in dict.fromkeys([config.base_model] + [e.source_model for e in config.experts]):
            sources[spec] = open_source(spec, path.resolve().parent)
            stack.callback(sources[spec].close)
        base = sources[config.base_model]
        cfgs = {spec: _hf_config(src) for spec, src in sources.items()}
        mlp = [n for n in base.infos if ".mlp." in n]
        for spec, src in sources.items():
            odd = [n for n in mlp if src.infos.get(n, (None,))[0] != base.infos[n][0]]
            if odd:
                raise ConfigError(
                    f"{spec}: MLP tensor {odd[0]} differs from the base's; same shapes"
                )
        root = Path(str(base.root))  # _hf_config checked it is a directory
        tok = _tokenizer(root)
        gates = gate_vectors(config, base, cfgs[config.base_model], tok, seed)
        dtype = _dtype(config, cfgs[config.base_model])
        report = _write(
            config,
            sources,
            gates,
            dtype,
            Path(out),
            force,
            _files(root, config, dtype, tok, text),
            seed,
        )
    report.update(
        seconds=round(time.perf_counter() - start, 3),
        degenerate_layers=degenerate_layers(gates),
        gate_mode=config.gate_mode,
    )
    return report


def _dtype(config: MoeConfig, cfg: dict[str, Any]) -> torch.dtype | None:
    name = config.dtype or cfg.get("dtype") or cfg.get("torch_dtype")
    if name is None:
        return None
    try:
        return dtype_from_name(str(name))
    except (KeyError, ValueError):
        raise ConfigError(f"dtype {name!r}: use float32, float16 or bfloat16") from None


def _write(
    config: MoeConfig,
    sources: dict[str, TensorSource],
    gates: torch.Tensor,
    dtype: torch.dtype | None,
    out: Path,
    force: bool,
    files: dict[str, bytes],
    seed: int,
) -> dict[str, Any]:
    base = sources[config.base_model]
    keep = [n for n in base.infos if ".mlp." not in n]
    layers, n_exp = gates.shape[0], len(config.experts)
    inter, hidden = base.infos["model.layers.0.mlp.gate_proj.weight"][0]
    specs = [TensorSpec(n, base.infos[n][0], dtype or base.infos[n][1]) for n in keep]
    mlp_dtype = dtype or base.infos["model.layers.0.mlp.gate_proj.weight"][1]
    for layer in range(layers):
        pre = f"model.layers.{layer}.mlp"
        specs += [
            TensorSpec(f"{pre}.experts.gate_up_proj", (n_exp, 2 * inter, hidden), mlp_dtype),
            TensorSpec(f"{pre}.experts.down_proj", (n_exp, hidden, inter), mlp_dtype),
            TensorSpec(f"{pre}.gate.weight", (n_exp, hidden), mlp_dtype),
        ]
    gen = torch.Generator().manual_seed(seed + 1)
    with StreamingSafetensorsDir(out, specs, files, overwrite=force) as writer:
        for n in keep:
            writer.write(n, base.read(n).to(dtype or base.infos[n][1]))
        for layer in range(layers):
            pre = f"model.layers.{layer}.mlp"
            parts: dict[str, list[torch.Tensor]] = {"gate_proj": [], "up_proj": [], "down_proj": []}
            for expert in config.experts:
                src = sources[expert.source_model]
                for proj, got in parts.items():
                    w = src.read(f"{pre}.{proj}.weight")
                    got.append(noise_and_scale(w, expert, proj == "down_proj", gen))
            gate_up, down = fused_experts(parts["gate_proj"], parts["up_proj"], parts["down_proj"])
            writer.write(f"{pre}.experts.gate_up_proj", gate_up.to(mlp_dtype).contiguous())
            writer.write(f"{pre}.experts.down_proj", down.to(mlp_dtype).contiguous())
            writer.write(f"{pre}.gate.weight", gates[layer].to(mlp_dtype).contiguous())
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {
        "out": str(out),
        "experts": [e.source_model for e in config.experts],
        "base_model": config.base_model,
        "experts_per_token": config.experts_per_token,
        "layers": layers,
        "bytes_on_disk": size,
    }
