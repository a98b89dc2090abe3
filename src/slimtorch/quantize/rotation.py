"""Orthogonal rotations for rotation-based quantization (QuaRot, Ashkboos et al. 2024): the maths.

A Hadamard matrix ``H`` (entries +-1, ``H H^T = n I``) scaled by ``1/sqrt(n)`` is orthogonal and
spreads every coordinate of a vector over all others: an activation channel 100x larger than the
rest (the outliers that make 4-bit activations fail) becomes many channels of ordinary size.

Constructions (:func:`hadamard_matrix`): Sylvester for ``2^k``; Paley I (``q + 1``, ``q`` prime
``= 3 mod 4``) and Paley II (``2 (q + 1)``, ``q`` prime ``= 1 mod 4``) for the other factor, and
the Kronecker product of the two: ``n = m 2^k``. SmolLM2-135M's hidden width 576 = 36 x 16 (Paley
II with q = 17, times Sylvester 16) and its MLP width 1536 = 12 x 128 (Paley I, q = 11) both get
true Hadamard matrices. A width with no such factorization has no known Hadamard here:
:func:`orthogonal` then raises, or (``kind="random"``) draws a random orthogonal matrix
(QR of a Gaussian matrix, signs fixed), which removes outliers as well but is a dense product.

The residual rotation is a *randomized* Hadamard ``Q = D H / sqrt(n)`` with ``D`` a seeded
random +-1 diagonal (:func:`orthogonal`). Row-vector convention throughout: the residual ``h``
becomes ``h Q``; a Linear ``y = x W^T`` reading it gets ``W Q``, one writing it gets ``Q^T W``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from slimtorch.core.errors import ConfigError

RotationKind = Literal["hadamard", "random"]


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> Tensor:
    """``Q[i, j] = chi(j - i)``, chi the quadratic character mod prime ``q`` (chi(0) = 0)."""
    squares = {(k * k) % q for k in range(1, q)}
    chi = torch.tensor([0] + [1 if r in squares else -1 for r in range(1, q)], dtype=torch.int64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley_kind(m: int) -> int:
    """1 (Paley I: ``m = q + 1``, ``q`` prime ``= 3 mod 4``), 2 (Paley II: ``m = 2 (q + 1)``,
    ``q`` prime ``= 1 mod 4``) or 0 (neither applies to order ``m``)."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return 1
    q = m // 2 - 1
    return 2 if m % 2 == 0 and _is_prime(q) and q % 4 == 1 else 0


def paley_hadamard(m: int) -> Tensor | None:
    """A +-1 Hadamard matrix of order ``m`` by Paley's constructions (:func:`paley_kind`), or
    None if neither applies."""
    kind = paley_kind(m)
    q = m - 1
    if kind == 1:  # Paley I: H = I + S, S = [[0, 1^T], [-1, Q]] skew
        s = torch.zeros(m, m, dtype=torch.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return (torch.eye(m, dtype=torch.int64) + s).to(torch.float64)
    q = m // 2 - 1
    if kind == 2:  # Paley II from the conference matrix C
        c = torch.zeros(m // 2, m // 2, dtype=torch.int64)
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = _jacobsthal(q)
        a = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
        b = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
        return (torch.kron(c, a) + torch.kron(torch.eye(m // 2, dtype=torch.int64), b)).double()
    return None


def sylvester_hadamard(n: int) -> Tensor:
    """The Sylvester Hadamard matrix of order ``n = 2^k`` (symmetric, +-1, float64)."""
    if n < 1 or n & (n - 1):
        raise ConfigError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_factor(n: int) -> int | None:
    """The smallest ``m`` with ``n = m 2^k`` and a Hadamard matrix of order ``m`` known here
    (1 when ``n`` is a power of two), or None."""
    if n < 1:
        return None
    p = n & -n  # the largest power of two dividing n
    odd = n // p
    m = odd
    while m <= n:
        if m <= 2 or paley_kind(m):
            return m
        m *= 2
    return None


def hadamard_matrix(n: int) -> Tensor:
    """A +-1 Hadamard matrix of order ``n`` (float64): ``H_m (x) H_{2^k}`` (Paley x Sylvester);
    a ConfigError naming the sizes that work when ``n`` has no known construction."""
    m = hadamard_factor(n)
    if m is None:
        raise ConfigError(
            f"no Hadamard matrix of order {n} is known here (orders m * 2^k with m = 1, 2,"
            " q + 1 for a prime q = 3 mod 4, or 2 (q + 1) for a prime q = 1 mod 4); use"
            " rotation: random (a random orthogonal matrix) for this width"
        )
    small = sylvester_hadamard(m) if m <= 2 else paley_hadamard(m)
    assert small is not None
    return torch.kron(small, sylvester_hadamard(n // m))


def random_orthogonal(n: int, seed: int) -> Tensor:
    """A random orthogonal ``n x n`` matrix (float64; Haar: QR of a Gaussian, signs fixed)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).clamp_min(0).mul(2).sub(1)[None, :]


def random_signs(n: int, seed: int) -> Tensor:
    """``n`` seeded random +-1 values (float64)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).double().mul_(2).sub_(1)


def orthogonal(n: int, kind: RotationKind = "hadamard", seed: int = 0) -> Tensor:
    """The ``n x n`` rotation ``Q`` (float64, ``Q Q^T = I``): ``diag(s) H / sqrt(n)`` with
    seeded random signs ``s`` (``hadamard``), or a seeded random orthogonal matrix."""
    if kind == "random":
        return random_orthogonal(n, seed)
    return random_signs(n, seed)[:, None] * hadamard_matrix(n) / math.sqrt(n)


# ------------------------------------------------------------------ weight transforms


def fold_scale_into_inputs(weight: Tensor, scale: Tensor) -> Tensor:
    """``W diag(g)``: a norm's elementwise scale ``g`` moved into the Linear that reads it."""
    return (weight.double() * scale.double()[None, :]).to(weight.dtype)


def rotate_inputs(weight: Tensor, q: Tensor) -> Tensor:
    """``W Q``: the weight of a Linear whose input ``x`` became ``x Q``."""
    return (weight.double() @ q.to(weight.device, torch.float64)).to(weight.dtype)


def rotate_outputs(weight: Tensor, bias: Tensor | None, q: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(Q^T W, b Q)``: a Linear (or embedding table, ``W^T`` there) whose output ``y`` must
    become ``y Q``."""
    q = q.to(weight.device, torch.float64)
    w = (q.T @ weight.double()).to(weight.dtype)
    b = None if bias is None else (bias.double() @ q).to(bias.dtype)
    return w, b


def head_blocks(head_rotation: Tensor, heads: int) -> Tensor:
    """The block-diagonal ``diag(R, ..., R)`` of ``heads`` copies of a per-head rotation."""
    return torch.block_diag(*([head_rotation] * heads))


def max_abs_error(a: Tensor, b: Tensor) -> float:
    """``max |a - b| / max(max |a|, 1e-12)``: how far two outputs are, relative."""
    scale = float(a.abs().max().clamp_min(1e-12))
    return float((a.double() - b.double()).abs().max()) / scale
