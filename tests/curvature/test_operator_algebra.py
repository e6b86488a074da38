"""The operator core: block products equal one product at a time and the exact matrices,
sums, multiples and compositions build the matrices they say, scipy's solvers run on
`to_scipy()`, and a wrong shape is one clear error."""

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh

from lossgeo.curvature import GGNOperator, HessianOperator
from lossgeo.curvature.linear import LambdaOperator, MatrixOperator
from lossgeo.curvature.operators import HessianBlockOperator
from lossgeo.losses import cross_entropy

from .cases import CASE_NAMES, case
from .test_curvature import exact_hessian, tiny_mlp, toy_data, uneven

pytestmark = pytest.mark.usefixtures("float64")


def block(n, m, seed=0):
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_batched_block_product_equals_the_exact_hessian_on_every_case(name):
    c = case(name)
    exact = c.reference()
    op = HessianOperator(c.model, c.loss_fn, c.data)
    assert op.batched_products
    V = block(op.dim, 3)
    batched = op.matmat(V)
    assert torch.allclose(batched, exact @ V, atol=1e-10)
    # and equal to one vector at a time, to rounding
    looped = torch.stack([op.matvec(v) for v in V.T], dim=1)
    assert torch.allclose(batched, looped, rtol=1e-12, atol=1e-13)
    assert op.n_matvec == 6  # a block of m counts m products


def test_block_products_of_a_layer_and_without_batching_agree():
    model, (x, y) = tiny_mlp(), toy_data()
    H = exact_hessian(model, cross_entropy, x, y)
    op = HessianOperator(model, cross_entropy, uneven(x, y))
    layer = HessianBlockOperator(op, ["0.weight", "0.bias"])
    V = block(layer.dim, 4)
    assert torch.allclose(layer @ V, H[: layer.dim, : layer.dim] @ V, atol=1e-12)
    op.batched_products = False
    assert torch.allclose(op @ block(op.dim, 2), H @ block(op.dim, 2), atol=1e-12)
    assert torch.allclose(layer @ V, H[: layer.dim, : layer.dim] @ V, atol=1e-12)


def test_sums_multiples_and_compositions_are_the_matrices_they_name():
    model, (x, y) = tiny_mlp(), toy_data()
    H = exact_hessian(model, cross_entropy, x, y)
    hess = HessianOperator(model, cross_entropy, (x, y))
    ggn = GGNOperator(model, cross_entropy, (x, y))
    G = ggn.to_dense()
    v, V = block(hess.dim, 1)[:, 0], block(hess.dim, 3, seed=1)
    combined = 2 * hess - ggn + hess * 0.5
    assert combined.symmetric and combined.dim == hess.dim
    assert torch.allclose(combined @ v, (2.5 * H - G) @ v, atol=1e-12)
    assert torch.allclose(combined @ V, (2.5 * H - G) @ V, atol=1e-12)
    assert torch.allclose((-hess).to_dense(), -H, atol=1e-12)
    composed = hess @ ggn
    assert not composed.symmetric
    assert torch.allclose(composed @ v, H @ (G @ v), atol=1e-12)
    # nothing is multiplied until a vector comes
    before = hess.n_matvec
    _ = 3 * hess + hess
    assert hess.n_matvec == before


def test_the_symmetric_solvers_refuse_a_composition():
    A = MatrixOperator(torch.diag(torch.arange(1.0, 6.0)))
    with pytest.raises(ValueError, match="not symmetric"):
        hessian_eigen_of(A @ A)
    assert float(hessian_eigen_of(A + A).values[0]) == pytest.approx(10.0, rel=1e-10)


def hessian_eigen_of(op):
    from lossgeo.curvature import lanczos

    return lanczos(op, k=1, tol=1e-10)


def test_scipy_solvers_run_on_to_scipy():
    model, (x, y) = tiny_mlp(seed=3), toy_data()
    H = exact_hessian(model, cross_entropy, x, y)
    op = HessianOperator(model, cross_entropy, uneven(x, y))
    values = eigsh(op.to_scipy(), k=2, which="LA", tol=1e-12)[0]
    exact = torch.linalg.eigvalsh(H).flip(0)[:2].numpy()
    assert np.allclose(sorted(values, reverse=True), exact, rtol=1e-10)
    dense = op.to_scipy() @ np.eye(op.dim)  # scipy's matmat: the block product
    assert np.allclose(dense, H.numpy(), atol=1e-12)


def test_hutchinson_and_hutch_plus_plus_take_blocks_and_keep_their_values():
    from lossgeo.curvature import hutchinson, hutchpp

    model, (x, y) = tiny_mlp(), toy_data()
    op = HessianOperator(model, cross_entropy, (x, y))
    assert op.block_size == 1  # measured slower on CPU (benchmarks/results/block.md)
    one_at_a_time = LambdaOperator(op.matvec, op.dim, dtype=op.dtype)  # no matmat
    op.block_size = 5  # 12 vectors: blocks of 5, 5 and 2
    for solver in (hutchinson, hutchpp):
        before = op.n_matvec
        blocked, looped = solver(op, 12), solver(one_at_a_time, 12)
        assert blocked.value == pytest.approx(looped.value, rel=1e-12)
        assert blocked.stderr == pytest.approx(looped.stderr, rel=1e-10)
        assert blocked.n_hvp == looped.n_hvp == op.n_matvec - before - looped.n_hvp


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.zeros(3), ValueError, r"43 x 43: a shape \(43,\) is needed \(got \(3,\)\)"),
        (torch.zeros(43, 2, 1), ValueError, r"\(got \(43, 2, 1\)\)"),
        ([0.0] * 43, TypeError, "multiplies tensors"),
    ],
)
def test_a_wrong_shape_is_one_clear_error(bad, error, message):
    model, (x, y) = tiny_mlp(), toy_data()
    op = HessianOperator(model, cross_entropy, (x, y))
    assert op.dim == 43
    with pytest.raises(error, match=message):
        op @ bad
    with pytest.raises(ValueError, match="do not combine"):
        op + MatrixOperator(torch.eye(3))
    assert op.n_matvec == 0


def test_an_unused_parameter_has_zero_rows_in_block_and_single_products():
    class WithUnused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.unused = tiny_mlp(), torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.net(x)

    model, (x, y) = WithUnused(), toy_data()
    H = exact_hessian(model.net, cross_entropy, x, y)
    op = HessianOperator(model, cross_entropy, (x, y))
    n = H.shape[0]
    assert op.dim == n + 6  # net's parameters first, then the unused Linear's
    V = block(op.dim, 3)
    expected = torch.cat([H @ V[:n], torch.zeros(6, 3)])
    assert torch.allclose(op.matmat(V), expected, atol=1e-12)
    assert torch.allclose(op.matvec(V[:, 0]), expected[:, 0], atol=1e-12)
