"""Tiny models covering every supported layer type, with zero-argument factories so that an
artifact can rebuild them (``--model slimtorch.testing.models:tiny_cnn``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Conv1d, Conv2d, Linear: input [B, 1, 8, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = nn.functional.max_pool2d(x, 2)  # [B, 8, 4, 4]
        x = torch.relu(self.conv1d(x.flatten(2)))  # [B, 8, 16]
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class TinyLSTM(nn.Module):
    """Embedding, LSTM (2 layers, bidirectional), GRU, Linear: input int64 [B, T]."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.lstm = nn.LSTM(16, 16, num_layers=2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(32, 16, batch_first=True)
        self.head = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(x))
        h, _ = self.gru(h)
        return self.head(h[:, -1])


class TinyTransformer(nn.Module):
    """Embedding, MultiheadAttention, Linear: input int64 [B, T]."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = h + a
        h = h + self.ff(h)
        return self.head(h.mean(1))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + self.down(torch.nn.functional.gelu(self.up(h))))  # type: ignore[no-any-return]


class TinyStack(nn.Module):
    """Embedding, three repeated blocks (``blocks.0`` .. ``blocks.2``), Linear: int64 [B, T]."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.blocks = nn.ModuleList(_Block() for _ in range(3))
        self.head = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))  # type: ignore[no-any-return]


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride > 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """Residual blocks with BatchNorm and a 1x1 shortcut, a depthwise conv with GroupNorm, a
    channel concatenation and a flatten into Linear: input [B, 1, 8, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block1 = _Residual(8, 8, 1)
        self.block2 = _Residual(8, 16, 2)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.gn = nn.GroupNorm(4, 16)
        self.side = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(24 * 2 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = self.block2(self.block1(h))
        d = torch.relu(self.gn(self.depthwise(h)))
        h = torch.cat([d, self.side(h)], dim=1)
        h = nn.functional.adaptive_avg_pool2d(h, 2)
        return self.fc(torch.flatten(h, 1))  # type: ignore[no-any-return]


def _seeded(cls: type[nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


def tiny_cnn() -> nn.Module:
    return _seeded(TinyCNN, 0)


def tiny_resnet() -> nn.Module:
    """TinyResNet with BatchNorm statistics and scales that are not the defaults."""
    model = _seeded(TinyResNet, 5)
    gen = torch.Generator().manual_seed(5)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            module.weight.data = 0.5 + torch.rand(module.weight.shape, generator=gen)
            module.bias.data = 0.1 * torch.randn(module.bias.shape, generator=gen)
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean = 0.1 * torch.randn(module.running_mean.shape, generator=gen)  # type: ignore[operator,union-attr]
            module.running_var = 0.5 + torch.rand(module.running_var.shape, generator=gen)  # type: ignore[operator,union-attr]
    return model


def tiny_lstm() -> nn.Module:
    return _seeded(TinyLSTM, 1)


def tiny_transformer() -> nn.Module:
    return _seeded(TinyTransformer, 2)


def tiny_stack() -> nn.Module:
    return _seeded(TinyStack, 3)


def tiny_bert(
    layers: int = 2,
    vocab: int = 99,
    hidden: int = 32,
    heads: int = 4,
    intermediate: int = 37,
    max_positions: int = 64,
    seed: int = 0,
) -> nn.Module:
    """A small randomly initialised Hugging Face ``BertModel`` (needs ``transformers``), in eval
    mode; MiniLM has ``vocab=30522``."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
    )
    return transformers.BertModel(config).eval()  # type: ignore[no-any-return]


def tiny_llama(
    layers: int = 2,
    vocab: int = 128,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 8,
    kv_heads: int = 2,
    max_positions: int = 64,
    std: float | None = None,
    attn: str = "sdpa",
    seed: int = 0,
) -> nn.Module:
    """A small randomly initialised Hugging Face ``LlamaForCausalLM`` with grouped-query
    attention (needs ``transformers``), in eval mode, KV cache off, carrying its ``hf``
    architecture so that ``slimtorch.save``/``load`` round-trip it. ``std`` re-draws every
    matrix from N(0, std) (Llama's 0.02 init gives near-constant outputs)."""
    import transformers

    from slimtorch.core.info import update_info

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        use_cache=False,
    )
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn).eval()
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, std)
    arch = {"kind": "hf", "class": "LlamaForCausalLM", "config": config.to_dict()}
    update_info(model, architecture={**arch, "attn_implementation": attn, "dtype": "float32"})
    return model  # type: ignore[no-any-return]


def tiny_moe(
    kind: str = "mixtral",
    layers: int = 2,
    experts: int = 4,
    top_k: int = 2,
    vocab: int = 128,
    hidden: int = 64,
    intermediate: int = 32,
    seed: int = 0,
) -> nn.Module:
    """A small randomly initialised Hugging Face mixture-of-experts causal LM (``kind``:
    ``mixtral`` or ``qwen3_moe``; transformers v5 stores its experts as fused 3-D parameters),
    in eval mode, KV cache off, carrying its ``hf`` architecture. Every 2-D and 3-D weight is
    drawn from N(0, 0.1) so that outputs and routing are not near-constant."""
    import transformers

    from slimtorch.core.info import update_info

    torch.manual_seed(seed)
    config: Any
    cls: Any
    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_experts_per_tok=top_k,
        use_cache=False,
    )
    if kind == "mixtral":
        config = transformers.MixtralConfig(
            intermediate_size=intermediate, num_local_experts=experts, **common
        )
        cls = transformers.MixtralForCausalLM
    elif kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            moe_intermediate_size=intermediate,
            intermediate_size=2 * intermediate,
            num_experts=experts,
            **common,
        )
        cls = transformers.Qwen3MoeForCausalLM
    else:
        raise ValueError(f"tiny_moe kind {kind!r}: use 'mixtral' or 'qwen3_moe'")
    model = cls._from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
    arch = {"kind": "hf", "class": cls.__name__, "config": config.to_dict()}
    update_info(model, architecture={**arch, "attn_implementation": "sdpa", "dtype": "float32"})
    return model  # type: ignore[no-any-return]


def example_input(model: nn.Module, batch: int = 4) -> torch.Tensor:
    """A deterministic input for any of the tiny models."""
    gen = torch.Generator().manual_seed(123)
    if isinstance(model, (TinyCNN, TinyResNet)):
        return torch.randn(batch, 1, 8, 8, generator=gen)
    return torch.randint(0, 32, (batch, 10), generator=gen)


def with_example_input(model: nn.Module) -> nn.Module:
    """Record :func:`example_input`'s shape in ``model``'s info (what stages that trace the
    model, such as ``prune.structured``, read); returns the model."""
    from slimtorch.core.info import update_info

    x = example_input(model)
    dtype = "int64" if x.dtype == torch.int64 else "float32"
    update_info(model, input={"shape": list(x.shape), "dtype": dtype})
    return model
