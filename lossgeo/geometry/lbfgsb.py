"""Box-constrained minimisation by L-BFGS-B (Byrd, Lu, Nocedal & Zhu 1995), through scipy.

scipy.optimize.minimize(method="L-BFGS-B") spends most of its time on large problems outside
the algorithm: it converts the bounds and classifies each variable's bound in a Python loop
(about 1.8 s of eps-sharpness's 2.7 s on a 0.5M-parameter MLP, the 12 loss and gradient
evaluations taking 0.5 s). ``minimize_in_box`` drives the same compiled routine (scipy's
``setulb``, a C translation of the Fortran code since scipy 1.15) with the bounds already
as arrays and the same defaults, so it takes the same steps and returns the same point; a
test pins that against ``scipy.optimize.minimize``. On a scipy whose private routine has
another signature it falls back to ``minimize``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy
from scipy.optimize import Bounds, minimize

# scipy.optimize.minimize's L-BFGS-B defaults
MAXCOR = 10
FTOL = 2.2204460492503131e-09
GTOL = 1e-5
MAXLS = 20
MAXFUN = 15000

# setulb's task codes (scipy >= 1.15): evaluate f and g at x; a new iterate is ready
_TASK_FG, _TASK_NEW_X, _TASK_STOP = 3, 1, 5
_STOP_MAXITER, _STOP_MAXFUN = 504, 502

FunctionAndGradient = Callable[[np.ndarray], tuple[float, np.ndarray]]


@dataclass(frozen=True)
class BoxMinimum:
    x: np.ndarray
    fun: float
    n_iterations: int
    n_evaluations: int


def _compiled_setulb() -> Callable | None:
    """scipy's C setulb when its signature is the one driven here (scipy 1.15 onwards)."""
    major, minor = (int(part) for part in scipy.__version__.split(".")[:2])
    if (major, minor) < (1, 15):
        return None
    try:
        from scipy.optimize import _lbfgsb
    except ImportError:
        return None
    return getattr(_lbfgsb, "setulb", None)


def minimize_in_box(
    fun: FunctionAndGradient, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray, *, max_iter: int
) -> BoxMinimum:
    """min fun(x) over lower <= x <= upper (finite bounds), at most `max_iter` iterations,
    from x0 clipped into the box; `fun` returns the value and the gradient."""
    lower = np.ascontiguousarray(lower, dtype=np.float64)
    upper = np.ascontiguousarray(upper, dtype=np.float64)
    if not (np.isfinite(lower).all() and np.isfinite(upper).all()):
        raise ValueError("bounds: must be finite")
    if (lower > upper).any():
        raise ValueError("bounds: a lower bound is above its upper bound")
    x = np.clip(np.asarray(x0, dtype=np.float64).ravel(), lower, upper)
    setulb = _compiled_setulb()
    if setulb is not None:
        try:
            return _drive(setulb, fun, x, lower, upper, max_iter)
        except TypeError:  # another private signature: the public wrapper still works
            pass
    count = [0]

    def counted(z: np.ndarray) -> tuple[float, np.ndarray]:
        count[0] += 1
        return fun(z)

    result = minimize(
        counted,
        x,
        jac=True,
        method="L-BFGS-B",
        bounds=Bounds(lower, upper),
        options={"maxiter": max_iter},
    )
    return BoxMinimum(
        x=result.x, fun=float(result.fun), n_iterations=int(result.nit), n_evaluations=count[0]
    )


def _drive(
    setulb: Callable,
    fun: FunctionAndGradient,
    x: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    max_iter: int,
) -> BoxMinimum:
    n, m = len(x), MAXCOR
    nbd = np.full(n, 2, dtype=np.int32)  # 2: bounded below and above
    f = np.array(0.0, dtype=np.float64)
    g = np.zeros(n, dtype=np.float64)
    wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m, dtype=np.float64)
    iwa = np.zeros(3 * n, dtype=np.int32)
    task = np.zeros(2, dtype=np.int32)
    ln_task = np.zeros(2, dtype=np.int32)
    lsave = np.zeros(4, dtype=np.int32)
    isave = np.zeros(44, dtype=np.int32)
    dsave = np.zeros(29, dtype=np.float64)
    factr = FTOL / np.finfo(float).eps
    n_iterations = n_evaluations = 0
    while True:
        setulb(
            m,
            x,
            lower,
            upper,
            nbd,
            f,
            g,
            factr,
            GTOL,
            wa,
            iwa,
            task,
            lsave,
            isave,
            dsave,
            MAXLS,
            ln_task,
        )
        if task[0] == _TASK_FG:
            value, gradient = fun(x.copy())
            f = np.array(value, dtype=np.float64)
            g = np.ascontiguousarray(gradient, dtype=np.float64)
            n_evaluations += 1
        elif task[0] == _TASK_NEW_X:
            n_iterations += 1
            if n_iterations >= max_iter:
                task[0], task[1] = _TASK_STOP, _STOP_MAXITER
            elif n_evaluations > MAXFUN:
                task[0], task[1] = _TASK_STOP, _STOP_MAXFUN
        else:
            break
    return BoxMinimum(x=x, fun=float(f), n_iterations=n_iterations, n_evaluations=n_evaluations)
