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
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch

from .krylov import KrylovBasis, KrylovState, dot, norm
from .linear import LinearOperator, require_symmetric
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


def check_solver_limits(**limits: Any) -> None:
    """Tolerances (names ending in "tol") are finite numbers > 0; step and sample counts are
    whole numbers >= 1; anything else is a one-line ValueError before any product."""
    for name, value in limits.items():
        if name.endswith("tol"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: must be a number > 0 (got {value!r})")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a whole number >= 1 (got {value!r})")


@dataclass(frozen=True)
class Extremes:
    """Which eigenpairs a Lanczos run resolves, and how accurately (its stopping test).

    Attributes:
        k_top: the largest (algebraic) eigenpairs wanted.
        k_bottom: the smallest (algebraic) eigenpairs wanted.
        tol: relative eigenvalue accuracy of the largest pair (see the module docstring).
        rest_tol: of the other top pairs (None: tol).
        bottom_tol: of the bottom pairs (None: tol), measured against their own magnitude
            (bottom_scale="value") or against the spectral radius max |theta|
            (bottom_scale="spectrum"). The most negative Hessian eigenvalues sit in a
            crowded cluster near zero, where accuracy relative to their own small size
            costs many products (35 of 52 for a trained MNIST MLP).
        bottom_scale: "value" or "spectrum" (above).
        guard: top Ritz pairs beyond the k_top wanted that must also converge, to ten times
            rest_tol but never looser than sqrt(tol), before the run may stop; they are not
            reported. A residual test proves a Ritz value is *an* eigenvalue, not the
            largest: from a random start whose component along v_1 happens to be small, a
            short run can resolve lambda_2 to tol while lambda_1 is still hidden. Making the
            Krylov space resolve one more pair closes that window (measured on MNIST MLP
            layer blocks and GGN at tol 1e-3, benchmarks/bench_lanczos_guard.py: without it
            2 of 96 cold solves stopped on lambda_2, 26% low; with guard=1 none did, for 8.3
            products a solve against 7.1; 9.9 with the guard held to rest_tol itself). The
            bottom end is not guarded: there the per-epoch tolerance is relative to
            lambda_max, a guard pair cost 16 more products (about half) on the MNIST MLP,
            and the unguarded lambda_min was within that tolerance at every start tried.
        min_steps: products before the stopping test may end the run (None: the wanted
            pairs plus the guards plus one).
    """

    k_top: int = 1
    k_bottom: int = 0
    tol: float = 1e-4
    rest_tol: float | None = None
    bottom_tol: float | None = None
    bottom_scale: str = "value"
    guard: int = 1
    min_steps: int | None = None

    def __post_init__(self) -> None:
        """Bad targets fail here, in one line, before any product."""
        if self.bottom_scale not in ("value", "spectrum"):
            raise ValueError(
                f"bottom_scale: must be 'value' or 'spectrum' (got {self.bottom_scale!r})"
            )
        _check_counts(self.k_top, self.k_bottom, self.guard)
        limits = {
            "tol": self.tol,
            "rest_tol": self.rest_tol,
            "bottom_tol": self.bottom_tol,
            "min_steps": self.min_steps,
        }
        check_solver_limits(**{name: v for name, v in limits.items() if v is not None})

    def within(self, n: int) -> _Wanted:
        """The targets on an operator of dimension n, defaults filled in."""
        if self.k_top + self.k_bottom > n:
            raise ValueError(
                f"k: at most the dimension {n} eigenpairs (got {self.k_top + self.k_bottom})"
            )
        return _Wanted(
            k_top=self.k_top,
            k_bottom=self.k_bottom,
            guard=min(self.guard, n - self.k_top - self.k_bottom) if self.k_top else 0,
            tol=self.tol,
            rest_tol=self.tol if self.rest_tol is None else self.rest_tol,
            bottom_tol=self.tol if self.bottom_tol is None else self.bottom_tol,
            bottom_scale=self.bottom_scale,
        )


def _check_counts(k_top: int, k_bottom: int, guard: int) -> None:
    for value in (k_top, k_bottom):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"k: must be a whole number >= 1 (got {value!r})")
    if k_top < 0 or k_bottom < 0 or k_top + k_bottom == 0:
        raise ValueError("k: ask for at least one eigenpair")
    if guard < 0:
        raise ValueError(f"guard: must be >= 0 (got {guard})")


