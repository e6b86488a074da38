r"""Spectral density by stochastic Lanczos quadrature (Golub & Welsch 1969; Ghorbani et al.
2019, Yao et al. 2020 / PyHessian).

For each random unit vector v, m Lanczos steps give nodes :math:`\theta_j` and weights
:math:`\tau_j^2` (squared first components) with
:math:`v^\top f(A) v \approx \sum_j \tau_j^2 f(\theta_j)`; averaging over vectors estimates
:math:`\frac1n \mathrm{tr} f(A)`. The density is
:math:`\phi(t) = \frac{1}{n_v}\sum_v \sum_j \tau_{vj}^2\, \mathcal{N}(t; \theta_{vj}, \sigma^2)`.
"""

from __future__ import annotations

import numpy as np
import torch

from .lanczos import LanczosRun, basis_rows, check_basis_capacity, lanczos_tridiagonal
from .linear import LinearOperator
from .results import DensityResult


def slq_density(
    op: LinearOperator,
    *,
    n_steps: int = 100,
    n_vectors: int = 1,
    grid_size: int = 1000,
    sigma: float | None = None,
    seed: int = 0,
    run: LanczosRun | None = None,
) -> DensityResult:
    """sigma defaults to 1% of the spectrum's estimated range. run: a LanczosRun of the same
    operator and seed (e.g. the one `lanczos_extremes` took the top eigenpairs from): the
    first vector's quadrature continues it, and only the steps it has not taken yet cost
    products; the result is the same as without it."""
    matvec, n, dtype, device = op.__matmul__, op.dim, op.dtype, op.device
    if n_steps < 1 or n_vectors < 1:
        raise ValueError("n_steps and n_vectors: must be >= 1")
    capacity = basis_rows(op, min(n_steps, n))
    check_basis_capacity(min(n_steps, n), capacity)
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    n_hvp = 0
    if run is not None and run.seed != seed:
        raise ValueError(f"run: started from seed {run.seed}, not this density's seed {seed}")
    for i in range(n_vectors):
        v = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        if i == 0 and run is not None:  # v is the run's start vector: continue the run
            taken = run.n_steps
            theta, w = run.quadrature(n_steps)
            n_hvp += max(run.n_steps - taken, 0)
        else:
            theta, w = lanczos_tridiagonal(matvec, v, n_steps, capacity)
            n_hvp += len(theta)
        pad = n_steps - len(theta)  # early exit (invariant subspace): zero-weight padding
        nodes.append(np.pad(theta, (0, pad), constant_values=theta[-1]))
        weights.append(np.pad(w, (0, pad)))
    nodes_a, weights_a = np.stack(nodes), np.stack(weights)
    lo, hi = nodes_a.min(), nodes_a.max()
    span = max(hi - lo, 1e-12 * max(1.0, abs(hi)))
    sigma = float(sigma if sigma is not None else 0.01 * span)
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size)
    gauss = np.exp(-0.5 * ((grid[None, None, :] - nodes_a[:, :, None]) / sigma) ** 2)
    gauss /= sigma * np.sqrt(2 * np.pi)
    density = (weights_a[:, :, None] * gauss).sum(axis=(0, 1)) / n_vectors
    return DensityResult(
        grid=torch.from_numpy(grid),
        density=torch.from_numpy(density),
        nodes=torch.from_numpy(nodes_a),
        weights=torch.from_numpy(weights_a),
        sigma=sigma,
        n_hvp=n_hvp,
    )
