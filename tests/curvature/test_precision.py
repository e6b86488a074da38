"""Precision: measurements inside a training loop's autocast region are taken in fp32
unless asked; compute_dtype="bf16" runs the products' forward passes in bf16."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lossgeo.curvature import (
    CurvatureSettings,
    Scope,
    hessian_eigen,
    hessian_trace,
    measure_curvature,
)


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4))
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(64, 12, generator=gen), torch.randint(0, 4, (64,), generator=gen)


def test_inside_autocast_the_measurement_is_the_fp32_one():
    model, x, y = problem()
    want = hessian_eigen(model, F.cross_entropy, (x, y), k=2, tol=1e-8)
    want_trace = hessian_trace(model, F.cross_entropy, (x, y), n_samples=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hessian_eigen(model, F.cross_entropy, (x, y), k=2, tol=1e-8)
        got_trace = hessian_trace(model, F.cross_entropy, (x, y), n_samples=4)
        measures = measure_curvature(
            model, F.cross_entropy, (x, y), CurvatureSettings(k=2, tol=1e-8, trace_samples=0)
        )
    assert torch.equal(got.values, want.values) and got.vectors.dtype == torch.float32
    assert got_trace.value == want_trace.value
    assert measures.lambda_max == pytest.approx(float(want.values[0]), rel=1e-6)


def test_bf16_products_are_close_to_fp32_but_not_equal():
    model, x, y = problem()
    exact = hessian_eigen(model, F.cross_entropy, (x, y), k=1, tol=1e-8)
    for method in ("graph", "fwdrev"):
        bf16 = hessian_eigen(
            model,
            F.cross_entropy,
            (x, y),
            k=1,
            tol=1e-8,
            scope=Scope(compute_dtype="bf16", hvp_method=method),
        )
        error = abs(float(bf16.values[0] / exact.values[0]) - 1)
        assert 0 < error < 2e-2, method  # bf16 has 8 bits of mantissa: about 4e-3 a rounding
        overlap = float(abs(bf16.vectors[0] @ exact.vectors[0]))
        assert overlap > 0.99


@pytest.mark.parametrize("value", ["int8", torch.float64, "bfloat"])
def test_a_bad_compute_dtype_is_refused(value):
    with pytest.raises(ValueError, match="compute_dtype: must be"):
        Scope(compute_dtype=value)
