"""Per-step tracking: warm-started lambda_max and its guards, batch sharpness, gradient
alignment, the Tracker's schedule, side effects and logging (issue 12 items 2, 3, 5;
issue 13 item 1)."""

import math

import mlflow
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn

from lossgeo import SGDStep, StepSettings, Tracker
from lossgeo.curvature import BatchSampling
from lossgeo.curvature.linear import MatrixOperator
from lossgeo.curvature.stochastic import batch_sharpness, gradient_alignment
from lossgeo.curvature.warm import WarmEigen
from lossgeo.geometry.spikes import OnlineSpikeDetector

from ..conftest import tiny_config


def rotated(eigenvalues, seed=0):
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def crossing_sequence(n_steps=12, n=30):
    """Top two eigenvalues 5 - 0.4 t and 3 + 0.4 t: they cross between t = 2 and t = 3."""
    rest = torch.linspace(0.0, 1.0, n - 2).tolist()
    return [rotated([5 - 0.4 * t, 3 + 0.4 * t] + rest) for t in range(n_steps)]


def test_warm_start_follows_a_crossing_of_the_top_two_eigenvalues():
    tracker = WarmEigen(k=2, tol=1e-6, cold_every=0)
    for a in crossing_sequence():
        result = tracker.solve(MatrixOperator(a))
        exact = float(torch.linalg.eigvalsh(a)[-1])
        assert result.lambda_max == pytest.approx(exact, rel=1e-6)


def test_a_single_tracked_vector_misses_the_crossing_until_the_cold_check_catches_it():
    unguarded = WarmEigen(k=1, tol=1e-6, cold_every=0)
    guarded = WarmEigen(k=1, tol=1e-6, cold_every=4)
    for t, a in enumerate(crossing_sequence()[:6]):
        exact = float(torch.linalg.eigvalsh(a)[-1])
        missed, checked = unguarded.solve(MatrixOperator(a)), guarded.solve(MatrixOperator(a))
        if t == 3:
            # after the crossing the warm start follows the old top vector (now the second):
            # its residual is tiny, it is an eigenpair, just not the top one
            assert missed.lambda_max == pytest.approx(3.8, rel=1e-6) and missed.converged
            # the cold check on the 4th solve sees the larger eigenvalue and restarts
            assert checked.cold_gap == pytest.approx((exact - 3.8) / exact, rel=1e-4)
            assert checked.restarted and checked.lambda_max == pytest.approx(exact, rel=1e-6)
        else:
            assert checked.cold_gap is None
        if t > 3:
            assert checked.lambda_max == pytest.approx(exact, rel=1e-6)


def test_warm_start_needs_few_products_on_a_slowly_moving_operator():
    base = rotated([10.0, 9.0] + torch.linspace(0.0, 8.0, 198).tolist(), seed=3)
    drift = rotated(torch.linspace(-1.0, 1.0, 200).tolist(), seed=4)
    tracker = WarmEigen(k=2, tol=1e-4, cold_every=0)
    counts = []
    for t in range(10):
        a = base + 0.01 * t * drift  # eigenvectors and eigenvalues both move
        result = tracker.solve(MatrixOperator(a))
        assert result.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(a)[-1]), rel=1e-4)
        counts.append(result.n_hvp)
    assert counts[0] >= 8 and sum(counts[1:]) / 9 <= 2.5


def quadratic_batches(float64):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=gen)
    y = torch.randn(8, generator=gen)
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
    return model, [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)]


def half_mse(output, target):
    return 0.5 * (output.squeeze(-1) - target).pow(2).mean()


def test_batch_sharpness_equals_its_closed_form_on_a_quadratic(float64):
    model, batches = quadratic_batches(float64)
    w = model.weight.detach().reshape(-1)
    ratios = []
    for x, y in batches:  # H_B = X^T X / |B|, g_B = H_B w - X^T y / |B|
        h = x.T @ x / len(y)
        g = h @ w - x.T @ y / len(y)
        ratios.append(float(g @ h @ g / (g @ g)))
    result = batch_sharpness(model, half_mse, batches, BatchSampling(rel_se=0.0))
    assert result.n_batches == 4 and result.n_hvp == 4
    assert result.value == pytest.approx(sum(ratios) / 4, rel=1e-10)
    values = torch.tensor(ratios)
    assert result.stderr == pytest.approx(float(values.std() / 2), rel=1e-10)


def test_batch_sharpness_stops_once_its_standard_error_is_small(float64):
    model, batches = quadratic_batches(float64)
    loose = batch_sharpness(model, half_mse, batches, BatchSampling(rel_se=10.0, min_batches=2))
    assert loose.n_batches == 2


