"""Stability thresholds per optimizer, checked by running the optimizers on quadratics, and
the preconditioned sharpness of Adam against its closed form."""

import math

import pytest
import torch
from torch import nn

from lossgeo.curvature import BatchSampling, hessian_eigen
from lossgeo.curvature.lanczos import lanczos
from lossgeo.curvature.operators import HessianOperator
from lossgeo.curvature.params import ParameterSpace
from lossgeo.curvature.stability import (
    preconditioned_operator,
    preconditioner,
    stability_edge,
)


def diverges(make_optimizer, curvature: float, steps: int = 3000) -> bool:
    """Runs the optimizer on L(w) = curvature w^2 / 2 from w = 1."""
    w = nn.Parameter(torch.ones(1, dtype=torch.float64))
    optimizer = make_optimizer([w])
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * curvature * w**2).sum().backward()
        optimizer.step()
    return not math.isfinite(float(w)) or abs(float(w)) > 1.0


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, dampening=0.3),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    ],
    ids=["gd", "heavy-ball", "dampened", "nesterov"],
)
def test_the_sgd_thresholds_separate_convergence_from_divergence(make):
    edge = stability_edge(make([nn.Parameter(torch.ones(1))]))
    assert not edge.preconditioned
    assert not diverges(make, 0.98 * edge.threshold)
    assert diverges(make, 1.02 * edge.threshold)


def test_adaptive_thresholds_and_unknown_optimizers():
    p = [nn.Parameter(torch.ones(1))]
    adam = stability_edge(torch.optim.AdamW(p, lr=1e-3, betas=(0.9, 0.999)))
    assert adam.preconditioned and adam.threshold == pytest.approx(38 / 1e-3)
    assert stability_edge(torch.optim.RMSprop(p, lr=0.01)).threshold == pytest.approx(200)
    assert stability_edge(torch.optim.Adagrad(p)).threshold is None
    assert "no known" in stability_edge(torch.optim.Adagrad(p)).note
    two_groups = torch.optim.SGD(
        [{"params": p, "lr": 0.1}, {"params": [nn.Parameter(torch.ones(1))], "lr": 0.2}]
    )
    edge = stability_edge(two_groups)
    assert edge.threshold is None and "lr" in edge.note
    # a schedule is followed: the threshold is read at each call
    sgd = torch.optim.SGD(p, lr=0.1)
    sgd.param_groups[0]["lr"] = 0.05
    assert stability_edge(sgd).threshold == pytest.approx(40)
    # a schedule that ends at 0 has no threshold there (not a division by zero)
    sgd.param_groups[0]["lr"] = 0.0
    assert stability_edge(sgd).threshold is None and "lr is 0" in stability_edge(sgd).note


class Wrapper:
    """How Accelerate (`.optimizer`) and Lightning (`._optimizer`) hold the stepping one."""

    def __init__(self, inner, attribute):
        setattr(self, attribute, inner)
        self.param_groups = inner.param_groups


@pytest.mark.parametrize("attribute", ["optimizer", "_optimizer"])
def test_wrapped_optimizers_are_read_through(attribute):
    p = [nn.Parameter(torch.ones(2))]
    adam = torch.optim.Adam(p, lr=1e-2)
    wrapped = Wrapper(Wrapper(adam, attribute), attribute)
    assert stability_edge(wrapped).threshold == pytest.approx(38 / 1e-2)
    assert stability_edge(wrapped).preconditioned
    p[0].grad = torch.tensor([0.3, -0.4])
    adam.step()
    model = nn.Module()
    model.w = p[0]
    conditioner, why = preconditioner(wrapped, model, ParameterSpace(model))
    assert why == "" and conditioner == pytest.approx(torch.tensor([0.3, 0.4]) + 1e-8)


H = torch.diag(torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64))
H[0, 1] = H[1, 0] = 0.5


class Point(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(x), -1)


def quadratic(out, _):
    return 0.5 * torch.einsum("bi,ij,bj->b", out, H, out).mean()


DATA = (torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2))


def test_preconditioned_sharpness_of_adam_matches_the_closed_form_and_changes_nothing():
    model = Point()
    space = ParameterSpace(model)
    adam = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    p, why = preconditioner(adam, model, space)
    assert p is None and "not stepped" in why  # absent and explained, not zero
    for _ in range(3):
        adam.zero_grad()
        quadratic(model(DATA[0]), None).backward()
        adam.step()
    state = {k: v.clone() for k, v in adam.state[model.w].items()}
    weights = model.w.detach().clone()
    p, why = preconditioner(adam, model, space)
    assert why == ""
    v_hat = state["exp_avg_sq"] / (1 - 0.99 ** float(state["step"]))
    expected_p = v_hat.sqrt() + 1e-8
    assert torch.equal(p, expected_p)
    op = HessianOperator(model, quadratic, DATA)
    value = lanczos(preconditioned_operator(op, p), k=1, tol=1e-10).values[0]
    d = expected_p.rsqrt()
    dense = torch.linalg.eigvalsh(d[:, None] * H * d[None, :]).max()
    assert float(value) == pytest.approx(float(dense), rel=1e-8)
    # P^-1/2 H P^-1/2 and P^-1 H share their eigenvalues
    assert float(dense) == pytest.approx(
        float(torch.linalg.eigvals(H / expected_p[:, None]).real.max()), rel=1e-9
    )
    for key, tensor in adam.state[model.w].items():
        assert torch.equal(tensor, state[key]), key
    assert torch.equal(model.w.detach(), weights)
    assert hessian_eigen(model, quadratic, DATA, k=1).values[0] == pytest.approx(
        float(torch.linalg.eigvalsh(H).max())
    )


def test_a_bad_preconditioner_is_refused():
    op = HessianOperator(Point(), quadratic, DATA)
    with pytest.raises(ValueError, match="positive"):
        preconditioned_operator(op, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="length 3"):
        preconditioned_operator(op, torch.ones(2, dtype=torch.float64))


def test_preconditioned_batch_sharpness_is_the_curvature_along_adams_step():
    from lossgeo.curvature.stochastic import batch_sharpness

    model = Point()
    p = torch.tensor([0.5, 2.0, 0.1], dtype=torch.float64)
    # one batch holding the whole probe set: the expectation is that batch's value
    result = batch_sharpness(
        model, quadratic, DATA, BatchSampling(batch_size=2, min_batches=1), preconditioner=p
    )
    g = H @ model.w.detach()
    u = g / p
    assert result.value == pytest.approx(float(u @ H @ u / (g @ u)), rel=1e-10)
    plain = batch_sharpness(model, quadratic, DATA, BatchSampling(batch_size=2, min_batches=1))
    assert plain.value == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-10)