def lanczos_extremes(
    op: LinearOperator,
    wanted: Extremes = Extremes(),
    *,
    max_iter: int = 100,
    seed: int = 0,
    verify: bool = False,
    start: torch.Tensor | None = None,
    run: LanczosRun | None = None,
    max_basis: int | None = None,
) -> tuple[EigenResult | None, EigenResult | None]:
    """The `wanted.k_top` largest and `wanted.k_bottom` smallest (algebraic) eigenpairs of a
    symmetric operator from one Lanczos run, each to its tolerance (`Extremes`). Returns
    (top, bottom); either is None when not asked for.

    Residuals are the Lanczos ones, beta |s_mi|; verify=True recomputes ||A v - theta v||
    with one product per pair.

    start: (m, n) or (n,) vectors to start from instead of a random vector (a warm start:
    their normalised sum, so a Krylov space of m steps spans them when they are nearly
    invariant). run: a fresh `LanczosRun` to take the steps from (instead of seed or start),
    so that a later reader, e.g. `slq_density`, continues the same Krylov space.

    max_basis: the most basis vectors held at once (default: what the operator's memory
    budget, `basis_budget` in bytes, leaves room for; no limit without one). A run that
    fills it is thick-restarted (`krylov.py`) on the wanted Ritz vectors and goes on to the
    same stopping test; `EigenResult.restarts` says how often.
    """
    n = op.dim
    require_symmetric(op, "lanczos")
    check_solver_limits(max_iter=max_iter)
    targets = wanted.within(n)
    min_steps = wanted.min_steps or min(targets.pairs + 1, n)
    if run is not None:
        if start is not None or run.state is not None:
            raise ValueError("run: must be a fresh LanczosRun, and not given with start")
        steps = iter(run)
    else:
        q0 = _start_vector(n, op.dtype, op.device, seed) if start is None else _warm(start, op)
        # a restart keeps the wanted pairs twice, a step and a few extra pairs (_restart_plan)
        rows = max_basis if max_basis is not None else basis_rows(op, 3 * targets.pairs + 3)
        capacity, keep = _restart_plan(rows, targets, n)
        # an unrestarted run is exact after n steps; a restarted one may take more
        steps = _lanczos_steps(
            op.__matmul__, q0, max_iter if keep else min(max_iter, n), capacity, keep
        )
    state, check = _run_to_convergence(steps, targets, min_steps, max_iter)
    return _results(op, state, check, targets, verify)


class _Wanted(NamedTuple):
    """An `Extremes` on one operator: the guard clipped to its dimension, the tolerances
    filled in."""

    k_top: int
    k_bottom: int
    guard: int
    tol: float
    rest_tol: float
    bottom_tol: float
    bottom_scale: str

    @property
    def pairs(self) -> int:
        return self.k_top + self.guard + self.k_bottom

    def keep(self, theta: np.ndarray, extra: int) -> np.ndarray:
        """The Ritz pairs a thick restart keeps: the wanted ones and `extra` more next to
        them (at the top when the top is wanted, else at the bottom)."""
        order = np.argsort(theta)
        top = self.k_top + self.guard + (extra if self.k_top else 0)
        bottom = self.k_bottom + (0 if self.k_top else extra)
        # both ends may meet in a small projected matrix: each pair once
        return np.union1d(order[max(len(order) - top, 0) :], order[:bottom])


class _Check(NamedTuple):
    """The stopping test at one step: the wanted indices into theta and their flags."""

    theta: np.ndarray
    s: np.ndarray
    top: np.ndarray
    bottom: np.ndarray
    top_flags: np.ndarray
    bottom_flags: np.ndarray
    invariant: bool

    def done(self, guards_met: bool) -> bool:
        return guards_met and bool(self.top_flags.all()) and bool(self.bottom_flags.all())


def _warm(start: torch.Tensor, op: LinearOperator) -> torch.Tensor:
    q0 = start.reshape(-1, op.dim).to(dtype=op.dtype, device=op.device).sum(dim=0)
    if not torch.isfinite(q0).all() or float(q0.norm()) == 0.0:
        raise ValueError("start: the start vectors sum to zero or are not finite")
    return q0 / q0.norm()