class Quadratic(nn.Module):
    """loss = 0.5 (theta - theta*)^T A (theta - theta*), A = diag(5, 3, 1, 0.5)."""

    def __init__(self, offset):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(offset, dtype=torch.float64))
        self.register_buffer("a", torch.tensor([5.0, 3.0, 1.0, 0.5], dtype=torch.float64))


def quadratic_loss(model, batch):
    return 0.5 * (model.a * model.theta**2).sum()


@pytest.mark.parametrize(
    "offset,alignment",
    [([1.0, 1.0, 0.0, 0.0], 1.0), ([0.0, 0.0, 1.0, 1.0], 0.0), ([1.0, 0.0, 1.0, 0.0], 25 / 26)],
)
def test_gradient_alignment_with_a_known_eigenspace(float64, offset, alignment):
    model = Quadratic(offset)
    tracker = Tracker(
        model,
        quadratic_loss,
        [torch.zeros(1)],
        steps=StepSettings(every=1, k=2, tol=1e-10),
        logger=NullLogger(),
    )
    metrics = tracker.step(1)
    assert metrics["step/lambda_max"] == pytest.approx(5.0, rel=1e-6)
    assert metrics["step/grad_alignment"] == pytest.approx(alignment, abs=1e-8)
    # the bare function: the gradient A theta against the top-2 eigenvectors e1, e2
    g = model.a * model.theta.detach()
    assert gradient_alignment(g, torch.eye(4)[:2]) == pytest.approx(alignment, abs=1e-12)


def sgd_tracker(model, x, y, *, every, logger=None):
    """A Tracker of plain SGD at lr 0.1 and batches of 32 on the (x, y) probe set."""
    return Tracker(
        model,
        F.cross_entropy,
        (x, y),
        optimizer=SGDStep(0.1),
        steps=StepSettings(every=every, batch_size=32),
        logger=logger,
    )


class NullLogger:
    def __init__(self):
        self.metrics, self.tags = [], {}

    def log_metrics(self, metrics, step=0):
        self.metrics.append((step, dict(metrics)))

    def set_tags(self, tags):
        self.tags.update(tags)


def small_problem(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(96, 6)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 2)
    )
    return model, x, y


def test_tracker_measures_on_schedule_and_leaves_the_model_as_it_was():
    model, x, y = small_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    logger = NullLogger()
    tracker = Tracker(
        model,
        F.cross_entropy,
        (x[:64], y[:64]),
        optimizer=optimizer,
        steps=StepSettings(every=3, batch_size=16),
        logger=logger,
    )
    model.train()
    losses = {}
    for step in range(1, 8):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[:16]), y[:16])
        loss.backward()
        optimizer.step()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        grads = [p.grad.clone() for p in model.parameters()]
        result = tracker.step(step, loss=loss.item())
        losses[step] = loss.item()
        assert (result is not None) == (step % 3 == 0)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
        assert model.training and all(m.training for m in model.modules())
    assert [s for s, _ in logger.metrics] == [3, 6]
    step6 = logger.metrics[-1][1]
    assert step6["step/train_loss"] == losses[6]
    assert step6["step/edge_ratio"] == pytest.approx(step6["step/lambda_max"] * 0.1 / (2 * 1.9))
    assert step6["step/batch_edge_ratio"] == pytest.approx(
        step6["step/batch_sharpness"] * 0.1 / (2 * 1.9)
    )
    assert 0 <= step6["step/grad_alignment"] <= 1


def test_tracker_logs_into_the_callers_active_mlflow_run(tracking):
    model, x, y = small_problem()
    tracker = sgd_tracker(model, x, y, every=2)
    assert tracker.step(1) is None
    with mlflow.start_run() as run:
        assert tracker.step(2) is not None
        epoch = tracker.epoch(1)
    history = MlflowClient().get_metric_history(run.info.run_id, "step/lambda_max")
    assert [m.step for m in history] == [2]
    lam = MlflowClient().get_metric_history(run.info.run_id, "lambda_max")
    assert [m.step for m in lam] == [1] and lam[0].value == pytest.approx(epoch["lambda_max"])
    # layers of a Sequential are named as lossgeo's loop names them (once "lambda_max/0")
    assert {"lambda_max/fc1", "lambda_max/bn1", "lambda_max/fc2"} == {
        k for k in epoch if k.startswith("lambda_max/")
    }


def test_builtin_loop_tracks_per_step_through_the_tracker(fake_data_dir):
    from lossgeo.run.experiment import prepare
    from lossgeo.run.train import train

    from .test_training_run import NullLogger as LoopLogger

    config = tiny_config(fake_data_dir, epochs=1, measure_every_steps=3)  # 7 steps an epoch
    logger = LoopLogger()
    train(config, *prepare(config)[:3], logger)
    assert [s for s, _ in logger.steps] == [3, 6]
    assert all(
        m["step/lambda_max"] > 0 and math.isfinite(m["step/batch_sharpness"])
        for _, m in logger.steps
    )


