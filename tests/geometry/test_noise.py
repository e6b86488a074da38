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


class TiedLayers(torch.nn.Sequential):
    """One Linear layer applied twice: its per-sample gradient is a sum of two outer
    products, so the chain shortcut must not be taken."""

    def __init__(self) -> None:
        square = torch.nn.Linear(4, 4)
        super().__init__(square, torch.nn.Tanh(), square, torch.nn.Linear(4, 3))


def lossgeo_mlp_with_a_frozen_bias():
    """The package's MLP (a chain through as_sequence) with one frozen parameter."""
    from lossgeo.models import MLP

    torch.manual_seed(3)
    model = MLP(4, n_classes=3, hidden=(6, 5), activation="relu")
    model.net[1].bias.requires_grad_(False)
    return model


def small_cnn():
    from lossgeo.models import CNN

    torch.manual_seed(4)
    return CNN(1, image_size=8, n_classes=3, channels=(2, 3), hidden=5)


def reference(model, x, y):
    space = ParameterSpace(model)
    grads = torch.stack(
        [
            space.flatten(
                torch.func.grad(
                    lambda p, i=i: cross_entropy(
                        functional_call(model, p, (x[i : i + 1],)), y[i : i + 1]
                    )
                )(space.values)
            )
            for i in range(len(y))
        ]
    )
    mean = grads.mean(0)
    trace = ((grads - mean) ** 2).sum() / (len(y) - 1)
    return float(trace / mean.pow(2).sum()), float(trace), float(mean.pow(2).sum())


@pytest.mark.parametrize("chunk_size", [1, 4, 9, 64])
@pytest.mark.parametrize(
    "make", [tiny_mlp, lossgeo_mlp_with_a_frozen_bias, TiedLayers, WithUnusedParameter]
)
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


def test_convolutional_model_uses_per_sample_gradients_and_is_exact(float64):
    model = small_cnn()
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(7, 1, 8, 8, generator=gen), torch.randint(0, 3, (7,), generator=gen)
    b_simple, _, _ = reference(model, x, y)
    assert gradient_noise_scale(
        model, cross_entropy, (x, y), chunk_size=3
    ).b_simple == pytest.approx(b_simple, rel=1e-10)
