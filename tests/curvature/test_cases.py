"""Every curvature estimator on every shared case (tests/cases.py), against the exact
Hessian: products, top and bottom eigenvalues, trace, density mean, layer-wise blocks, the
Tracker's per-step lambda_max; and the model left exactly as it was."""

import pytest
import torch

from lossgeo import StepSettings, Tracker
from lossgeo.curvature import (
    HessianOperator,
    Scope,
    hessian_eigen,
    hessian_trace,
    layerwise_lambda_max,
    spectral_density,
)
from lossgeo.curvature.params import ParameterSpace
from lossgeo.models import parameter_blocks

from ..conftest import float64_default
from .cases import CASE_NAMES, case


@pytest.fixture(params=CASE_NAMES)
def shared(request):
    with float64_default():
        c = case(request.param)
        before = {k: v.clone() for k, v in c.model.state_dict().items()}
        modes = [m.training for m in c.model.modules()]
        yield c
        # whatever a test measured, the model is bitwise as it was
        assert all(torch.equal(v, c.model.state_dict()[k]) for k, v in before.items())
        assert modes == [m.training for m in c.model.modules()]


def test_products_equal_the_exact_hessian(shared):
    exact = shared.reference()
    op = HessianOperator(shared.model, shared.loss_fn, shared.data)
    assert op.dim == exact.shape[0]  # frozen parameters are not part of it
    assert torch.allclose(op.to_dense(), exact, atol=1e-10)


def test_extreme_eigenvalues_trace_and_density_mean(shared):
    eigenvalues = torch.linalg.eigvalsh(shared.reference())
    top = hessian_eigen(shared.model, shared.loss_fn, shared.data, k=2, tol=1e-10)
    bottom = hessian_eigen(shared.model, shared.loss_fn, shared.data, which="SA", tol=1e-10)
    assert torch.allclose(top.values, eigenvalues.flip(0)[:2], rtol=1e-8, atol=1e-10)
    assert float(bottom.values[0]) == pytest.approx(float(eigenvalues[0]), rel=1e-8, abs=1e-10)
    n = len(eigenvalues)
    trace = hessian_trace(
        shared.model, shared.loss_fn, shared.data, method="hutch++", n_samples=3 * n
    )  # a sketch of the whole space: exact
    assert trace.value == pytest.approx(float(eigenvalues.sum()), rel=1e-8, abs=1e-10)
    density = spectral_density(shared.model, shared.loss_fn, shared.data, n_steps=n, n_vectors=4)
    assert density.nodes.max() == pytest.approx(float(eigenvalues[-1]), rel=1e-6)


def test_layerwise_blocks_and_tracker(shared):
    exact = shared.reference()
    space = ParameterSpace(shared.model)
    slices = space.slices()
    blocks = layerwise_lambda_max(
        shared.model, shared.loss_fn, shared.data, tol=1e-10, scope=Scope(params=space.names)
    )
    assert set(blocks) == set(parameter_blocks(shared.model, space.names))
    for module, result in blocks.items():
        idx = torch.cat(
            [
                torch.arange(slices[n].start, slices[n].stop)
                for n in parameter_blocks(shared.model, space.names)[module]
            ]
        )
        want = float(torch.linalg.eigvalsh(exact[idx][:, idx])[-1])
        assert float(result.values[0]) == pytest.approx(want, rel=1e-8, abs=1e-10)
    tracker = Tracker(
        shared.model,
        shared.loss_fn,
        shared.data,
        steps=StepSettings(every=1, batch_size=3, tol=1e-8),
        logger=_Silent(),
    )
    lam = float(torch.linalg.eigvalsh(exact)[-1])
    for step in (1, 2):  # a cold solve, then a warm one on the same Hessian
        assert tracker.step(step)["step/lambda_max"] == pytest.approx(lam, rel=1e-7)


class _Silent:
    def log_metrics(self, metrics, step=0):
        pass

    def set_tags(self, tags):
        pass