def test_online_spike_detector_fires_when_it_happens():
    detector = OnlineSpikeDetector(factor=2.0)
    assert detector.update(10, 1.0, 0.5) is None
    assert detector.update(20, 1.5, 0.8) is None
    assert "x2.67" in detector.update(30, 4.0, 0.9)
    assert "edge_ratio crossed 1" in detector.update(40, 4.1, 1.2)
    with pytest.raises(ValueError, match="factor"):
        OnlineSpikeDetector(1.0)


def test_steps_that_go_back_are_skipped_with_one_warning():
    """`enumerate(loader, start=1)` inside an epoch loop restarts the count every epoch: it
    once logged step/lambda_max at 10, 20, 10, 20, ... and the chart folded the epochs."""
    model, x, y = small_problem()
    logger = NullLogger()
    tracker = sgd_tracker(model, x, y, every=2, logger=logger)
    with pytest.warns(
        UserWarning, match=r"Tracker.step\(1\) after step 4: steps must grow"
    ) as caught:
        for _ in range(2):  # two "epochs" of an enumerate that restarts
            for step in range(1, 5):
                tracker.step(step)
    assert len(caught) == 1  # once, not at every step
    assert [s for s, _ in logger.metrics] == [2, 4]
    assert tracker.step(6) is not None and [s for s, _ in logger.metrics] == [2, 4, 6]


def test_without_a_batch_size_the_rest_of_the_step_set_is_measured_and_one_line_says_so(
    caplog,
):
    """Two first Tracker scripts (full-batch Adam, DDP) were refused at construction for
    want of batch_size; now they measure everything but batch sharpness, told once."""
    model, x, y = small_problem()
    logger = NullLogger()
    with caplog.at_level("WARNING", logger="lossgeo"):
        tracker = Tracker(
            model,
            F.cross_entropy,
            (x, y),
            optimizer=SGDStep(0.1),
            steps=StepSettings(every=2),
            logger=logger,
        )
    told = [r.getMessage() for r in caplog.records if "batch sharpness" in r.getMessage()]
    assert told == [
        "lossgeo: batch sharpness is left out: give StepSettings(batch_size=...) the training "
        "batch size to cut the (x, y) probe set into mini-batches"
    ]
    for step in range(1, 5):
        tracker.step(step)
    logged = dict(logger.metrics)[4]
    assert "step/lambda_max" in logged and "step/edge_ratio" in logged
    assert not any(key.startswith("step/batch_") for key in logged)
    with pytest.raises(ValueError, match=r"batch_size: must be a whole number >= 1 \(got 0\)"):
        Tracker(model, F.cross_entropy, (x, y), steps=StepSettings(every=2, batch_size=0))


def test_bad_tracker_arguments_fail_at_construction():
    model, x, y = small_problem()
    with pytest.raises(ValueError, match=r"every: must be an integer >= 0 \(got 2.5\)"):
        Tracker(model, F.cross_entropy, (x, y), steps=StepSettings(every=2.5, batch_size=32))
    Tracker(
        model, F.cross_entropy, (x, y), steps=StepSettings(every=0)
    )  # epoch only: no batches cut


def test_a_non_finite_loss_is_recorded_not_raised(caplog):
    """NaN or inf made .step()/.epoch() raise numpy's "array must not contain infs or NaNs"
    into the user's training loop."""
    model, x, y = small_problem()
    logger = NullLogger()
    tracker = sgd_tracker(model, x, y, every=1, logger=logger)
    assert math.isfinite(tracker.step(1)["step/lambda_max"])
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with caplog.at_level("WARNING", logger="lossgeo"):
        metrics = tracker.step(2)
        epoch = tracker.epoch(1)
    assert math.isnan(metrics["step/lambda_max"]) and math.isnan(epoch["lambda_max"])
    assert [s for s, m in logger.metrics if "step/lambda_max" in m] == [1, 2]
    warned = [r for r in caplog.records if "not finite" in r.getMessage()]
    assert len(warned) == 1


