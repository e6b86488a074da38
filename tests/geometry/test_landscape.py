"""Directions, slices and sharpness against closed forms (see ../shared/DESIGN.md)."""

import pytest
import torch
from torch import nn

from lossgeo.curvature import EigenSolver, hessian_eigen
from lossgeo.geometry.directions import random_direction, trajectory_pca, weights_vector
from lossgeo.geometry.landscape import PerturbedLoss, axis, interpolate, slice_1d, surface_2d
from lossgeo.geometry.sharpness import adaptive_sharpness, eps_sharpness, random_direction_sharpness
from lossgeo.losses import cross_entropy
from lossgeo.models import MLP, build_model

from ..curvature.test_curvature import assert_unchanged, snapshot, tiny_mlp, toy_data


def test_filter_normalisation_is_exact_and_zeroes_biases_and_batchnorm():
    model = build_model("resnet", 1, 28, 10)
    d = random_direction(model, seed=3)
    offset = 0
    for name, p in model.named_parameters():
        piece = d[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.dim() <= 1:
            assert torch.count_nonzero(piece) == 0, name
        else:
            w_norms = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            d_norms = piece.reshape(p.shape[0], -1).norm(dim=1)
            assert torch.allclose(d_norms, w_norms, rtol=1e-5), name
    with_bias = random_direction(model, seed=3, include_bias_bn=True)
    assert torch.count_nonzero(with_bias) > torch.count_nonzero(d)
    assert torch.equal(random_direction(model, seed=3), d)


def quadratic_problem():
    """L(w) = 0.5 * mean_i (w . x_i - t_i)^2 with x = identity rows: closed form."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.3, -0.2]]))
    x = torch.eye(2)
    t = torch.tensor([[1.0], [2.0]])
    loss = lambda o, y: 0.5 * ((o - y) ** 2).sum(-1).mean()  # noqa: E731
    closed = lambda a, b: 0.5 * ((0.3 + a - 1.0) ** 2 + (-0.2 + 2 * b - 2.0) ** 2) / 2  # noqa
    return model, loss, (x, t), closed


@pytest.mark.parametrize("factorize", [True, False])
def test_grid_layout_on_non_square_grid_against_quadratic(float64, factorize):
    model, loss, data, closed = quadratic_problem()
    d1, d2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    xs, ys = axis(3, 1.0), axis(5, 0.5)
    out = surface_2d(model, loss, data, (d1, d2), (xs, ys), factorize=factorize)
    assert out.loss.shape == (3, 5)
    for i, a in enumerate(xs.tolist()):
        for j, b in enumerate(ys.tolist()):
            assert float(out.loss[i, j]) == pytest.approx(closed(a, b), rel=1e-12)


def test_axis_always_contains_zero():
    assert 0.0 in axis(4, 1.0).tolist() and len(axis(4, 1.0)) == 5
    assert axis(51, 1.0)[25] == 0 and len(axis(51, 1.0)) == 51
    with pytest.raises(ValueError):
        axis(0, 1.0)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "wide-conv"])
def test_origin_equals_unperturbed_loss_exactly_and_factorisation_agrees(name, fake_data_dir):
    from lossgeo.data import load_data

    torch.manual_seed(0)
    if name == "wide-conv":  # a first conv with fan-in >= 64 takes the factorised path
        model = nn.Sequential(
            nn.Conv2d(1, 4, 9), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 20 * 20, 10)
        )
        assert PerturbedLoss(
            model, cross_entropy, toy_image_data(), random_direction(model)
        ).factorized
    else:
        model = build_model(name)
    probe = load_data("mnist", fake_data_dir, val_size=100, probe_size=64).probe
    data = (probe.x, probe.y)
    d1, d2 = random_direction(model, seed=1), random_direction(model, seed=2)
    model.eval()
    with torch.no_grad():
        direct = float(cross_entropy(model(probe.x), probe.y))
    before = snapshot(model)
    fast = surface_2d(model, cross_entropy, data, (d1, d2), (axis(3, 1.0), axis(4, 1.0)))
    slow = surface_2d(
        model, cross_entropy, data, (d1, d2), (axis(3, 1.0), axis(4, 1.0)), factorize=False
    )
    assert float(fast.loss[1, 2]) == direct and float(slow.loss[1, 2]) == direct
    assert torch.allclose(fast.loss, slow.loss, rtol=1e-5)
    assert torch.allclose(fast.acc, slow.acc, atol=1 / 64 + 1e-9)
    assert_unchanged(model, before)


def test_factorised_path_is_used_where_the_first_layer_is_linear():
    assert PerturbedLoss(
        build_model("mlp"), cross_entropy, toy_image_data(), random_direction(build_model("mlp"))
    ).factorized
    assert (
        PerturbedLoss(
            build_model("resnet"),
            cross_entropy,
            toy_image_data(),
            random_direction(build_model("resnet")),
        ).factorized
        is False
    )
    # a 3x3 conv on one channel has fan-in 9: too cheap to be worth caching
    assert (
        PerturbedLoss(
            build_model("cnn"),
            cross_entropy,
            toy_image_data(),
            random_direction(build_model("cnn")),
        ).factorized
        is False
    )


def toy_image_data(n=8):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_second_difference_along_top_eigenvector_equals_lambda_max(float64):
    model, (x, y) = tiny_mlp(seed=3), toy_data()
    top = hessian_eigen(
        model, cross_entropy, (x, y), k=1, tol=1e-12, solver=EigenSolver(max_iter=200)
    )
    v = top.vectors[0]
    errors = []
    for h in (1e-2, 5e-3):
        out = slice_1d(model, cross_entropy, (x, y), v, torch.tensor([-h, 0.0, h]))
        second = (out.loss[0] - 2 * out.loss[1] + out.loss[2]) / h**2
        errors.append(abs(float(second) - float(top.values[0])))
    assert errors[1] < 1e-4 * abs(float(top.values[0]))
    assert errors[1] < errors[0] / 3  # O(h^2): halving h quarters the error


def test_interpolation_endpoints_reproduce_both_models(float64):
    a, b = tiny_mlp(seed=1), tiny_mlp(seed=2)
    x, y = toy_data()
    out = interpolate(
        a,
        cross_entropy,
        (x, y),
        weights_vector(a),
        weights_vector(b),
        torch.tensor([0.0, 0.5, 1.0]),
    )
    with torch.no_grad():
        assert float(out.loss[0]) == pytest.approx(float(cross_entropy(a(x), y)), rel=1e-12)
        assert float(out.loss[2]) == pytest.approx(float(cross_entropy(b(x), y)), rel=1e-12)


def test_relu_rescaling_keeps_function_and_filter_normalised_slice_but_not_lambda_max(float64):
    """Dinh et al. (2017): sharpness by lambda_max is not reparametrisation invariant."""
    torch.manual_seed(0)
    model = MLP(4, 3, hidden=(6,))
    rescaled = MLP(4, 3, hidden=(6,))
    rescaled.load_state_dict(model.state_dict())
    a = 5.0
    with torch.no_grad():
        rescaled.net[1].weight.mul_(a)
        rescaled.net[1].bias.mul_(a)
        rescaled.net[3].weight.div_(a)
    x, y = toy_data(d_in=4)
    with torch.no_grad():
        assert torch.allclose(model(x), rescaled(x), atol=1e-12)
    ts = torch.linspace(-1, 1, 7)
    s1 = slice_1d(model, cross_entropy, (x, y), random_direction(model, seed=4), ts)
    s2 = slice_1d(rescaled, cross_entropy, (x, y), random_direction(rescaled, seed=4), ts)
    assert torch.allclose(s1.loss, s2.loss, rtol=1e-10)
    lam1 = float(hessian_eigen(model, cross_entropy, (x, y), tol=1e-10).values[0])
    lam2 = float(hessian_eigen(rescaled, cross_entropy, (x, y), tol=1e-10).values[0])
    assert abs(lam2 / lam1 - 1) > 0.5


def test_pca_coordinates_reconstruct_in_plane_points(float64):
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(50, 2, generator=gen))
    final = torch.randn(50, generator=gen)
    coords = torch.randn(6, 2, generator=gen)
    path = [final + basis @ c for c in coords] + [final]
    pca = trajectory_pca(path)
    assert torch.allclose(pca.directions @ pca.directions.T, torch.eye(2), atol=1e-12)
    for point, c in zip(path, pca.coordinates):
        assert torch.allclose(final + pca.reconstruct(c), point, atol=1e-10)
    assert float(pca.explained_variance_ratio.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        trajectory_pca([final])


def test_sharpness_of_a_constant_loss_is_zero_and_model_unchanged(float64):
    model, (x, y) = tiny_mlp(), toy_data()
    flat = lambda out, target: (out * 0).sum() + 2.0  # noqa: E731
    before = snapshot(model)
    result = random_direction_sharpness(model, flat, (x, y), n_directions=3)
    assert result.value == 0 and result.max == 0
    assert eps_sharpness(model, flat, (x, y)).value == 0
    assert adaptive_sharpness(model, flat, (x, y)).value == 0
    assert_unchanged(model, before)


def test_sharpness_is_positive_near_a_minimum_and_leaves_model_unchanged(float64):
    model, (x, y) = tiny_mlp(seed=5), toy_data()
    before = snapshot(model)
    detail = random_direction_sharpness(model, cross_entropy, (x, y), n_directions=4, radius=0.1)
    assert detail.max >= detail.value and detail.values.shape == (4,)
    eps = eps_sharpness(model, cross_entropy, (x, y), eps=1e-2)
    adaptive = adaptive_sharpness(model, cross_entropy, (x, y), radius=0.5)
    assert eps.value > 0 and adaptive.value > 0
    assert_unchanged(model, before)


def test_eps_sharpness_of_a_linear_loss_is_the_box_corner(float64):
    """L linear in the weights: the box maximum is L(w) + sum_i |g_i| eps (|w_i| + 1),
    reached at a corner; Keskar's percentage follows in closed form."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(7, 3), torch.zeros(7, dtype=torch.long)
    linear = lambda out, target: out.sum(dim=1).mean() + 1.0  # noqa: E731
    w = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    g = torch.cat([x.mean(0).repeat(2), torch.ones(2)])  # d L / d (W, b)
    base = float(linear(model(x), y))
    eps = 1e-2
    worst = base + float((g.abs() * eps * (w.abs() + 1)).sum())
    result = eps_sharpness(model, linear, (x, y), eps=eps)
    assert result.base_loss == pytest.approx(base, rel=1e-12)
    assert result.value == pytest.approx(100 * (worst - base) / (1 + base), rel=1e-9)


def test_random_direction_sharpness_is_the_loss_increase_along_each_direction(float64):
    from torch.func import functional_call

    from lossgeo.curvature.operators import ParameterSpace
    from lossgeo.geometry.directions import random_direction

    model, (x, y) = tiny_mlp(seed=5), toy_data()
    detail = random_direction_sharpness(
        model, cross_entropy, (x, y), n_directions=3, radius=0.1, seed=7
    )
    space = ParameterSpace(model)
    w = space.flatten(space.values)
    base = float(cross_entropy(model(x), y))
    for k in range(3):
        moved = space.unflatten(w + 0.1 * random_direction(model, seed=7 + k))
        expected = float(cross_entropy(functional_call(model, moved, (x,)), y)) - base
        assert float(detail.values[k]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert detail.n_evaluations == 4  # L(w) once, then one point per direction
