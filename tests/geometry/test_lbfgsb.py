"""The direct L-BFGS-B driver takes scipy.optimize.minimize's steps exactly."""

import numpy as np
import pytest
from scipy.optimize import Bounds, minimize

import lossgeo.geometry.lbfgsb as lbfgsb
from lossgeo.geometry.lbfgsb import minimize_in_box


def problem(n: int = 40, seed: int = 0):
    """A non-convex function whose box minimum has active and inactive bounds."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    a = a @ a.T / n
    b = rng.standard_normal(n)

    def fun(x):
        value = -0.5 * x @ a @ x + b @ x + np.sin(3 * x).sum()
        return float(value), -a @ x + b + 3 * np.cos(3 * x)

    bound = rng.uniform(0.1, 1.0, n)
    return fun, -bound, bound


@pytest.mark.parametrize("max_iter", [1, 3, 10])
def test_same_iterates_as_scipy_minimize(max_iter):
    fun, lower, upper = problem()
    expected = minimize(
        fun,
        np.zeros(40),
        jac=True,
        method="L-BFGS-B",
        bounds=Bounds(lower, upper),
        options={"maxiter": max_iter},
    )
    result = minimize_in_box(fun, np.zeros(40), lower, upper, max_iter=max_iter)
    assert np.array_equal(result.x, expected.x)
    assert result.fun == expected.fun
    assert result.n_iterations == expected.nit
    assert result.n_evaluations == expected.nfev
    # some bounds are active at the answer, some are not: the box matters
    at_bound = np.isclose(result.x, lower) | np.isclose(result.x, upper)
    if max_iter == 10:
        assert 0 < at_bound.sum() < 40


def test_fallback_to_scipy_minimize_gives_the_same_point(monkeypatch):
    fun, lower, upper = problem(seed=1)
    direct = minimize_in_box(fun, np.zeros(40), lower, upper, max_iter=5)
    monkeypatch.setattr(lbfgsb, "_compiled_setulb", lambda: None)
    public = minimize_in_box(fun, np.zeros(40), lower, upper, max_iter=5)
    assert np.array_equal(direct.x, public.x) and direct.fun == public.fun


def test_start_is_clipped_into_the_box():
    fun, lower, upper = problem(seed=2)
    result = minimize_in_box(fun, np.full(40, 5.0), lower, upper, max_iter=1)
    assert (result.x >= lower).all() and (result.x <= upper).all()


@pytest.mark.parametrize(
    "lower, upper, message",
    [
        (np.array([-np.inf]), np.array([1.0]), "must be finite"),
        (np.array([1.0]), np.array([0.0]), "lower bound is above"),
    ],
)
def test_bad_bounds_are_refused(lower, upper, message):
    with pytest.raises(ValueError, match=message):
        minimize_in_box(lambda x: (0.0, np.zeros(1)), np.zeros(1), lower, upper, max_iter=1)
