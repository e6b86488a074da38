r"""Lanczos with full reorthogonalisation, and power iteration with deflation.

Lanczos builds an orthonormal Krylov basis :math:`Q_m` with :math:`Q_m^\top A Q_m = T_m`
tridiagonal; the eigenpairs of :math:`T_m` (scipy's ``eigh_tridiagonal``) give Ritz pairs
:math:`(\theta_i, Q_m s_i)` whose residual norm is :math:`r_i = \beta_m |s_{m,i}|` (exact in
exact arithmetic; full reorthogonalisation, classical Gram-Schmidt repeated when it cancels
heavily, keeps it accurate in floating point and avoids spurious copies of converged eigenvalues).

Stopping test, per wanted pair: the eigenvalue error is bounded by :math:`r_i` and, given a
gap :math:`\delta_i` to the rest of the spectrum, by :math:`r_i^2/\delta_i` (Kato-Temple /
Saad, Thm. 3.8). With :math:`\delta_i` estimated from the other Ritz values we stop when

.. math:: \min(r_i, r_i^2/\delta_i) \le \mathrm{tol}\,|\theta_i| \quad\text{and}\quad
          r_i \le \sqrt{\mathrm{tol}}\,|\theta_i|,

so ``tol`` is a relative eigenvalue accuracy, the same meaning as PyHessian's ``tol``
(relative change of the estimate), while the second condition guards against a Ritz gap
that is still too optimistic early on. Both ends of the spectrum come from one Krylov space,
so lambda_max and lambda_min are read off a single run.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, NamedTuple

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from .linear import LinearOperator
from .results import EigenResult

MatVec = Callable[[torch.Tensor], torch.Tensor]
_TINY = np.finfo(np.float64).tiny
# Selective reorthogonalisation: a second classical Gram-Schmidt pass ("twice is enough")
# only when the first one left less than a tenth of the vector's norm (Rutishauser's factor
# of ten; Daniel-Gragg-Kaufman-Stewart use 1/sqrt(2)). One pass loses orthogonality in
# proportion to eps * ||w|| / ||w'||, so the new vector stays orthogonal to within about ten
# rounding errors, far inside the semi-orthogonality (sqrt(eps)) that keeps Lanczos's Ritz
# values and residuals accurate (Simon 1984). Lanczos steps remove the alpha q_j and beta q_j-1
# components: on an MNIST MLP's Hessian ||w'|| / ||w|| was 0.40-1.0 over 100 steps, and the
# 1/sqrt(2) test asked for a second pass, which read the whole basis again, at 60 of them.
_REORTHOGONALISE_BELOW = 0.1
# The guard pair of a top solve (see lanczos_extremes) converges to ten times the other
# pairs' tolerance, and never looser than sqrt(tol): enough to show the Krylov space has
# reached past lambda_2, for about one product a solve instead of three (no failures either
# way in the measurements there). The sqrt(tol) cap keeps the guard alive in solves whose
# other pairs are not wanted to any accuracy (rest_tol = 1, the Tracker's cold checks).
_GUARD_TOL_FACTOR = 10.0


def _start_vector(n: int, dtype, device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    return v / v.norm()


def _wanted(theta: np.ndarray, k_top: int, k_bottom: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(theta)
    return order[::-1][:k_top], order[:k_bottom]


def _ritz_converged(
    beta: float, s: np.ndarray, theta: np.ndarray, idx: np.ndarray, tol: float, floor: float = 0.0
) -> np.ndarray:
    """Per wanted Ritz pair: the stopping test of the module docstring, with the error
    measured against max(|theta_i|, floor)."""
    residual = beta * np.abs(s[-1, idx])
    scale = np.maximum(np.abs(theta[idx]), max(floor, _TINY))
    if len(theta) > 1:
        others = np.abs(theta[idx][:, None] - theta[None, :])
        others[np.arange(len(idx)), idx] = np.inf
        gap = np.maximum(others.min(axis=1), _TINY)
    else:
        gap = np.full(len(idx), _TINY)
    with np.errstate(over="ignore"):
        error = np.minimum(residual, residual**2 / gap)
    return (error <= tol * scale) & (residual <= np.sqrt(tol) * scale)


def lanczos_extremes(
    op: LinearOperator,
    *,
    k_top: int = 1,
    k_bottom: int = 0,
    tol: float = 1e-4,
    bottom_tol: float | None = None,
    rest_tol: float | None = None,
    bottom_scale: str = "value",
    max_iter: int = 100,
    seed: int = 0,
    verify: bool = False,
    start: torch.Tensor | None = None,
    min_steps: int | None = None,
    run: LanczosRun | None = None,
    guard: int = 1,
) -> tuple[EigenResult | None, EigenResult | None]:
    """The k_top largest and k_bottom smallest (algebraic) eigenpairs of a symmetric operator
    from one Lanczos run. Returns (top, bottom); either is None when not asked for.

    tol: relative eigenvalue accuracy of the largest pair (see the module docstring);
    rest_tol (default tol): of the other top pairs; bottom_tol (default tol): of the bottom
    pairs, measured against their own magnitude (bottom_scale="value") or against the
    spectral radius max |theta| (bottom_scale="spectrum"). The most negative Hessian
    eigenvalues sit in a crowded cluster near zero, where accuracy relative to their own
    small size costs many products (35 of 52 for a trained MNIST MLP). Residuals are the
    Lanczos ones, beta |s_mi|; verify=True recomputes ||A v - theta v|| with one product
    per pair.

    start: (m, n) or (n,) vectors to start from instead of a random vector (a warm start:
    their normalised sum, so a Krylov space of m steps spans them when they are nearly
    invariant); min_steps (default k_top + k_bottom + 1): products before the stopping test
    may end the run. run: a fresh `LanczosRun` to take the steps from (instead of seed or
    start), so that a later reader, e.g. `slq_density`, continues the same Krylov space.

    guard: top Ritz pairs beyond the k_top wanted that must also converge, to ten times
    rest_tol but never looser than sqrt(tol), before the run may stop; they are not
    reported. A residual test proves a Ritz
    value is *an* eigenvalue, not the largest: from a random start whose component along
    v_1 happens to be small, a short run can resolve lambda_2 to tol while lambda_1 is still
    hidden. Making the Krylov space resolve one more pair closes that window (measured on
    MNIST MLP layer blocks and GGN at tol 1e-3, benchmarks/bench_lanczos_guard.py: without
    it 2 of 96 cold solves stopped on lambda_2, 26% low; with guard=1 none did, for 8.3
    products a solve against 7.1; 9.9 with the guard held to rest_tol itself).
    The bottom end is not guarded: there the per-epoch tolerance is relative to lambda_max,
    a guard pair cost 16 more products (about half) on the MNIST MLP, and the unguarded
    lambda_min was within that tolerance at every start tried. min_steps defaults to the
    wanted pairs plus the guards plus one.
    """
    matvec, n, dtype, device = op.__matmul__, op.dim, op.dtype, op.device
    bottom_tol = tol if bottom_tol is None else bottom_tol
    rest_tol = tol if rest_tol is None else rest_tol
    if bottom_scale not in ("value", "spectrum"):
        raise ValueError(f"bottom_scale: must be 'value' or 'spectrum' (got {bottom_scale!r})")
    if k_top < 0 or k_bottom < 0 or k_top + k_bottom == 0:
        raise ValueError("k: ask for at least one eigenpair")
    if k_top + k_bottom > n:
        raise ValueError(f"k: at most the dimension {n} eigenpairs (got {k_top + k_bottom})")
    if run is not None:
        if start is not None or run.state is not None:
            raise ValueError("run: must be a fresh LanczosRun, and not given with start")
    elif start is None:
        q0 = _start_vector(n, dtype, device, seed)
    else:
        q0 = start.reshape(-1, n).to(dtype=dtype, device=device).sum(dim=0)
        if not torch.isfinite(q0).all() or float(q0.norm()) == 0.0:
            raise ValueError("start: the start vectors sum to zero or are not finite")
        q0 = q0 / q0.norm()
    if guard < 0:
        raise ValueError(f"guard: must be >= 0 (got {guard})")
    guard_top = min(guard, n - k_top - k_bottom) if k_top else 0
    guard_tol = min(rest_tol * _GUARD_TOL_FACTOR, math.sqrt(tol))
    if min_steps is None:
        min_steps = min(k_top + guard_top + k_bottom + 1, n)
    steps = iter(run) if run is not None else _lanczos_steps(matvec, q0, min(max_iter, n))
    for basis, alphas, betas, beta in steps:  # noqa: B007 (the last step's values are used)
        theta, s = _ritz(alphas, betas)
        guarded_top, bottom = _wanted(theta, k_top + guard_top, k_bottom)
        top = guarded_top[:k_top]
        invariant = _invariant(beta, alphas)
        floor = float(np.abs(theta).max()) if bottom_scale == "spectrum" else 0.0
        flags = (
            np.concatenate(
                [
                    _ritz_converged(beta, s, theta, top[:1], tol),
                    _ritz_converged(beta, s, theta, top[1:], rest_tol),
                ]
            ),
            _ritz_converged(beta, s, theta, bottom, bottom_tol, floor),
        )
        guards_met = invariant or bool(
            _ritz_converged(beta, s, theta, guarded_top[k_top:], guard_tol).all()
        )
        done = guards_met and all(f.all() for f in flags)
        if len(alphas) >= min_steps and done or len(alphas) >= max_iter:
            break
    n_hvp = len(alphas)
    results: list[EigenResult | None] = []
    for idx, which, group_flags in ((top, "LA", flags[0]), (bottom, "SA", flags[1])):
        if len(idx) == 0:
            results.append(None)
            continue
        coeffs = torch.as_tensor(s[:, idx], dtype=dtype, device=device)
        vectors = (basis.T @ coeffs).T.contiguous()
        vectors = vectors / vectors.norm(dim=1, keepdim=True)
        values = torch.as_tensor(theta[idx], dtype=torch.float64)
        converged = torch.as_tensor(group_flags | invariant)
        if verify:
            residuals = torch.stack(
                [
                    (matvec(v).double() - values[i] * v.double()).norm()
                    for i, v in enumerate(vectors)
                ]
            )
            n_hvp += len(idx)
        else:
            residuals = (
                torch.as_tensor(
                    0.0 if invariant else beta * np.abs(s[-1, idx]), dtype=torch.float64
                )
                .expand(len(idx))
                .clone()
            )
        results.append(
            EigenResult(
                values=values,
                vectors=vectors,
                residuals=residuals,
                converged=converged,
                n_hvp=0,
                which=which,
                method="lanczos",
            )
        )
    # n_hvp counts both groups' verification products, so it is set once both are done
    results = [None if r is None else replace(r, n_hvp=n_hvp) for r in results]
    return results[0], results[1]


def lanczos_top(op: LinearOperator, k: int = 1, **options) -> EigenResult:
    """The k largest eigenpairs (`lanczos_extremes` with k_top=k and nothing else)."""
    top, _ = lanczos_extremes(op, k_top=k, k_bottom=0, **options)
    assert top is not None  # k >= 1 was checked by lanczos_extremes
    return top


def both(pair: tuple[EigenResult | None, EigenResult | None]) -> tuple[EigenResult, EigenResult]:
    """(top, bottom) of a run that asked for both ends."""
    top, bottom = pair
    assert top is not None and bottom is not None
    return top, bottom


def lanczos(
    op: LinearOperator,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 1e-4,
    max_iter: int = 100,
    seed: int = 0,
) -> EigenResult:
    """The k extreme eigenpairs of a symmetric operator (Lanczos with full
    reorthogonalisation; the public form of `lanczos_extremes`).

    Args:
        op: a symmetric `LinearOperator` (`op @ v`, `dim`, `dtype`, `device`): any of
            lossgeo's curvature operators, or a `LambdaOperator` around your own product.
        k: eigenpairs wanted.
        which: "LA", the largest algebraic (sorted largest first), or "SA", the smallest
            algebraic (most negative first).
        tol: relative accuracy of each eigenvalue (residual and gap bound; see the module
            docstring).
        max_iter: Lanczos steps (operator products) at most.
        seed: the random start vector.

    Returns:
        An `EigenResult`: values, orthonormal vectors (k, n), residuals, per-pair
        convergence and the products used.
    """
    if which not in ("LA", "SA"):
        raise ValueError(f"which: must be 'LA' or 'SA' (got {which!r})")
    top, bottom = lanczos_extremes(
        op,
        k_top=k if which == "LA" else 0,
        k_bottom=k if which == "SA" else 0,
        tol=tol,
        max_iter=max_iter,
        seed=seed,
    )
    result = top if which == "LA" else bottom
    assert result is not None  # k >= 1 was checked by lanczos_extremes
    return result


class KrylovState(NamedTuple):
    """A Lanczos run after its last step: the orthonormal basis (m, n), the tridiagonal's
    diagonal (alphas, m) and off-diagonal (betas, m - 1), and beta, the norm of the next
    residual (zero when the Krylov space is invariant)."""

    basis: torch.Tensor
    alphas: list[float]
    betas: list[float]
    beta: float


def lanczos_tridiagonal(
    matvec: MatVec, v0: torch.Tensor, n_steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """n_steps of Lanczos (full reorthogonalisation) from v0; returns the Ritz values and the
    squared first components of their eigenvectors (Gauss quadrature nodes and weights)."""
    steps = _lanczos_steps(matvec, v0 / v0.norm(), min(n_steps, v0.numel()))
    for _, alphas, betas, _ in steps:  # noqa: B007 (run to the end; the last step is used)
        pass
    theta, s = _ritz(alphas, betas)
    return theta, s[0] ** 2


class LanczosRun:
    """One Lanczos recurrence (full reorthogonalisation) from the start vector of `seed`,
    shared by several readers: each iteration over it resumes where the last reader stopped,
    and `extend` runs it further. The last epoch's spectral density thereby continues the
    Krylov space of the top-k eigen solve (same start vector, same steps) instead of
    repeating its products."""

    def __init__(self, op: LinearOperator, *, seed: int = 0, max_steps: int = 100) -> None:
        """A run on `op` from the random start vector of `seed`, of at most max_steps."""
        self.seed = seed
        q0 = _start_vector(op.dim, op.dtype, op.device, seed)
        self._steps = _lanczos_steps(op.__matmul__, q0, min(max_steps, op.dim))
        # after the last step taken; None before the first
        self.state: KrylovState | None = None

    def __iter__(self):
        """The steps from where the last reader stopped, each as a `KrylovState`."""
        for state in self._steps:
            self.state = state
            yield state

    @property
    def n_steps(self) -> int:
        """Steps taken so far."""
        return 0 if self.state is None else len(self.state[1])

    def quadrature(self, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """Gauss quadrature nodes and weights (Ritz values, squared first components) of the
        first n_steps steps, running the recurrence on as far as needed."""
        self.extend(n_steps)
        assert self.state is not None
        _, alphas, betas, _ = self.state
        m = min(n_steps, len(alphas))
        theta, s = _ritz(alphas[:m], betas[: m - 1])
        return theta, s[0] ** 2

    def extend(self, n_steps: int) -> None:
        """Run on to n_steps steps (fewer when the Krylov space turns invariant or the run's
        max_steps is reached)."""
        for _ in iter(self) if self.n_steps < n_steps else ():
            if self.n_steps >= n_steps:
                break


def _lanczos_steps(matvec: MatVec, q: torch.Tensor, max_steps: int):
    """The Lanczos recurrence with full reorthogonalisation (classical Gram-Schmidt, repeated
    once when the first pass cancelled heavily). After step j it yields (basis[:j+1],
    alphas, betas, beta), where beta is the norm of the next residual; it ends after
    max_steps or once the Krylov space is invariant. The caller stops it earlier by breaking
    out of the loop."""
    basis = torch.empty(max_steps, q.numel(), dtype=q.dtype, device=q.device)
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(max_steps):
        basis[j] = q
        w = matvec(q)
        alphas.append(float(torch.dot(w.double(), q.double())))
        before = float(w.norm())
        w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(w.double().norm())
        if beta < _REORTHOGONALISE_BELOW * before:  # heavy cancellation: a second pass
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
            beta = float(w.double().norm())
        yield KrylovState(basis[: j + 1], alphas, betas, beta)
        if _invariant(beta, alphas):
            return
        betas.append(beta)
        q = w / beta


def _invariant(beta: float, alphas: list[float]) -> bool:
    """The next Lanczos vector vanished: the Krylov space is invariant, every Ritz pair exact."""
    return beta <= 1e-10 * max(1.0, max(abs(a) for a in alphas))


def _ritz(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of the tridiagonal T (scipy), with T's last off-diagonal dropped."""
    if len(alphas) == 1:
        return np.array(alphas), np.ones((1, 1))
    return eigh_tridiagonal(np.array(alphas), np.array(betas[: len(alphas) - 1]))