def basis_rows(op: LinearOperator, need: int = 0) -> int | None:
    """Basis vectors the operator's memory budget gives the solver (`basis_budget` bytes,
    less three working vectors: the next vector, its product and a temporary); up to `need`
    of them, where that is more, as far as the room the graphs leave goes (`basis_room`:
    the budget's share for the basis is a preference, a run that cannot restart on it is
    not). None when the operator has no budget."""
    budget = getattr(op, "basis_budget", None)
    if budget is None:
        return None
    row = op.dim * torch.empty(0, dtype=op.dtype).element_size()
    rows = max(int(budget // row) - 3, 0)
    room = getattr(op, "basis_room", None)
    if rows < need and room is not None:
        rows = max(rows, min(need, int(room // row) - 3))
    return rows


def _restart_plan(
    rows: int | None, wanted: _Wanted, n: int
) -> tuple[int | None, Callable[[np.ndarray], np.ndarray] | None]:
    """(the basis capacity, the restart's choice of Ritz pairs) for at most `rows` vectors
    held at once: a restart holds the full basis and the kept vectors together, so the
    basis may grow to rows - kept. None, None: no limit below the steps a run can take."""
    if rows is None or rows >= n:
        return None, None
    need = 2 * wanted.pairs + 1  # the kept pairs twice (during the restart) and one step
    if rows < need:
        raise MemoryError(
            f"max_memory: a Lanczos basis of {need} vectors ({wanted.pairs} pairs kept at a "
            f"restart) does not fit beside the operator's graphs; there is room for {rows}"
        )
    # a few Ritz pairs beyond the wanted ones speed convergence after a restart, while each
    # kept pair takes two rows from the steps between restarts (rows - 2 kept)
    extra = min(max(wanted.pairs, 2), (rows - need) // 4)
    return rows - wanted.pairs - extra, lambda theta: wanted.keep(theta, extra)


def _stopping_test(state: KrylovState, wanted: _Wanted) -> tuple[_Check, bool]:
    """The stopping test of the module docstring on the current Ritz pairs: the check, and
    whether the guard pairs have converged too."""
    theta, s = state.ritz()
    guarded_top, bottom = _wanted(theta, wanted.k_top + wanted.guard, wanted.k_bottom)
    top = guarded_top[: wanted.k_top]
    beta = state.beta
    floor = float(np.abs(theta).max()) if wanted.bottom_scale == "spectrum" else 0.0
    top_flags = np.concatenate(
        [
            _ritz_converged(beta, s, theta, top[:1], wanted.tol),
            _ritz_converged(beta, s, theta, top[1:], wanted.rest_tol),
        ]
    )
    bottom_flags = _ritz_converged(beta, s, theta, bottom, wanted.bottom_tol, floor)
    invariant = state.invariant()
    guard_tol = min(wanted.rest_tol * _GUARD_TOL_FACTOR, math.sqrt(wanted.tol))
    guards_met = invariant or bool(
        _ritz_converged(beta, s, theta, guarded_top[wanted.k_top :], guard_tol).all()
    )
    check = _Check(theta, s, top, bottom, top_flags, bottom_flags, invariant)
    return check, guards_met


def _run_to_convergence(
    steps: Iterator[KrylovState], wanted: _Wanted, min_steps: int, max_iter: int
) -> tuple[KrylovState, _Check]:
    """Takes Lanczos steps until the stopping test passes (after min_steps products) or
    max_iter products are spent."""
    for state in steps:
        check, guards_met = _stopping_test(state, wanted)
        if state.products >= min_steps and check.done(guards_met) or state.products >= max_iter:
            break
    return state, check


def _results(
    op: LinearOperator, state: KrylovState, check: _Check, wanted: _Wanted, verify: bool
) -> tuple[EigenResult | None, EigenResult | None]:
    """(top, bottom) EigenResults from the last step's Ritz pairs."""
    n_hvp = state.products
    ends = ((check.top, "LA", check.top_flags), (check.bottom, "SA", check.bottom_flags))
    results: list[EigenResult | None] = []
    for idx, which, flags in ends:
        if len(idx) == 0:
            results.append(None)
            continue
        vectors = state.basis.combine(torch.as_tensor(check.s[:, idx]))
        vectors = vectors / vectors.norm(dim=1, keepdim=True)
        values = torch.as_tensor(check.theta[idx], dtype=torch.float64)
        if verify:
            residuals = torch.stack(
                [
                    (op @ v).double().sub(values[i] * v.double()).norm()
                    for i, v in enumerate(vectors)
                ]
            )
            n_hvp += len(idx)
        else:
            estimate = 0.0 if check.invariant else state.beta * np.abs(check.s[-1, idx])
            residuals = torch.as_tensor(estimate, dtype=torch.float64).expand(len(idx)).clone()
        results.append(
            EigenResult(
                values=values,
                vectors=vectors,
                residuals=residuals,
                converged=torch.as_tensor(flags | check.invariant),
                n_hvp=0,
                which=which,
                method="lanczos",
                restarts=state.restarts,
            )
        )
    # n_hvp counts both groups' verification products, so it is set once both are done
    final = [None if r is None else replace(r, n_hvp=n_hvp) for r in results]
    return final[0], final[1]


def lanczos_top(
    op: LinearOperator, k: int = 1, *, tol: float = 1e-4, guard: int = 1, **options: Any
) -> EigenResult:
    """The k largest eigenpairs to tol, with `guard` guard pairs (`lanczos_extremes` with
    nothing else wanted); options: its max_iter, seed, verify, start, run, max_basis."""
    top, _ = lanczos_extremes(op, Extremes(k_top=k, tol=tol, guard=guard), **options)
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
    wanted = Extremes(k_top=k if which == "LA" else 0, k_bottom=k if which == "SA" else 0, tol=tol)
    top, bottom = lanczos_extremes(op, wanted, max_iter=max_iter, seed=seed)
    result = top if which == "LA" else bottom
    assert result is not None  # k >= 1 was checked by lanczos_extremes
    return result


def lanczos_tridiagonal(
    matvec: MatVec, v0: torch.Tensor, n_steps: int, capacity: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """n_steps of Lanczos (full reorthogonalisation) from v0; returns the Ritz values and the
    squared first components of their eigenvectors (Gauss quadrature nodes and weights).
    capacity: the most basis vectors memory allows (a quadrature cannot restart)."""
    n_steps = min(n_steps, v0.numel())
    check_basis_capacity(n_steps, capacity)
    for state in _lanczos_steps(matvec, v0 / v0.norm(), n_steps):  # noqa: B007 (the last is used)
        pass
    theta, s = state.ritz()
    return theta, s[0] ** 2


def check_basis_capacity(n_steps: int, capacity: int | None) -> None:
    """A one-line MemoryError when n_steps basis vectors pass the capacity (a quadrature,
    which cannot restart, asks for them all)."""
    if capacity is not None and n_steps > capacity:
        raise MemoryError(
            f"max_memory: {n_steps} Lanczos quadrature steps need as many basis vectors, and "
            f"the budget leaves room for {capacity}; take fewer steps or give more memory"
        )


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
        # no restart: a quadrature needs the plain recurrence; a full basis is a MemoryError
        self.capacity = basis_rows(op, min(max_steps, op.dim))
        self._steps = _lanczos_steps(op.__matmul__, q0, min(max_steps, op.dim), self.capacity)
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
        return 0 if self.state is None else self.state.products

    def quadrature(self, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """Gauss quadrature nodes and weights (Ritz values, squared first components) of the
        first n_steps steps, running the recurrence on as far as needed."""
        self.extend(n_steps)
        assert self.state is not None
        alphas, betas = self.state.alphas, self.state.betas
        m = min(n_steps, len(alphas))
        part = KrylovState(self.state.basis, alphas[:m], betas[: m - 1])
        theta, s = part.ritz()
        return theta, s[0] ** 2

    def extend(self, n_steps: int) -> None:
        """Run on to n_steps steps (fewer when the Krylov space turns invariant or the run's
        max_steps is reached)."""
        for _ in iter(self) if self.n_steps < n_steps else ():
            if self.n_steps >= n_steps:
                break


def _lanczos_steps(
    matvec: MatVec,
    q: torch.Tensor,
    max_steps: int,
    capacity: int | None = None,
    keep: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Iterator[KrylovState]:
    """The Lanczos recurrence with full reorthogonalisation (classical Gram-Schmidt, repeated
    once when the first pass cancelled heavily). After each product it yields the
    `KrylovState` (the same object, updated); it ends after max_steps products or once the
    Krylov space is invariant. The caller stops it earlier by breaking out of the loop.

    capacity: the most basis vectors held (None: no limit); a full basis is thick-restarted
    on the Ritz pairs keep(theta) chooses, or, without `keep`, ends the run with a
    one-line MemoryError."""
    state = KrylovState(KrylovBasis(q.numel(), q.dtype, q.device, capacity))
    while state.products < max_steps:
        state.basis.append(q)
        w = matvec(q)
        if w.data_ptr() == q.data_ptr():  # an operator that hands its input back: keep q
            w = w.clone()
        state.products += 1
        state.alphas.append(dot(w, q))
        before = norm(w)
        w = state.basis.orthogonalise(w, in_place=True)  # the product is used once
        state.beta = norm(w)
        if state.beta < _REORTHOGONALISE_BELOW * before:  # heavy cancellation: a second pass
            w = state.basis.orthogonalise(w, in_place=True)
            state.beta = norm(w)
        yield state
        if state.invariant():
            return
        state.betas.append(state.beta)
        q = w.div_(state.beta)
        if state.basis.full and state.products < max_steps:
            if keep is None:
                raise MemoryError(
                    f"max_memory: {max_steps} Lanczos steps need as many basis vectors, and "
                    f"the budget leaves room for {capacity}; take fewer steps or give more memory"
                )
            theta, s = state.ritz()
            state.restart(keep(theta), theta, s)


def power_iteration(
    op: LinearOperator, *, k: int = 1, tol: float = 1e-3, max_iter: int = 100, seed: int = 0
) -> EigenResult:
    """Power iteration with deflation, as in PyHessian (stops when the eigenvalue estimate
    changes by less than tol relative). Finds the k eigenvalues largest in *magnitude*."""
    matvec, n, dtype, device = op.__matmul__, op.dim, op.dtype, op.device
    check_solver_limits(tol=tol, max_iter=max_iter)
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
