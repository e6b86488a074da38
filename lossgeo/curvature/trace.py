r"""Stochastic trace estimators.

Hutchinson (1990): :math:`\mathrm{tr}(A) \approx \frac1m \sum_i z_i^\top A z_i` with Rademacher
:math:`z_i`; standard error = sample std / sqrt(m).

Deflated Hutchinson: given orthonormal vectors :math:`V` with Rayleigh quotients
:math:`\theta_i = v_i^\top A v_i` (the Ritz pairs a Lanczos run already produced, so no extra
products), :math:`\mathrm{tr}(A) = \sum_i \theta_i + \mathrm{tr}(PAP)` with
:math:`P = I - VV^\top` exactly, and Hutchinson only estimates the remainder. The outliers of a
Hessian spectrum carry much of Hutchinson's variance :math:`2\sum_{i\ne j} A_{ij}^2`, so the
same number of products gives a smaller standard error (measured in
benchmarks/bench_curvature.py).

Krylov-deflated Hutchinson (Chen & Hallman 2023, "Krylov-aware stochastic trace
estimation"): the same identity with :math:`V` the whole orthonormal basis :math:`Q` of a
Lanczos run already taken (the per-epoch eigen solve), whose projection
:math:`Q^\top A Q = T` the run also gives, so :math:`\mathrm{tr}(A) = \mathrm{tr}(T) +
\mathrm{tr}(PAP)`. The basis spans the top Ritz vectors and more of the upper spectrum;
on MNIST models after one epoch (20 products each way, 8 seeds pooled) the variance fell to
0.60 of deflation by the top 5 Ritz pairs alone (benchmarks/bench_trace_deflation.py).

Hutch++ (Meyer, Musco, Musco, Woodruff 2021): with m products split in thirds, a sketch
:math:`Q = \mathrm{orth}(A S)` captures the top of the spectrum exactly,
:math:`\mathrm{tr}(A) = \mathrm{tr}(Q^\top A Q) + \mathrm{tr}((I-QQ^\top) A (I-QQ^\top))`, and
Hutchinson only estimates the deflated remainder; its standard error is that part's.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from .krylov import KrylovState
from .lanczos import LanczosRun, basis_rows, check_basis_capacity
from .linear import LinearOperator, block_size, require_symmetric, with_products
from .results import TraceResult


def rademacher_vectors(
    n: int, m: int, gen: torch.Generator, dtype, device
) -> Iterator[torch.Tensor]:
    """m Rademacher vectors, one at a time, in the working dtype. Each is unpacked from
    n/8 random bytes: drawing one random number per entry (bernoulli_, randint) cost a
    quarter of a 0.5M-parameter MLP's Hessian-vector product."""
    shifts = torch.arange(8, dtype=torch.uint8)
    for _ in range(m):
        packed = torch.randint(0, 256, ((n + 7) // 8,), generator=gen, dtype=torch.uint8)
        bits = (packed.unsqueeze(1) >> shifts) & 1
        yield bits.reshape(-1)[:n].to(dtype=dtype, device=device).mul_(2).sub_(1)


def _mean_and_stderr(samples: torch.Tensor) -> tuple[float, float]:
    m = samples.numel()
    mean = float(samples.mean())
    stderr = float(samples.std(unbiased=True) / math.sqrt(m)) if m > 1 else math.inf
    return mean, stderr


def hutchinson(
    op: LinearOperator,
    n_samples: int = 30,
    *,
    seed: int = 0,
    deflation: tuple[torch.Tensor, torch.Tensor] | KrylovState | None = None,
) -> TraceResult:
    """Hutchinson with n_samples products. deflation=(values, vectors): Ritz values and
    orthonormal (k, n) Ritz vectors of the same operator; or the `KrylovState` of a Lanczos
    run on it (its whole basis and projected matrix). Their part of the trace is taken
    exactly and only the rest is sampled (see the module docstring)."""
    n, dtype, device = op.dim, op.dtype, op.device
    require_symmetric(op, "hutchinson")
    if n_samples < 2:
        raise ValueError(f"n_samples: must be >= 2 for a standard error (got {n_samples})")
    gen = torch.Generator().manual_seed(seed)
    exact_part, method = 0.0, "hutchinson"
    probes = rademacher_vectors(n, n_samples, gen, dtype, device)
    if isinstance(deflation, KrylovState):
        basis = deflation.basis
        exact_part = float(np.trace(deflation.projected()))
        method = f"hutchinson-krylov-{deflation.size}"
        probes = (basis.orthogonalise(z, in_place=True) for z in probes)
    elif deflation is not None:
        values, vectors = deflation
        vectors = vectors.to(dtype=dtype, device=device)
        exact_part, method = float(values.double().sum()), f"hutchinson-deflated-{len(values)}"
        probes = (z - vectors.T @ (vectors @ z) for z in probes)
    samples = [float(torch.dot(z, hz)) for z, hz in with_products(op, probes, block_size(op))]
    value, stderr = _mean_and_stderr(torch.tensor(samples, dtype=torch.float64))
    return TraceResult(value=exact_part + value, stderr=stderr, n_hvp=n_samples, method=method)


def hutch_plus_plus(op: LinearOperator, n_samples: int = 30, *, seed: int = 0) -> TraceResult:
    """Hutch++ with n_samples products in total (a third each for sketch, projection,
    residual)."""
    n, dtype, device = op.dim, op.dtype, op.device
    require_symmetric(op, "hutch++")
    third = n_samples // 3
    if third < 2:
        raise ValueError(f"n_samples: must be >= 6 for Hutch++ (got {n_samples})")
    gen, block = torch.Generator().manual_seed(seed), block_size(op)
    # (n, third) matrices held: the sketch in the operator's dtype until Q exists, then Q
    # alone; A Q and the residual vectors are taken a block at a time (on an 11M-parameter
    # ResNet-18 five float64 copies made the trace's peak 6 GB)
    sketch = rademacher_vectors(n, third, gen, dtype, device)
    a_sketch = torch.stack([a_s for _, a_s in with_products(op, sketch, block)], dim=1)
    q, _ = torch.linalg.qr(a_sketch.double())
    del a_sketch
    columns = (c.to(dtype) for c in q.T)
    top = sum(
        float(torch.dot(c.double(), a_c.double())) for c, a_c in with_products(op, columns, block)
    )
    residuals = []
    # projected off span(Q)
    projected = (
        (g - q @ (q.T @ g)).to(dtype)
        for g in rademacher_vectors(n, third, gen, torch.float64, device)
    )
    for g_perp, a_g in with_products(op, projected, block):
        residuals.append(torch.dot(g_perp.double(), a_g.double()))
    samples = torch.stack(residuals)
    rest, stderr = _mean_and_stderr(samples)
    return TraceResult(value=top + rest, stderr=stderr, n_hvp=3 * third, method="hutch++")


def krylov_hutchinson(op: LinearOperator, n_samples: int = 30, *, seed: int = 0) -> TraceResult:
    """Krylov-aware trace estimation (Chen & Hallman 2023) with n_samples products in all:
    a third of them on Lanczos steps from a random start, whose basis Q carries its part of
    the trace exactly (the trace of the projected matrix, no further products), and the
    rest on Hutchinson probes of the remainder (I - QQ^T) A (I - QQ^T); the standard error is
    that part's. At 30 products on the MNIST MLP and CNN (8 seeds) its estimates spread
    0.53-0.59x as much as Hutch++'s and 0.75x as much as Hutchinson's
    (benchmarks/bench_trace_deflation.py)."""
    require_symmetric(op, "krylov_hutchinson")
    steps = n_samples // 3
    if steps < 1 or n_samples - steps < 2:
        raise ValueError(f"n_samples: must be >= 3 for a standard error (got {n_samples})")
    steps = min(steps, op.dim)
    check_basis_capacity(steps, basis_rows(op, steps))  # one line, before any product
    run = LanczosRun(op, seed=seed, max_steps=steps)
    run.extend(steps)
    assert run.state is not None
    # an invariant Krylov space ends the run early: its unspent steps go to the probes;
    # the probes' own seed keeps them independent of the start vector
    rest = hutchinson(op, n_samples - run.n_steps, seed=seed + 1, deflation=run.state)
    return TraceResult(
        value=rest.value,
        stderr=rest.stderr,
        n_hvp=run.n_steps + rest.n_hvp,
        method=f"krylov-hutchinson-{run.state.size}",
    )


# the name the literature and other libraries use (Meyer et al. 2021, "Hutch++")
hutchpp = hutch_plus_plus