def test_a_parameter_the_forward_never_uses_has_zero_curvature():
    """It raised "appears to not have been used in the graph"; frozen ones never did."""

    class WithUnused(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.unused = net, nn.Linear(3, 3)

        def forward(self, x):
            return self.net(x)

    net, x, y = small_problem()
    model = WithUnused(net)
    tracker = sgd_tracker(model, x, y, every=1, logger=NullLogger())
    frozen = small_problem()[0]
    reference = sgd_tracker(frozen, x, y, every=1, logger=NullLogger())
    assert tracker.epoch(1)["lambda_max"] == pytest.approx(
        reference.epoch(1)["lambda_max"], rel=1e-4
    )
    assert math.isfinite(tracker.step(1)["step/lambda_max"])


@pytest.mark.parametrize("model_name", ["mlp", pytest.param("cnn", marks=pytest.mark.slow)])
def test_the_tracker_and_the_builtin_loop_log_the_same_epoch_set(fake_data_dir, model_name):
    """One measurement path: on the same model, state and probe, `Tracker.epoch()` in a
    user's loop logs exactly the metric names and values lossgeo's own loop logs (they once
    ran two functions, with tolerances 1e-3 against 1e-4 and other layer names)."""
    import copy

    from lossgeo.run.experiment import prepare
    from lossgeo.run.measurements import curvature_settings
    from lossgeo.run.train import train

    from .test_training_run import NullLogger as LoopLogger

    config = tiny_config(
        fake_data_dir,
        model=model_name,
        epochs=1,
        curvature=True,
        curvature_k=3,
        trace_samples=4,
        noise_scale=False,
        sharpness=False,
        landscape=False,
        momentum=0.9,
    )
    data, model, loss_fn, _ = prepare(config)
    at_init = copy.deepcopy(model)
    loop = LoopLogger()
    train(config, data, model, loss_fn, loop)
    loop_row = dict(loop.epochs[0][1])  # epoch 0: the initialisation, before any step
    assert loop.epochs[0][0] == 0
    own = NullLogger()
    tracker = Tracker(
        at_init,
        loss_fn,
        (data.probe.x, data.probe.y),
        optimizer=SGDStep(config.lr, momentum=config.momentum),
        steps=StepSettings(every=0),
        curvature=curvature_settings(config),
        logger=own,
    )
    mine = tracker.epoch(0)
    assert own.metrics == [(0, mine)]
    evaluation = {k for k in loop_row if k.split("_")[0] in ("train", "val", "test", "gen")}
    assert set(mine) == set(loop_row) - evaluation
    timing = ("curvature_seconds", "curvature_peak_mb")
    assert {k: v for k, v in mine.items() if k not in timing} == {
        k: loop_row[k] for k in mine if k not in timing
    }
    layers = {k for k in mine if k.startswith("lambda_max/")}
    assert len(layers) >= 2 and {
        "lambda_min",
        "lambda_max_ggn",
        "lambda_max_fisher",
        "hessian_trace",
        "edge_ratio",
        "lambda_3",
    } <= set(mine)


def test_under_adam_the_regime_follows_the_preconditioned_edge_ratio():
    """AdamW logged step/edge_ratio 1.318 and step/regime 0 ("below"): the regime was read
    off the batch ratio, a noisy side estimate under Adam. Under SGD batch sharpness
    governs, as before."""
    from lossgeo.geometry.regimes import REGIMES, EdgeRegimeDetector

    for make, governing in (
        (lambda p: torch.optim.AdamW(p, lr=0.05), "step/edge_ratio"),
        (lambda p: torch.optim.SGD(p, lr=0.5), "step/batch_edge_ratio"),
    ):
        model, x, y = small_problem()
        optimizer = make(model.parameters())
        logger = NullLogger()
        tracker = Tracker(
            model,
            F.cross_entropy,
            (x, y),
            optimizer=optimizer,
            steps=StepSettings(every=1, batch_size=32),
            logger=logger,
        )
        for step in range(1, 4):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            tracker.step(step)
        detector = EdgeRegimeDetector()
        for _, logged in logger.metrics:
            want = detector.update(logged[governing], logged["step/probe_loss"])
            assert logged["step/regime"] == REGIMES[want], (governing, logged)
        assert logged["step/edge_ratio"] != logged["step/batch_edge_ratio"]


def test_measure_epoch_returns_what_it_measured_and_leaves_the_state_metrics_to_the_loop():
    """The data walks one way: the Tracker returns the epoch set (the loop records it); it
    writes into the loop's state only the top eigenpairs that the loop's later measurements
    (landscapes) read."""
    from lossgeo import CurvatureSettings
    from lossgeo.run.protocols import EpochState

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    settings = CurvatureSettings(k=2, trace_samples=0, layerwise=False, ggn=False)
    tracker = Tracker(
        model, F.cross_entropy, (x, y), optimizer=SGDStep(0.1), steps=StepSettings(every=0),
        curvature=settings, logger=NullLogger(),
    )  # fmt: skip
    evaluation = {"test_loss": 0.5}
    state = EpochState(
        epoch=1, is_last=False, model=model, loss_fn=F.cross_entropy, data=None,
        trajectory=[], metrics=evaluation,
    )  # fmt: skip
    metrics, artifacts = tracker.measure_epoch(state)
    assert evaluation == {"test_loss": 0.5}  # untouched
    assert state.cache["hessian_top"].values[0] == metrics["lambda_max"]
    assert metrics["edge_ratio"] == pytest.approx(metrics["lambda_max"] * 0.1 / 2)
    assert set(tracker.epoch_seconds) == {"curvature"} and "spectrum/eigen.pt" not in artifacts
