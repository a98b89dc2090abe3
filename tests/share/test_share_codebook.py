"""share.kmeans / share.finetune: codebooks per layer or shared, masks kept, centroids trained."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.core.methods import Run
from slimtorch.formats.state import get_state, iter_states
from slimtorch.recipe import load_recipe
from slimtorch.share.codebook import KMeansConfig
from slimtorch.share.stages import kmeans
from slimtorch.testing.models import example_input, tiny_cnn, tiny_lstm, tiny_transformer
from slimtorch.testing.tasks import TensorTask, tensor_task

RUN = Run(Context(progress=False))


class TwinMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))  # type: ignore[no-any-return]


@pytest.mark.parametrize("factory", [tiny_cnn, tiny_lstm, tiny_transformer])
def test_every_weight_takes_at_most_2_pow_bits_values(factory) -> None:  # type: ignore[no-untyped-def]
    model = factory()
    kmeans(model, KMeansConfig(bits=3), RUN)
    states = iter_states(model)
    assert states
    for _, module, param, state in states:
        q = state.quant
        assert q is not None and q.scheme == "codebook" and q.codebook is not None
        assert q.codebook.numel() <= 8 and int(q.codes.max()) < q.codebook.numel()
        w = getattr(module, param).detach()
        assert torch.equal(w, q.codebook[q.codes.long()])  # the parameter holds the shared values
        assert torch.unique(w).numel() <= 8


def test_bits_per_layer_type_and_errors() -> None:
    model = tiny_cnn()
    kmeans(model, KMeansConfig(bits={"Conv2d": 6, "Conv1d": 5, "Linear": 2}), RUN)
    bits = {f"{n}.{p}": s.quant.bits for n, _, p, s in iter_states(model) if s.quant}
    assert {type(m).__name__ for n, m in model.named_modules() if n} >= {"Conv2d", "Linear"}
    expect = {nn.Conv2d: 6, nn.Conv1d: 5, nn.Linear: 2}
    for name, b in bits.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert b == expect[type(module)]
    with pytest.raises(ConfigError, match="no `bits` entry"):
        kmeans(tiny_cnn(), KMeansConfig(bits={"Conv2d": 6}), RUN)
    with pytest.raises(ConfigError, match=r"1\.\.8"):
        kmeans(tiny_cnn(), KMeansConfig(bits=9), RUN)


def test_pruned_layer_clusters_kept_weights_only_and_keeps_its_mask() -> None:
    model = st.compress(
        TwinMLP(), {"stages": [{"method": "prune.magnitude", "sparsity": 0.75}]}
    ).model
    masks = {n: s.mask.clone() for n, _, _, s in iter_states(model) if s.mask is not None}
    kmeans(model, KMeansConfig(bits=2), RUN)
    for name, module, param, state in iter_states(model):
        assert state.mask is not None and torch.equal(state.mask, masks[name])
        w = getattr(module, param).detach()
        assert bool((w[~state.mask] == 0).all())
        # the 4 centroids are spent on the kept (large) weights: none of them is near zero
        assert state.quant is not None and state.quant.codebook is not None
        assert float(state.quant.codebook.abs().min()) > 0.01


def test_cross_layer_codebook_is_stored_once(tmp_path: Path) -> None:
    model = TwinMLP()
    kmeans(model, KMeansConfig(bits=4, cross_layer=True), RUN)
    a, b = get_state(model.a, "weight"), get_state(model.b, "weight")
    assert a is not None and b is not None and a.quant is not None and b.quant is not None
    assert a.quant.codebook is b.quant.codebook
    manifest = st.save(model, tmp_path / "art")
    refs = [m.get("codebook_ref") for m in manifest["tensors"].values()]
    assert (
        refs.count("a.weight") == 1 and "codebook" not in manifest["tensors"]["b.weight"]["parts"]
    )
    loaded = st.load(tmp_path / "art", trust_factory=True)
    x = torch.randn(5, 32)
    assert torch.equal(loaded(x), model(x))
    la, lb = get_state(loaded.a, "weight"), get_state(loaded.b, "weight")
    assert la is not None and lb is not None and la.quant is not None and lb.quant is not None
    assert la.quant.codebook is lb.quant.codebook  # saving again stores it once again
    again = st.save(loaded, tmp_path / "again")
    assert again["tensors"]["b.weight"].get("codebook_ref") == "a.weight"


def test_kmeans_beats_uniform_grid_at_equal_bits() -> None:
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) ** 3  # heavy tails
    model = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.copy_(w)
    uniform = st.compress(
        model, {"stages": [{"method": "quantize.rtn", "bits": 3, "granularity": "per_tensor"}]}
    ).model
    shared = st.compress(model, {"stages": [{"method": "share.kmeans", "bits": 3}]}).model
    err_u = float((uniform[0].weight - w).pow(2).sum())
    err_s = float((shared[0].weight - w).pow(2).sum())
    assert err_s < 0.5 * err_u


def _regress() -> tuple[TensorTask, Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """Fit y = W* x on random inputs (a task for share.finetune), and its loss on inputs x."""
    target = TwinMLP()
    x = torch.randn(2048, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        task = tensor_task(x, target(x), loss="mse", name="regress")

    def loss(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = target(inputs)
        return (model(inputs) - y).pow(2).mean()

    return task, loss


def test_share_finetune_trains_centroids_keeps_indices_and_masks() -> None:
    task, regress_loss = _regress()
    model = TwinMLP()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    recipe = {
        "stages": [
            {"method": "prune.magnitude", "sparsity": 0.5},
            {"method": "share.kmeans", "bits": 3},
        ]
    }
    shared = st.compress(model, recipe).model
    before = {
        n: (s.quant.codes.clone(), s.quant.codebook.clone(), s.mask.clone())
        for n, _, _, s in iter_states(shared)
    }  # type: ignore[union-attr]
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(5))
    loss0 = float(regress_loss(shared, x))
    stage = {"method": "share.finetune", "train": {"steps": 150, "lr": 0.01, "batch_size": 64}}
    tuned = st.compress(shared, {"stages": [stage]}, data=task).model
    assert float(regress_loss(tuned, x)) < 0.8 * loss0
    for name, module, param, state in iter_states(tuned):
        codes, codebook, mask = before[name]
        q = state.quant
        assert q is not None and q.codebook is not None and state.mask is not None
        assert torch.equal(q.codes, codes) and torch.equal(state.mask, mask)
        assert not torch.equal(q.codebook, codebook)  # the centroids moved
        w = getattr(module, param).detach()
        assert torch.equal(w, q.codebook[q.codes.long()] * mask)
        assert torch.unique(w[mask]).numel() <= 8
        assert not parametrize_left(module)


def parametrize_left(module: nn.Module) -> bool:
    return hasattr(module, "parametrizations")


def test_share_finetune_needs_a_shared_layer_and_data() -> None:
    with pytest.raises(ConfigError, match=r"share\.kmeans"):
        st.compress(TwinMLP(), {"stages": [{"method": "share.finetune"}]}, data=_regress()[0])
    with pytest.raises(ConfigError, match="data"):
        st.compress(TwinMLP(), {"stages": [{"method": "share.finetune"}]})


@pytest.mark.parametrize(
    "name", ["deep-compression", "kmeans8", "kmeans6", "kmeans4", "kmeans-huffman"]
)
def test_presets_round_trip_through_yaml(name: str) -> None:
    rec = load_recipe(name)
    again = load_recipe(rec.to_dict())
    assert again.to_dict() == rec.to_dict()


def test_lstm_with_huffman_round_trips(tmp_path: Path) -> None:
    model = tiny_lstm()
    out = st.compress(model, "deep-compression").model
    st.save(out, tmp_path / "a")
    x = example_input(out)
    assert torch.equal(st.load(tmp_path / "a", trust_factory=True)(x), out(x))