def power_iteration(
    op: LinearOperator, *, k: int = 1, tol: float = 1e-3, max_iter: int = 100, seed: int = 0
) -> EigenResult:
    """Power iteration with deflation, as in PyHessian (stops when the eigenvalue estimate
    changes by less than tol relative). Finds the k eigenvalues largest in *magnitude*."""
    matvec, n, dtype, device = op.__matmul__, op.dim, op.dtype, op.device
    if not 1 <= k <= n:
        raise ValueError(f"k: must be in [1, {n}] (got {k})")
    values: list[float] = []
    vectors: list[torch.Tensor] = []
    converged: list[bool] = []
    n_hvp = 0
    for i in range(k):
        v = _start_vector(n, dtype, device, seed + i)
        estimate, done = None, False
        for _ in range(max_iter):
            for u in vectors:  # keep v out of the found eigenspace
                v = v - torch.dot(u, v) * u
            v = v / v.norm()
            w = matvec(v)
            n_hvp += 1
            for lam, u in zip(values, vectors):  # deflation: (A - sum lam u u^T) v
                w = w - lam * torch.dot(u, v) * u
            new = float(torch.dot(w.double(), v.double()))
            v = w / w.norm()
            if estimate is not None and abs(new - estimate) <= tol * (abs(estimate) + 1e-12):
                estimate, done = new, True
                break
            estimate = new
        for u in vectors:
            v = v - torch.dot(u, v) * u
        v = v / v.norm()
        values.append(float(estimate) if estimate is not None else math.nan)
        vectors.append(v)
        converged.append(done)
    stacked = torch.stack(vectors)
    vals = torch.tensor(values, dtype=torch.float64)
    residuals = torch.stack(
        [(matvec(v).double() - vals[i] * v.double()).norm() for i, v in enumerate(stacked)]
    )
    n_hvp += k
    order = torch.argsort(vals.abs(), descending=True)
    return EigenResult(
        values=vals[order],
        vectors=stacked[order],
        residuals=residuals[order],
        converged=torch.tensor(converged)[order],
        n_hvp=n_hvp,
        which="LM",
        method="power",
    )
