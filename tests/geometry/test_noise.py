"""The gradient noise scale against per-sample gradients computed one at a time."""

import pytest
import torch
from torch.func import functional_call

from lossgeo.curvature.operators import ParameterSpace
from lossgeo.geometry.noise import gradient_noise_scale
from lossgeo.losses import cross_entropy

from ..curvature.test_curvature import assert_unchanged, snapshot, tiny_mlp, toy_data


class WithUnusedParameter(torch.nn.Module):
    """vmap returns an expanded (stride 0) per-sample gradient for the unused parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.body = tiny_mlp()
        self.unused = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.body(x)


def reference(model, x, y):
    space = ParameterSpace(model)
    grads = torch.stack([space.flatten(torch.func.grad(lambda p, i=i: cross_entropy(
        functional_call(model, p, (x[i:i + 1],)), y[i:i + 1]))(space.values))
        for i in range(len(y))])
    mean = grads.mean(0)
    trace = ((grads - mean) ** 2).sum() / (len(y) - 1)
    return float(trace / mean.pow(2).sum()), float(trace), float(mean.pow(2).sum())


@pytest.mark.parametrize("chunk_size", [1, 4, 9, 64])
@pytest.mark.parametrize("make", [tiny_mlp, WithUnusedParameter])
def test_matches_per_sample_loop_for_any_chunking(float64, make, chunk_size):
    """Chunks of 4 over 9 samples end with a chunk of one; 1 and 64 are the extremes."""
    model, (x, y) = make(), toy_data(n=9)
    before = snapshot(model)
    b_simple, trace, g_sq = reference(model, x, y)
    result = gradient_noise_scale(model, cross_entropy, (x, y), chunk_size=chunk_size)
    assert result.b_simple == pytest.approx(b_simple, rel=1e-10)
    assert result.trace_covariance == pytest.approx(trace, rel=1e-10)
    assert result.gradient_norm_sq == pytest.approx(g_sq, rel=1e-10)
    assert result.n_samples == 9
    assert_unchanged(model, before)


def test_one_sample_is_refused(float64):
    model, (x, y) = tiny_mlp(), toy_data(n=1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        gradient_noise_scale(model, cross_entropy, (x, y))
