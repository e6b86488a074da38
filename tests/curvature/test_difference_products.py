"""Hessian-vector products by central differences of gradients (method="fd"): no double
backward, against the exact product (benchmarks/bench_fd_step.py chose the steps)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lossgeo.curvature import HessianOperator, Scope, hessian_eigen


def smooth_problem(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=gen).to(dtype)
    y = torch.randint(0, 3, (40,), generator=gen)
    return model, (x, y)


@pytest.mark.parametrize(
    "dtype,product_tol,eigen_tol", [(torch.float64, 1e-7, 1e-7), (torch.float32, 1e-3, 1e-3)]
)
def test_difference_products_match_the_exact_product(dtype, product_tol, eigen_tol):
    model, data = smooth_problem(dtype)
    exact = HessianOperator(model, F.cross_entropy, data)
    fd = HessianOperator(model, F.cross_entropy, data, scope=Scope(hvp_method="fd"))
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.randn(exact.dim, generator=gen).to(dtype)
        want = exact @ v
        assert float((fd @ v - want).norm() / want.norm()) < product_tol
    top = hessian_eigen(model, F.cross_entropy, data, tol=1e-6 if dtype == torch.float32 else 1e-10)
    top_fd = hessian_eigen(
        model,
        F.cross_entropy,
        data,
        tol=1e-6 if dtype == torch.float32 else 1e-10,
        scope=Scope(hvp_method="fd"),
    )
    assert float(top_fd.values[0]) == pytest.approx(float(top.values[0]), rel=eigen_tol)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fd @ torch.ones(exact.dim, dtype=dtype)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_difference_products_take_no_double_backward():
    """A model whose backward cannot be differentiated again is measured by differences."""

    class OnceDifferentiable(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.tanh(x)

        @staticmethod
        def backward(ctx, grad_out):
            (x,) = ctx.saved_tensors
            with torch.no_grad():  # no graph: double backward through here is impossible
                return grad_out * (1 - torch.tanh(x) ** 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 3)

        def forward(self, x):
            return self.fc2(OnceDifferentiable.apply(self.fc1(x)))

    model, data = smooth_problem(torch.float64)
    net = Net().double()
    net.load_state_dict(
        {
            "fc1.weight": model[0].weight,
            "fc1.bias": model[0].bias,
            "fc2.weight": model[2].weight,
            "fc2.bias": model[2].bias,
        }
    )
    exact = float(hessian_eigen(model, F.cross_entropy, data, tol=1e-10).values[0])
    by_differences = hessian_eigen(
        net, F.cross_entropy, data, tol=1e-10, scope=Scope(hvp_method="fd")
    )
    assert float(by_differences.values[0]) == pytest.approx(exact, rel=1e-7)


def test_a_bad_difference_step_is_refused():
    model, data = smooth_problem(torch.float64)
    with pytest.raises(ValueError, match="fd_step: must be > 0"):
        HessianOperator(model, F.cross_entropy, data, fd_step=0.0, scope=Scope(hvp_method="fd"))
