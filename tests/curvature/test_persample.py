"""Per-sample quantities of Linear chains, against per-sample gradients formed one by one."""

import pytest
import torch
from torch.func import functional_call

from lossgeo.curvature.measure import CurvatureSettings, measure_curvature
from lossgeo.curvature.operators import EmpiricalFisherOperator, ParameterSpace
from lossgeo.curvature.persample import fisher_gram, linear_chain
from lossgeo.losses import cross_entropy, half_squared_error
from lossgeo.models import CNN, MLP

from .test_curvature import tiny_mlp, toy_data


def per_sample_gradients(model, loss_fn, x, y):
    space = ParameterSpace(model)
    return torch.stack(
        [
            space.flatten(
                torch.func.grad(
                    lambda p, i=i: loss_fn(
                        functional_call(model, {**space.frozen, **p}, (x[i : i + 1],)), y[i : i + 1]
                    )
                )(space.values)
            )
            for i in range(len(y))
        ]
    )


def mlp_with_frozen_weight():
    torch.manual_seed(2)
    model = MLP(4, n_classes=3, hidden=(6,), activation="tanh")
    model.net[1].weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("make", [tiny_mlp, mlp_with_frozen_weight])
@pytest.mark.parametrize("loss_fn", [cross_entropy, half_squared_error])
def test_fisher_gram_has_the_empirical_fishers_spectrum(float64, make, loss_fn):
    """(1/n) G G^T and (1/n) G^T G share their nonzero eigenvalues; chunks of 4 over 9
    samples check that the Gram is assembled across chunks."""
    model, (x, y) = make(), toy_data(n=9)
    grads = per_sample_gradients(model, loss_fn, x, y)
    dense = grads.T @ grads / 9
    gram = fisher_gram(model.eval(), loss_fn, (x, y), chunk_size=4)
    assert gram.shape == (9, 9) and gram.dtype == torch.float64
    assert torch.allclose(gram, grads @ grads.T / 9, rtol=1e-10, atol=1e-14)
    top = torch.linalg.eigvalsh(dense)[-3:]
    assert torch.allclose(torch.linalg.eigvalsh(gram)[-3:], top, rtol=1e-10)


def test_models_that_are_not_linear_chains_get_none(float64):
    assert (
        fisher_gram(
            CNN(1, image_size=8, n_classes=3, channels=(2, 3), hidden=5),
            cross_entropy,
            (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])),
        )
        is None
    )
    model = tiny_mlp()
    model.extra = torch.nn.Parameter(torch.ones(2))  # a trainable parameter off the chain
    assert linear_chain(model, ParameterSpace(model)) is None


def test_per_epoch_fisher_lambda_max_is_exact_for_a_chain_and_matches_the_operator(float64):
    """The chain path's lambda_max_fisher is the dense Fisher's top eigenvalue to rounding;
    the operator path (Lanczos to 1e-3) agrees within its tolerance and costs products."""
    model, (x, y) = tiny_mlp(seed=3, hidden=7), toy_data(n=11)
    grads = per_sample_gradients(model, cross_entropy, x, y)
    exact = float(torch.linalg.eigvalsh(grads.T @ grads / 11)[-1])
    measures = measure_curvature(model, cross_entropy, (x, y), CurvatureSettings(k=2))
    assert measures.fisher_lambda_max == pytest.approx(exact, rel=1e-10)
    from lossgeo.curvature.lanczos import lanczos_top

    operator = lanczos_top(EmpiricalFisherOperator(model, cross_entropy, (x, y)), tol=1e-3)
    assert float(operator.values[0]) == pytest.approx(exact, rel=1e-3)
