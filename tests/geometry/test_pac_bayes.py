"""PAC-Bayes flatness against the closed form of a quadratic loss, and its bad inputs."""

import math

import pytest
import torch
from torch import nn

from lossgeo.geometry.pac_bayes import MAGNITUDE_EPS, NoiseDraws, pac_bayes_flatness

H = torch.arange(1.0, 7.0, dtype=torch.float64)  # diagonal Hessian, trace 21
CENTRE = torch.tensor([0.5, -1.0, 2.0, 0.25, -0.75, 1.5], dtype=torch.float64)


class Point(nn.Module):
    """A model whose output is its weight vector: L(w) = 1/2 (w - c)^T H (w - c) exactly."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(x), -1)


def quadratic(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return 0.5 * (((out - CENTRE) ** 2) * H).sum(dim=1).mean()


DATA = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4))


def test_plain_sigma_matches_the_closed_form_at_a_minimum():
    # E[L(c + sigma z)] - L(c) = sigma^2 tr(H) / 2  =>  sigma* = sqrt(2 delta / tr H)
    model = Point(CENTRE)
    found = pac_bayes_flatness(
        model, quadratic, DATA, max_increase=0.1, draws=NoiseDraws(n_samples=1500), rtol=0.005
    )
    expected = math.sqrt(2 * 0.1 / float(H.sum()))
    assert found.sigma == pytest.approx(expected, rel=0.04)
    assert found.flatness == pytest.approx(1 / found.sigma**2)
    assert found.base_loss == pytest.approx(0.0, abs=1e-15)
    assert found.increase <= 0.1


def test_magnitude_aware_sigma_matches_the_closed_form_away_from_zero_weights():
    # u_i ~ N(0, sigma^2 w_i^2 + eps^2): E increase = 1/2 sum H_i (sigma^2 w_i^2 + eps^2)
    model = Point(CENTRE)
    found = pac_bayes_flatness(
        model,
        quadratic,
        DATA,
        max_increase=0.1,
        magnitude_aware=True,
        draws=NoiseDraws(n_samples=1500),
        rtol=0.005,
    )
    floor = MAGNITUDE_EPS**2 * float(H.sum())
    expected = math.sqrt((2 * 0.1 - floor) / float((H * CENTRE**2).sum()))
    assert found.sigma == pytest.approx(expected, rel=0.04)
    assert found.magnitude_aware


def test_a_sharper_quadratic_is_less_flat_and_the_model_is_untouched():
    model = Point(CENTRE)
    before = model.w.detach().clone()
    flat = pac_bayes_flatness(model, quadratic, DATA, draws=NoiseDraws(n_samples=200))
    sharp = pac_bayes_flatness(
        model, lambda out, y: 4 * quadratic(out, y), DATA, draws=NoiseDraws(n_samples=200)
    )
    # four times the curvature halves sigma*
    assert sharp.sigma == pytest.approx(flat.sigma / 2, rel=0.03)
    assert torch.equal(model.w.detach(), before) and model.w.grad is None


def test_same_seed_same_answer():
    model = Point(CENTRE + 0.1)
    a = pac_bayes_flatness(model, quadratic, DATA, draws=NoiseDraws(n_samples=20, seed=3))
    b = pac_bayes_flatness(model, quadratic, DATA, draws=NoiseDraws(n_samples=20, seed=3))
    assert a == b


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_increase": 0.0}, "max_increase"),
        ({"rtol": 1.5}, "rtol"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pac_bayes_flatness(Point(CENTRE), quadratic, DATA, **kwargs)


@pytest.mark.parametrize(
    "draws, message",
    [
        ({"n_samples": 0}, "n_samples: must be >= 1"),
        ({"n_samples": 2.5}, "n_samples: must be a whole"),
        ({"eps": -1e-3}, "eps: must be >= 0"),
    ],
)
def test_bad_draws_are_refused_in_one_line(draws, message):
    with pytest.raises(ValueError, match=message) as error:
        NoiseDraws(**draws)
    assert "\n" not in str(error.value)


def test_a_non_finite_loss_at_the_weights_is_refused():
    model = Point(CENTRE.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="not finite"):
        pac_bayes_flatness(model, quadratic, DATA)
