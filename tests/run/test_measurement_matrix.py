"""Every loss with every measurement switched on: no combination may break unseen."""

import math

import pytest
import torch
import torch.nn.functional as F

from lossgeo.config import LANDSCAPE_DIRECTIONS, LOSSES
from lossgeo.losses import LOSSES as LOSS_FNS
from lossgeo.run.experiment import prepare
from lossgeo.run.measurements import build_measurements
from lossgeo.run.train import train

from ..conftest import tiny_config
from .test_training_run import NullLogger

EVERY_MEASUREMENT = dict(
    curvature=True,
    noise_scale=True,
    sharpness=True,
    landscape=True,
    curvature_k=2,
    trace_samples=2,
    density_steps=5,
    sharpness_directions=1,
    landscape_resolution=3,
    probe_size=16,
    train_subset=64,
    batch_size=32,
    epochs=1,
)


@pytest.mark.parametrize("directions", LANDSCAPE_DIRECTIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_with_every_measurement(fake_data_dir, loss, directions):
    config = tiny_config(
        fake_data_dir, loss=loss, landscape_directions=directions, **EVERY_MEASUREMENT
    )
    data, model, loss_fn, _ = prepare(config)
    logger = NullLogger()
    train(config, data, model, loss_fn, logger, build_measurements(config))
    last = logger.epochs[-1][1]
    for key in (
        "lambda_max",
        "hessian_trace",
        "grad_noise_scale",
        "sharp_max",
        "eps_sharpness",
        "adaptive_sharpness",
    ):
        assert math.isfinite(last[key]), key
    assert "landscape/loss_slice_2d.pt" in logger.objects


def test_half_squared_error_matches_its_one_hot_definition():
    out = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2])
    expected = 0.5 * (out - F.one_hot(y, 4).double()).pow(2).sum(-1).mean()
    assert torch.equal(LOSS_FNS["mse"](out, y), expected)


def test_every_loss_gives_per_sample_gradients_under_vmap():
    from torch.func import grad, vmap

    w = torch.randn(3, 4, dtype=torch.float64)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    for loss_fn in LOSS_FNS.values():
        per_sample = vmap(
            grad(lambda w, xi, yi: loss_fn((xi @ w).unsqueeze(0), yi.unsqueeze(0))),
            in_dims=(None, 0, 0),
        )(w, x, y)
        looped = torch.stack(
            [
                torch.func.grad(lambda w: loss_fn(x[i : i + 1] @ w, y[i : i + 1]))(w)
                for i in range(6)
            ]
        )
        assert torch.allclose(per_sample, looped)
