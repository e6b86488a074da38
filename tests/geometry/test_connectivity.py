"""Mode connectivity (geometry/connectivity.py): exact endpoints, the convex case, the
gradient in the control point, weight matching that keeps an MLP's function."""

import numpy as np
import pytest
import torch
from torch import nn

from lossgeo.data import Split
from lossgeo.geometry import connectivity as conn
from lossgeo.geometry.directions import weights_vector
from lossgeo.models import CNN, MLP

from ..conftest import float64_default


def mse(out, y):
    return ((out.squeeze(-1) - y) ** 2).mean()


def test_the_curve_reproduces_both_endpoints_exactly():
    gen = torch.Generator().manual_seed(0)
    w_a, control, w_b = (torch.randn(50, generator=gen) for _ in range(3))
    assert torch.equal(conn.bezier_point(w_a, control, w_b, 0.0), w_a)
    assert torch.equal(conn.bezier_point(w_a, control, w_b, 1.0), w_b)
    assert torch.equal(conn.linear_point(w_a, w_b, 0.0), w_a)
    assert torch.equal(conn.linear_point(w_a, w_b, 1.0), w_b)
    # and a model loaded at the ends computes what the endpoint models compute
    a, b = MLP(12, hidden=(8,)), MLP(12, hidden=(8,))
    x = torch.randn(5, 12, generator=gen)
    path = conn.PathModel(a)
    w_a, w_b = weights_vector(a), weights_vector(b)
    for t, model in ((0.0, a), (1.0, b)):
        path.set(conn.bezier_point(w_a, (w_a + w_b) / 3, w_b, t))
        assert torch.equal(path.model(x), model(x))


def test_on_a_convex_problem_the_linear_barrier_is_at_most_zero():
    with float64_default():
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(40, 6, generator=gen), torch.randn(40, generator=gen)
        model = nn.Linear(6, 1)
        w_star = torch.linalg.lstsq(torch.cat([x, torch.ones(40, 1)], 1), y[:, None]).solution
        # the least-squares minimum has weight then bias; ParameterSpace orders weight, bias
        centre = w_star.reshape(-1)
        offset = torch.randn(7, generator=gen)
        w_a, w_b = centre + offset, centre - offset  # equal loss, by the quadratic's symmetry
        ts = torch.linspace(0, 1, 11).tolist()
        splits = {"train": Split(x, y), "test": Split(x, y)}
        rows = conn.evaluate_path(
            model, mse, "linear", lambda t: conn.linear_point(w_a, w_b, t), ts, splits
        )
        losses = [r.train_loss for r in rows]
        assert conn.barrier(losses) <= 1e-12
        # convexity along the whole segment, and strictly lower inside
        for t, loss in zip(ts, losses):
            assert loss <= (1 - t) * losses[0] + t * losses[-1] + 1e-12
        assert losses[5] < losses[0] - 1e-3


def test_barrier_is_the_largest_loss_minus_the_endpoints_mean():
    assert conn.barrier([1.0, 5.0, 2.0, 3.0]) == 5.0 - 2.0
    with pytest.raises(ValueError, match="at least 2 points"):
        conn.barrier([1.0])


def test_the_curve_loss_gradient_in_the_control_point_matches_finite_differences():
    with float64_default():
        gen = torch.Generator().manual_seed(2)
        model = MLP(10, n_classes=3, hidden=(7,), activation="tanh")
        x, y = torch.randn(16, 10, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        path = conn.PathModel(model)
        dim = path.space.dim
        w_a, w_b, control = (torch.randn(dim, generator=gen) for _ in range(3))
        direction = torch.randn(dim, generator=gen)

        def loss(c):
            return sum(
                path.loss_at(conn.bezier_point(w_a, c, w_b, t), x, y, nn.functional.cross_entropy)
                for t in (0.2, 0.5, 0.9)
            )

        c = control.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(c), c)
        eps = 1e-6
        numeric = (loss(control + eps * direction) - loss(control - eps * direction)) / (2 * eps)
        assert float(grad @ direction) == pytest.approx(float(numeric), rel=1e-7)


def permutations(model, seed):
    gen = torch.Generator().manual_seed(seed)
    widths = [m.out_features for m in conn._linear_chain(model)[:-1]]
    return [torch.randperm(w, generator=gen).numpy() for w in widths]


def test_weight_matching_leaves_an_mlps_function_unchanged():
    with float64_default():
        torch.manual_seed(3)
        a, b = MLP(20, hidden=(16, 12)), MLP(20, hidden=(16, 12))
        perms = conn.weight_matching(a, b)
        assert any((p != np.arange(len(p))).any() for p in perms)  # it did permute
        aligned = conn.permuted(b, perms)
        x = torch.randn(30, 20)
        assert torch.allclose(aligned(x), b(x), rtol=0, atol=1e-12)
        # and it moved b towards a
        assert (weights_vector(aligned) - weights_vector(a)).norm() < (
            weights_vector(b) - weights_vector(a)
        ).norm()


def test_weight_matching_undoes_a_permutation_exactly():
    with float64_default():
        torch.manual_seed(4)
        a = MLP(20, hidden=(16, 12, 8))
        shuffled = conn.permuted(a, permutations(a, seed=5))
        assert not torch.equal(weights_vector(shuffled), weights_vector(a))
        aligned = conn.permuted(shuffled, conn.weight_matching(a, shuffled))
        assert torch.equal(weights_vector(aligned), weights_vector(a))


def test_weight_matching_refuses_what_is_not_an_mlp():
    with pytest.raises(ValueError, match="weight matching: only for MLPs"):
        conn.weight_matching(CNN(1, 28), CNN(1, 28))
    with pytest.raises(ValueError, match="differ in their layer shapes"):
        conn.weight_matching(MLP(20, hidden=(16,)), MLP(20, hidden=(8,)))


def test_fit_bezier_lowers_the_loss_along_the_curve_below_the_line():
    torch.manual_seed(6)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(256, 10, generator=gen)
    y = (x[:, 0] * x[:, 1] > 0).long()  # not linearly separable: two trained nets differ
    data = Split(x, y)

    def trained(seed):
        torch.manual_seed(seed)
        model = MLP(10, n_classes=2, hidden=(16,))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(300):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return model

    a, b = trained(10), trained(11)
    w_a, w_b = weights_vector(a), weights_vector(b)
    control = conn.fit_bezier(
        a,
        nn.functional.cross_entropy,
        data,
        (w_a, w_b),
        conn.CurveFit(
            epochs=40, batch_size=32, make_optimizer=lambda params: torch.optim.SGD(params, lr=0.2)
        ),
    )
    ts = torch.linspace(0, 1, 11).tolist()
    splits = {"train": data, "test": data}

    def path_barrier(name, point_at):
        rows = conn.evaluate_path(a, nn.functional.cross_entropy, name, point_at, ts, splits)
        return conn.barrier([r.train_loss for r in rows])

    line = path_barrier("linear", lambda t: conn.linear_point(w_a, w_b, t))
    curve = path_barrier("bezier", lambda t: conn.bezier_point(w_a, control, w_b, t))
    assert line > 0.05 and curve < line / 2


def test_fit_bezier_refuses_no_epochs():
    with pytest.raises(ValueError, match="epochs and batch_size: must be >= 1"):
        conn.CurveFit(
            epochs=0, batch_size=2, make_optimizer=lambda params: torch.optim.SGD(params, lr=0.1)
        )
