"""slimtorch.share.kmeans: exact 1-D Lloyd k-means against a brute-force Lloyd and scikit-learn."""

from __future__ import annotations

import pytest
import torch

from slimtorch.core.errors import UserInputError
from slimtorch.share.kmeans import INITS, assign, init_centroids, kmeans_1d


def _mixture(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([-3.0, -1.0, 0.5, 2.0, 4.0])
    pick = torch.randint(0, 5, (n,), generator=g)
    return centers[pick] + 0.3 * torch.randn(n, generator=g)


def _brute_lloyd(x: torch.Tensor, c: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """O(nk) textbook Lloyd in float64; ties go to the lower (first) centroid."""
    x, c = x.double(), c.double().clone()
    for _ in range(max_iter):
        labels = torch.argmin((x[:, None] - c[None, :]).abs(), dim=1)
        counts = torch.bincount(labels, minlength=c.numel())
        assert bool((counts > 0).all()), "brute-force Lloyd hit an empty cluster"
        new = torch.zeros_like(c).index_add_(0, labels, x) / counts
        if torch.equal(new, c):
            break
        c = new
    return c


def _inertia(x: torch.Tensor, c: torch.Tensor) -> float:
    c = torch.sort(c.flatten().float()).values
    return float(((x.double() - c.double()[assign(x, c)]) ** 2).sum())


def test_three_obvious_clusters_exact() -> None:
    x = torch.tensor([10.0, 0.0, 5.1, 0.2, 10.2, 4.9, 0.1, 5.0, 10.1])
    for init in INITS:
        r = kmeans_1d(x, 3, init=init)
        assert torch.allclose(r.centroids, torch.tensor([0.1, 5.0, 10.1]), atol=1e-6)
        assert r.labels.tolist() == [2, 0, 1, 0, 2, 1, 0, 1, 2]
        assert r.centroids.dtype == torch.float32 and r.labels.dtype == torch.int64
        assert r.inertia == pytest.approx(6 * 0.1**2, rel=1e-5)


@pytest.mark.parametrize("init", ["linear", "density", "kmeans++", "cuberoot"])
def test_matches_brute_force_lloyd_from_same_init(init: str) -> None:
    x = _mixture(600, seed=1)
    c0 = init_centroids(x, 5, init=init, seed=3)
    ours = kmeans_1d(x, 5, init=init, seed=3, max_iter=1000, tol=0.0, refine=False)
    ref = _brute_lloyd(x, c0)
    assert torch.allclose(ours.centroids.double(), ref, atol=1e-6)
    assert ours.inertia == pytest.approx(_inertia(x, ref.float()), rel=1e-9)


def test_inertia_history_non_increasing_and_consistent() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((5000,)) * 0.05  # type: ignore[no-untyped-call]
    x += 1e-4 * torch.randn(5000, generator=g)
    r = kmeans_1d(x, 16, init="linear", max_iter=500, tol=0.0, refine=False)
    h = torch.tensor(r.history, dtype=torch.float64)
    assert r.iterations == len(r.history) > 5
    assert bool((h[1:] <= h[:-1] * (1 + 1e-12)).all())
    assert r.inertia == pytest.approx(r.history[-1], rel=1e-5)
    # labels are the nearest centroid, inertia is computed from them
    assert torch.equal(r.labels, torch.argmin((x[:, None] - r.centroids[None]).abs(), dim=1))


def test_k_at_least_distinct_values_is_exact() -> None:
    x = torch.tensor([3.0, 1.0, 2.0, 2.0, 3.0, 1.0, 2.0])
    for k in (3, 10):
        r = kmeans_1d(x, k)
        assert r.centroids.tolist() == [1.0, 2.0, 3.0]
        assert r.labels.tolist() == [2, 0, 1, 1, 2, 0, 1]
        assert r.inertia == 0.0 and r.iterations == 0
    one = kmeans_1d(torch.tensor([0.25]), 4)
    assert one.centroids.tolist() == [0.25] and one.labels.tolist() == [0]


def test_k_one_is_the_mean() -> None:
    x = _mixture(300, seed=2)
    r = kmeans_1d(x, 1)
    assert r.centroids.numel() == 1
    assert float(r.centroids[0]) == pytest.approx(float(x.double().mean()), abs=1e-6)
    assert r.inertia == pytest.approx(float(((x.double() - x.double().mean()) ** 2).sum()))


def test_empty_clusters_are_reseeded() -> None:
    # linear init on a big gap leaves most of the 8 centroids empty at first
    x = torch.cat([torch.linspace(0.0, 1.0, 200), torch.linspace(99.0, 100.0, 5)])
    r = kmeans_1d(x, 8, init="linear")
    assert r.centroids.numel() == 8
    assert bool((torch.bincount(r.labels, minlength=8) > 0).all())
    assert r.inertia < _inertia(x, init_centroids(x, 8, "linear").float())


@pytest.mark.parametrize("init", ["linear", "density", "kmeans++", "cuberoot"])
def test_deterministic_under_seed(init: str) -> None:
    x = _mixture(2000, seed=4)
    a, b = kmeans_1d(x, 7, init=init, seed=11), kmeans_1d(x, 7, init=init, seed=11)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    assert a.history == b.history


def test_kmeanspp_seed_changes_the_start() -> None:
    x = _mixture(2000, seed=5)
    starts = {tuple(init_centroids(x, 6, "kmeans++", seed=s).tolist()) for s in range(4)}
    assert len(starts) > 1


@pytest.mark.parametrize("init", ["linear", "density"])
def test_integer_weights_equal_repeated_values(init: str) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(400, generator=g)
    w = torch.randint(0, 4, (400,), generator=g)
    weighted = kmeans_1d(x, 6, init=init, weights=w.float())
    repeated = kmeans_1d(torch.repeat_interleave(x, w), 6, init=init)
    assert torch.allclose(weighted.centroids, repeated.centroids, atol=1e-5)
    assert weighted.inertia == pytest.approx(repeated.inertia, rel=1e-5)
    assert weighted.labels.shape == (400,)


def test_zero_weight_outlier_is_ignored_but_labelled() -> None:
    x = torch.tensor([0.0, 0.1, 1.0, 1.1, 50.0])
    r = kmeans_1d(x, 2, weights=torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))
    assert torch.allclose(r.centroids, torch.tensor([0.05, 1.05]))
    assert r.labels.tolist() == [0, 0, 1, 1, 1]
    assert r.inertia == pytest.approx(4 * 0.05**2, rel=1e-5)


@pytest.mark.slow  # scikit-learn is a peer library: CI runs this in the bench env (make test-slow)
@pytest.mark.parametrize("dist", ["gaussian", "laplace"])
def test_inertia_close_to_sklearn(dist: str) -> None:
    cluster = pytest.importorskip(
        "sklearn.cluster", reason="needs scikit-learn, a peer library: `make bench-env`"
    )
    g = torch.Generator().manual_seed(7)
    if dist == "gaussian":
        x = torch.randn(10_000, generator=g)
    else:
        u = torch.rand(10_000, generator=g) - 0.5
        x = -torch.sign(u) * torch.log1p(-2 * u.abs())
    km = cluster.KMeans(16, n_init=1, random_state=0).fit(x.numpy().reshape(-1, 1))
    ref = _inertia(x, torch.from_numpy(km.cluster_centers_))
    for init in ("kmeans++", "cuberoot"):
        assert kmeans_1d(x, 16, init=init).inertia <= 1.01 * ref, init


def test_assign_ties_go_to_lower_and_unsorted_codebook() -> None:
    c = torch.tensor([0.0, 1.0, 3.0])
    x = torch.tensor([-5.0, 0.5, 0.49, 0.51, 2.0, 2.5, 9.0])
    assert assign(x, c).tolist() == [0, 0, 0, 1, 1, 2, 2]
    shuffled = torch.tensor([3.0, 0.0, 1.0])
    assert assign(x, shuffled).tolist() == [1, 1, 1, 2, 2, 0, 0]
    with pytest.raises(UserInputError, match="codebook"):
        assign(x, torch.tensor([]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"values": torch.ones(4), "k": 0}, "k must be"),
        ({"values": torch.ones(4), "k": 2.0}, "k must be"),
        ({"values": torch.tensor([]), "k": 2}, "empty"),
        ({"values": torch.tensor([1.0, float("nan")]), "k": 2}, "NaN or Inf"),
        ({"values": torch.tensor([1.0, float("inf")]), "k": 2}, "NaN or Inf"),
        ({"values": torch.ones(2, 2), "k": 2}, "flatten"),
        ({"values": torch.arange(4), "k": 2}, "float"),
        ({"values": torch.ones(4), "k": 2, "init": "random"}, "choose one of"),
        ({"values": torch.ones(4), "k": 2, "max_iter": 0}, "max_iter"),
        ({"values": torch.ones(4), "k": 2, "tol": -1.0}, "tol"),
        ({"values": torch.ones(4), "k": 2, "weights": torch.ones(3)}, "same shape"),
        ({"values": torch.ones(4), "k": 2, "weights": -torch.ones(4)}, ">= 0"),
        ({"values": torch.ones(4), "k": 2, "weights": torch.zeros(4)}, "not all zero"),
    ],
)
def test_bad_inputs(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kmeans_1d(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("init", ["linear", "cuberoot"])
def test_refine_never_worse_than_plain_lloyd(init: str) -> None:
    g = torch.Generator().manual_seed(8)
    u = torch.rand(5000, generator=g) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace: many poor Lloyd minima
    plain = kmeans_1d(x, 16, init=init, refine=False)
    refined = kmeans_1d(x, 16, init=init)
    assert refined.inertia <= plain.inertia * (1 + 1e-9)
    assert refined.centroids.numel() == 16 and refined.iterations >= plain.iterations
