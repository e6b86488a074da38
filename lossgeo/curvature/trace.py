r"""Stochastic trace estimators.

Hutchinson (1990): :math:`\mathrm{tr}(A) \approx \frac1m \sum_i z_i^\top A z_i` with Rademacher
:math:`z_i`; standard error = sample std / sqrt(m).

Hutch++ (Meyer, Musco, Musco, Woodruff 2021): with m products split in thirds, a sketch
:math:`Q = \mathrm{orth}(A S)` captures the top of the spectrum exactly,
:math:`\mathrm{tr}(A) = \mathrm{tr}(Q^\top A Q) + \mathrm{tr}((I-QQ^\top) A (I-QQ^\top))`, and
Hutchinson only estimates the deflated remainder; its standard error is that part's.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .results import TraceResult

MatVec = Callable[[torch.Tensor], torch.Tensor]


def _rademacher(n: int, m: int, gen: torch.Generator, dtype, device) -> torch.Tensor:
    return (torch.randint(0, 2, (m, n), generator=gen) * 2 - 1).to(dtype=dtype, device=device)


def _mean_and_stderr(samples: torch.Tensor) -> tuple[float, float]:
    m = samples.numel()
    mean = float(samples.mean())
    stderr = float(samples.std(unbiased=True) / math.sqrt(m)) if m > 1 else math.inf
    return mean, stderr


def hutchinson(matvec: MatVec, n: int, n_samples: int = 30, *, seed: int = 0,
               dtype: torch.dtype = torch.float32, device="cpu") -> TraceResult:
    if n_samples < 2:
        raise ValueError(f"n_samples: must be >= 2 for a standard error (got {n_samples})")
    gen = torch.Generator().manual_seed(seed)
    z = _rademacher(n, n_samples, gen, dtype, device)
    samples = torch.stack([torch.dot(zi.double(), matvec(zi).double()) for zi in z])
    value, stderr = _mean_and_stderr(samples)
    return TraceResult(value=value, stderr=stderr, n_hvp=n_samples, method="hutchinson")


def hutch_plus_plus(matvec: MatVec, n: int, n_samples: int = 30, *, seed: int = 0,
                    dtype: torch.dtype = torch.float32, device="cpu") -> TraceResult:
    """Hutch++ with n_samples products in total (a third each for sketch, projection,
    residual)."""
    third = n_samples // 3
    if third < 2:
        raise ValueError(f"n_samples: must be >= 6 for Hutch++ (got {n_samples})")
    gen = torch.Generator().manual_seed(seed)
    sketch = _rademacher(n, third, gen, dtype, device)
    a_sketch = torch.stack([matvec(s) for s in sketch], dim=1).double()  # (n, third)
    q, _ = torch.linalg.qr(a_sketch)
    aq = torch.stack([matvec(c.to(dtype)) for c in q.T], dim=1).double()
    top = float(torch.trace(q.T @ aq))
    g = _rademacher(n, third, gen, dtype, device).double()
    g_perp = g - (g @ q) @ q.T  # rows projected off span(Q)
    samples = torch.stack([torch.dot(gp, matvec(gp.to(dtype)).double()) for gp in g_perp])
    rest, stderr = _mean_and_stderr(samples)
    return TraceResult(value=top + rest, stderr=stderr, n_hvp=3 * third, method="hutch++")
