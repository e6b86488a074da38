"""Sizes, counts and tolerances are checked at entry: a negative chunk size once gave no
batches, and so lambda 0 with converged=True and a trace of 0, without a word."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lossgeo import SGDStep, StepSettings, Tracker
from lossgeo.curvature import (
    BatchSampling,
    CurvatureSettings,
    EigenSolver,
    Scope,
    Smoothing,
    hessian_eigen,
)
from lossgeo.curvature.batches import as_batches
from lossgeo.curvature.lanczos import Extremes


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return model, (torch.randn(12, 4), torch.randint(0, 3, (12,)))


def refused(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("chunk_size", [-1, 0, "64", 2.5, True])
def test_a_bad_chunk_size_is_refused_by_every_entry(chunk_size):
    model, data = problem()
    match = "chunk_size: .* whole number >= 1"
    refused(lambda: Scope(chunk_size=chunk_size), match)
    if not isinstance(chunk_size, str):
        refused(lambda: as_batches([data], chunk_size), match)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(tol=0.0), "tol: must be a number > 0"),
        (dict(tol=math.nan), "tol: must be a number > 0"),
        (dict(tol="1e-3"), "tol: must be a number > 0"),
        (dict(max_iter=0), "max_iter: must be a whole number >= 1"),
        (dict(k="2"), "k: must be a whole number"),
        (dict(k=0), "k: ask for at least one eigenpair"),
        (dict(method="power", tol=-1.0), "tol: must be a number > 0"),
    ],
)
def test_bad_solver_limits_are_refused_before_any_product(options, match):
    model, data = problem()
    solver = {key: options.pop(key) for key in ("max_iter", "method") if key in options}
    refused(
        lambda: hessian_eigen(
            model, F.cross_entropy, data, solver=EigenSolver(**solver), **options
        ),
        match,
    )


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(tol=-1.0), "tol: must be a number > 0"),
        (dict(secondary_tol=0), "secondary_tol: must be a number > 0"),
        (dict(k=0), "k: must be a whole number >= 1"),
        (dict(max_iter=1.5), "max_iter: must be a whole number >= 1"),
        (dict(density_steps=0), "density_steps: must be a whole number >= 1"),
        (dict(trace_samples="20"), "trace_samples: must be a whole number"),
        (dict(alpha=0), "alpha: must be a number > 0"),
    ],
)
def test_curvature_settings_are_checked_at_construction(options, match):
    refused(lambda: CurvatureSettings(**options), match)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Scope(compute_dtype="garbage"), "compute_dtype: must be bf16, fp16 or fp32"),
        (lambda: Scope(max_memory="lots"), "max_memory: a size such as 2GB"),
        (lambda: Scope(hvp_method="exact"), "hvp_method: must be one of graph, fwdrev, fd"),
        (lambda: Scope(loss_form="mean"), "loss_form: must be"),
        (lambda: EigenSolver(method="arnoldi"), "method: must be 'lanczos' or 'power'"),
        (lambda: EigenSolver(max_iter=0), "max_iter: must be a whole number >= 1"),
        (lambda: EigenSolver(seed=1.5), "seed: must be a whole number"),
        (lambda: EigenSolver(verify="yes"), "verify: must be True or False"),
        (lambda: Smoothing(grid_size=0), "grid_size: must be a whole number >= 1"),
        (lambda: Smoothing(sigma=-0.1), "sigma: must be a number > 0"),
    ],
)
def test_the_model_level_settings_objects_are_checked_at_construction(make, match):
    """The settings objects of the model-level functions refuse a bad value when built, in
    one line, before a model is touched."""
    refused(make, match)


def test_the_defaults_and_valid_settings_pass():
    CurvatureSettings()
    CurvatureSettings(trace_samples=0)
    Scope(chunk_size=None, compute_dtype="bf16", max_memory="2GB", hvp_method="fwdrev")


def test_an_empty_probe_is_refused_at_construction_in_one_line():
    """An empty (x, y) probe raised IndexError from the Tracker's memory sizing."""
    model, _ = problem()
    empty = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    match = "data: every batch given is empty"
    refused(
        lambda: Tracker(
            model, F.cross_entropy, empty, optimizer=SGDStep(0.1), steps=StepSettings(every=1)
        ),
        match,
    )
    refused(lambda: hessian_eigen(model, F.cross_entropy, empty), match)
    # an empty batch beside real ones is dropped, not an error
    _, data = problem()
    assert len(as_batches([empty, data])) == 1


def test_a_model_on_the_meta_device_is_refused_before_any_product():
    """It failed at the first `epoch()` with "unsupported scalarType", after an epoch."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    _, data = problem()
    match = "model: 4 parameter.s. on the meta device"
    refused(
        lambda: Tracker(
            model, F.cross_entropy, data, optimizer=SGDStep(0.1), steps=StepSettings(every=1)
        ),
        match,
    )
    refused(lambda: hessian_eigen(model, F.cross_entropy, data), match)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Scope(loss_form="logits"), "loss_form: must be 'auto', 'output_target'"),
        (lambda: Scope(size_fn=3), r"size_fn: must be a callable\(batch\) -> int"),
        (lambda: Scope(math_attention="yes"), "math_attention: must be True or False"),
        (lambda: SGDStep(0.0), r"lr: must be a number > 0 \(got 0.0\)"),
        (lambda: SGDStep(True), r"lr: must be a number > 0 \(got True\)"),
        (lambda: SGDStep(0.1, momentum=1.0), r"momentum: must be a number in \[0, 1\)"),
        (lambda: BatchSampling(min_batches=0), "need rel_se >= 0 and 1 <= min_batches"),
        (lambda: BatchSampling(max_batches=2), "need rel_se >= 0 and 1 <= min_batches"),
        (lambda: BatchSampling(batch_size=2.5), r"batch_size: must be a whole number >= 1"),
        (lambda: StepSettings(every=-1), r"every: must be an integer >= 0 \(got -1\)"),
        (lambda: StepSettings(batch_size=0), r"batch_size: must be a whole number >= 1"),
        (lambda: Extremes(k_top=0), "k: ask for at least one eigenpair"),
        (lambda: Extremes(rest_tol=0.0), r"rest_tol: must be a number > 0"),
        (lambda: Extremes(min_steps=0), r"min_steps: must be a whole number >= 1"),
        (lambda: Extremes(bottom_scale="absolute"), "bottom_scale: must be 'value' or"),
    ],
)
def test_settings_objects_refuse_bad_values_at_construction(build, match):
    """Each settings object says what is wrong in one line when it is built, before a
    model, a probe set or a product is touched."""
    refused(build, match)


def test_a_step_size_given_as_the_optimizer_is_refused_in_one_line():
    model, data = problem()
    refused(
        lambda: Tracker(model, F.cross_entropy, data, optimizer=0.1),
        r"optimizer: a torch optimizer, or SGDStep\(lr, momentum\)",
    )


def test_sgd_step_gives_the_heavy_ball_edge():
    """SGDStep(lr, m): the threshold 2(1+m)/lr of heavy-ball SGD on a quadratic."""
    edge = SGDStep(0.05, momentum=0.9).edge
    assert edge.threshold == pytest.approx(2 * 1.9 / 0.05) and edge.rule == "2(1+m)/lr"
