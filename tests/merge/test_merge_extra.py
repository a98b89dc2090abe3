"""The maths of DELLA, Model Stock, NuSLERP, Multi-SLERP, Karcher, SCE, Arcee Fusion on cases
with known answers, and their mergekit YAML parsing (bit identity with mergekit itself is in
test_merge_mergekit_peer.py, a slow test of the bench environment)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimtorch.core.errors import ConfigError
from slimtorch.merge import methods as M
from slimtorch.merge import selective as S
from slimtorch.merge import spherical as P
from slimtorch.merge.mergekit import parse_config
from slimtorch.merge.stream import merge_to_dir

E0, E1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])


def test_nuslerp_endpoints_midpoint_and_colinear() -> None:
    assert torch.allclose(P.nuslerp_pair(0.0, E0, E1), E0, atol=1e-6)
    assert torch.allclose(P.nuslerp_pair(1.0, E0, E1), E1, atol=1e-6)
    mid = P.nuslerp_pair(0.5, E0, E1)
    assert torch.allclose(mid, (E0 + E1) / math.sqrt(2), atol=1e-6)  # on the sphere, not 0.5
    assert torch.allclose(P.nuslerp_pair(0.25, E0, 3 * E0), 1.5 * E0)  # colinear: linear
    # t = w1 / (w0 + w1); with a base, the deltas are interpolated
    base = torch.tensor([1.0, 1.0, 1.0])
    out = P.nuslerp([base + E0, base + E1], [1.0, 1.0], base)
    assert torch.allclose(out, base + mid, atol=1e-6)


def test_nuslerp_row_wise_is_per_row() -> None:
    a = torch.stack([E0, E1])  # rows
    b = torch.stack([E1, E0])
    rows = P.nuslerp_pair(0.5, a, b, row_wise=False, flatten=False)  # last dim: each row
    assert torch.allclose(rows, torch.full((2, 3), 1 / math.sqrt(2)) * (a + b), atol=1e-6)
    cols = P.nuslerp_pair(0.5, a.T, b.T, row_wise=True, flatten=False)
    assert torch.allclose(cols, rows.T, atol=1e-6)


def test_multislerp_two_equals_nuslerp_and_keeps_norm() -> None:
    out = P.multislerp([2 * E0, 2 * E1], [1.0, 1.0])
    assert torch.allclose(out, 2 * (E0 + E1) / math.sqrt(2), atol=1e-5)
    assert abs(float(out.norm()) - 2.0) < 1e-5  # linear averaging would give sqrt(2)
    three = P.multislerp([E0, E1, -E0], [1.0, 1.0, 1.0])
    assert torch.allclose(three, E1, atol=1e-5)
    with pytest.raises(ValueError, match="weighted sum of the directions is zero"):
        P.multislerp([E0, -E0, E1 - E1 + E0 * 0 + torch.tensor([0, 0, 1e-12])], [1, 1, 1e-9])


def test_karcher_mean_direction_times_mean_norm() -> None:
    out = P.karcher([2 * E0, 4 * E1])
    assert torch.allclose(out, 3 * (E0 + E1) / math.sqrt(2), atol=1e-4)
    assert torch.equal(P.karcher([E0]), E0)
    assert torch.equal(P.karcher([E0 * 0, E1 * 0]), torch.zeros(3))


def test_model_stock_interpolation_ratio() -> None:
    base = torch.zeros(4)
    same = [torch.ones(4), torch.ones(4)]
    assert torch.allclose(S.model_stock(base, same), torch.ones(4))  # cos 1: t = 1
    ortho = [torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])]
    assert torch.equal(S.model_stock(base, ortho), base)  # cos 0: t = 0, the base
    # cos 0.5 between two deltas: t = 2 * 0.5 / 1.5 = 2/3 of the average
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0.5, math.sqrt(3) / 2, 0, 0])
    assert torch.allclose(S.model_stock(base, [a, b]), (2 / 3) * (a + b) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="at least two"):
        S.model_stock(base, [a])


def test_sce_weights_by_mean_square_and_erases_minority() -> None:
    base = torch.zeros(4)
    a = torch.tensor([1.0, 1.0, -1.0, 0.0])
    b = torch.tensor([3.0, -1.0, -1.0, 0.0])
    wa, wb = 3 / 14, 11 / 14  # mean squares 0.75 and 2.75
    out = S.sce(base, [a, b])
    # entry 1: sum of raw deltas 0 -> "+" elected, b erased; entry 0: both kept
    expect = torch.tensor([(wa * 1 + wb * 3) / (wa + wb), 1.0, -1.0, 0.0])
    assert torch.allclose(out, expect, atol=1e-6)
    top = S.sce_mask(torch.stack([a, b]), 0.5)  # int(2 nonzero * 0.5) = 1: largest variance
    assert top.tolist() == [1.0, 0.0, 0.0, 0.0] or top.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_arcee_fusion_keeps_only_outstanding_changes() -> None:
    base = torch.zeros(4, 50)
    tuned = base + 0.01 * torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    tuned[2, 45] = 3.0  # one outstanding change
    out = S.arcee_fusion(base, tuned)
    assert out[2, 45] == 3.0
    assert out.dtype == torch.float32
    kept = out != 0
    assert kept[2].all()  # the row whose softmax moved (large KL) is taken ...
    assert int(kept[[0, 1, 3]].sum()) < 15  # ... from the others, only a few large changes
    assert torch.equal(out[kept], tuned[kept])  # ... and kept ones are taken whole


def test_della_magprune_probabilities_and_rescale() -> None:
    delta = torch.arange(1, 2001, dtype=torch.float32).reshape(1, -1)
    gen = torch.Generator().manual_seed(0)
    pruned = M.della_magprune(delta, 0.5, 0.3, gen, rescale=None)
    kept = pruned != 0
    assert 0.45 < float(kept.float().mean()) < 0.55
    low, high = kept[0, :500].float().mean(), kept[0, -500:].float().mean()
    assert low < 0.35 < 0.65 < high  # keep probability rises with magnitude rank
    rescaled = M.della_magprune(delta, 0.5, 0.3, torch.Generator().manual_seed(0), "l1")
    assert torch.allclose(rescaled.abs().sum(), delta.abs().sum())
    with pytest.raises(ValueError, match="inside"):
        M.della_magprune(delta, 0.9, 0.2, gen)


def _yaml(method: str, n: int, base: bool = True, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": f"m{i}", "parameters": {"weight": 1.0}} for i in range(n)],
        **extra,
    }
    if base:
        cfg["base_model"] = "base"
    return cfg


def test_parse_new_methods() -> None:
    d = parse_config({**_yaml("della", 2), "parameters": {"density": 0.5, "epsilon": 0.1}})
    assert d.normalize and d.rescale == "l1" and d.inputs[0].epsilon == 0.1
    dl = parse_config(_yaml("della_linear", 2))
    assert not dl.normalize and dl.inputs[0].epsilon == 0.15
    ms = parse_config(
        {**_yaml("model_stock", 2), "models": [{"model": "a"}, {"model": "b"}],
         "parameters": {"filter_wise": True}}
    )  # fmt: skip
    assert ms.options == {"filter_wise": True}
    nu = parse_config({**_yaml("nuslerp", 2, base=False), "parameters": {"nuslerp_flatten": False}})
    assert nu.base_index is None and nu.options == {"nuslerp_flatten": False}
    sce = parse_config({**_yaml("sce", 2), "models": [{"model": "a"}, {"model": "b"}]})
    assert sce.method == "sce"


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"merge_method": "model_stock", "base_model": "b", "models": [{"model": "a"}]}, "at least 2"),
        (_yaml("nuslerp", 3, base=False), "exactly 2"),
        ({**_yaml("della", 1), "parameters": {"density": 0.9}}, "lower `epsilon`"),
        ({"merge_method": "arcee_fusion", "base_model": "b", "models": [{"model": "a"}, {"model": "c"}]},
         "exactly 2"),
        ({"merge_method": "passthrough", "models": [{"model": "a"}, {"model": "c"}]}, "slices"),
        ({"merge_method": "multislerp", "models": [{"model": "a"}]}, "no `weight`"),
        ({"merge_method": "sce", "models": [{"model": "a"}]}, "needs `base_model`"),
        ({**_yaml("sce", 2), "parameters": {"weight": 1}}, "unsupported parameters"),
    ],
)  # fmt: skip
def test_new_methods_bad_configs(cfg: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(cfg)


def test_streamed_della_is_seeded_and_sce_merges(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    for name in ("base", "a", "b"):
        save_file({"w": torch.randn(8, 8, generator=g)}, str(tmp_path / f"{name}.safetensors"))
    models = [{"model": f"{n}.safetensors", "parameters": {"weight": 1.0}} for n in "ab"]
    cfg = {"merge_method": "della", "base_model": "base.safetensors", "models": models,
           "parameters": {"density": 0.5}}  # fmt: skip
    outs = []
    for seed in (1, 1, 2):
        merge_to_dir(parse_config(cfg), tmp_path / "o", True, seed, tmp_path)
        outs.append(load_file(str(tmp_path / "o" / "model.safetensors"))["w"])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    sce = {**cfg, "merge_method": "sce", "parameters": {"select_topk": 0.5}}
    sce["models"] = [{"model": m["model"]} for m in models]
    merge_to_dir(parse_config(sce), tmp_path / "o", True, 0, tmp_path)
    got = load_file(str(tmp_path / "o" / "model.safetensors"))["w"]
    sds = [load_file(str(tmp_path / f"{n}.safetensors"))["w"] for n in ("base", "a", "b")]
    assert torch.equal(got, S.sce(sds[0], sds[1:], 0.5))


def _tiny_other(tmp: Path, seed: int) -> tuple[str, dict[str, torch.Tensor]]:
    from slimtorch.testing.models import tiny_cnn

    g = torch.Generator().manual_seed(seed)
    sd = {
        k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in tiny_cnn().state_dict().items()
    }
    path = tmp / f"other{seed}.safetensors"
    save_file(sd, str(path))
    return str(path), sd


def test_recipe_stages_use_the_model_as_base(tmp_path: Path) -> None:
    import slimtorch as st
    from slimtorch.testing.models import tiny_cnn

    (p1, o1), (p2, o2) = _tiny_other(tmp_path, 1), _tiny_other(tmp_path, 2)
    stages = {
        "stock": {"method": "merge.model_stock", "models": [p1, p2]},
        "nuslerp": {"method": "merge.nuslerp", "models": [p1, p2], "weights": [1.0, 3.0]},
        "multi": {"method": "merge.multislerp", "models": [p1, p2]},
        "karcher": {"method": "merge.karcher", "models": [p1, p2]},
        "sce": {"method": "merge.sce", "models": [p1, p2], "select_topk": 0.5},
        "fusion": {"method": "merge.arcee_fusion", "model": p1},
        "della": {"method": "merge.della", "models": [p1, p2], "density": 0.5, "seed": 3},
    }
    merged = {}
    for key, stage in stages.items():
        model = tiny_cnn()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        merged[key] = st.compress(model, {"stages": [stage]}).model.state_dict()
    for k, b in before.items():
        if not b.is_floating_point():
            continue
        x, y = o1[k], o2[k]
        assert torch.equal(merged["stock"][k], S.model_stock(b, [x, y])), k
        assert torch.equal(merged["nuslerp"][k], P.nuslerp([x, y], [1.0, 3.0], b)), k
        assert torch.equal(merged["multi"][k], P.multislerp([x, y], [1.0, 1.0], b)), k
        assert torch.equal(merged["karcher"][k], P.karcher([b, x, y])), k
        assert torch.equal(merged["sce"][k], S.sce(b, [x, y], 0.5)), k
        gen = M.tensor_generator(0, k)
        assert torch.equal(merged["fusion"][k], S.arcee_fusion(b, x, gen)), k
        opts = M.DELLA
        want = M.task_merge(b, [x, y], [1, 1], [0.5, 0.5], opts, M.tensor_generator(3, k))
        assert torch.equal(merged["della"][k], want), k


def test_della_stage_rejects_bad_epsilon() -> None:
    from slimtorch.recipe import load_recipe

    with pytest.raises(Exception, match="inside"):
        load_recipe({"stages": [{"method": "merge.della", "models": ["x"], "density": 0.9}]})
