"""Training to a fit (target_train_loss): stop at the first check that reaches the target,
measure there as at the final epoch, mark a run that misses it."""

import math

import torch
from mlflow.tracking import MlflowClient

from lossgeo.data import Split
from lossgeo.run.experiment import prepare, run_training
from lossgeo.run.train import MeasurementResult, evaluate, train

from ..conftest import tiny_config
from .test_training_run import NullLogger


def recorder(seen):
    def measurement(state):
        seen.append((state.epoch, state.is_last))
        return MeasurementResult(metrics={})

    measurement.name = "recorder"
    return measurement


def test_stops_at_the_first_epoch_whose_train_loss_reaches_the_target(fake_data_dir):
    free = NullLogger()
    config = tiny_config(fake_data_dir, epochs=4, lr=0.02)
    train(config, *prepare(config)[:3], free)
    losses = [m["train_loss"] for _, m in free.epochs]
    assert losses[1] > losses[2] > losses[3]
    target = (losses[1] + losses[2]) / 2  # reached at the end of epoch 2, not before
    config = tiny_config(
        fake_data_dir,
        epochs=4,
        lr=0.02,
        target_train_loss=target,
        target_check_every=10**6,
        measure_every=3,
    )
    logger, seen = NullLogger(), []
    result = train(config, *prepare(config)[:3], logger, [recorder(seen)])
    assert [e for e, _ in logger.epochs] == [0, 1, 2]
    assert seen == [(0, False), (2, True)]  # the final measurement set runs where it stopped
    final = logger.epochs[-1][1]
    n_batches = math.ceil(200 / 32)
    assert result.steps_to_target == 2 * n_batches == final["steps_to_target"]
    assert final["epochs_to_target"] == 2.0 and final["train_loss"] == losses[2]


def test_within_the_epoch_the_first_confirmed_step_ends_training(fake_data_dir):
    config = tiny_config(fake_data_dir, epochs=3, lr=0.05, batch_size=16)
    data, model, loss_fn, _ = prepare(config)
    # replay the loop step by step: the first step whose probe and full-train losses both
    # reach the target is where training must stop
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed + 1)
    curve = []
    for _ in range(config.epochs):
        for x, y in data.train.batches(config.batch_size, shuffle=True, generator=gen):
            model.train()
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            # the probe's lower bound: mean of 16 chunk means minus two standard errors
            size = math.ceil(len(data.probe) / 16)
            chunks = torch.tensor(
                [evaluate(model, loss_fn, Split(x, y))[0] for x, y in data.probe.batches(size)],
                dtype=torch.float64,
            )
            low = float(chunks.mean() - 2 * chunks.std() / math.sqrt(len(chunks)))
            curve.append((low, evaluate(model, loss_fn, data.train)[0]))
    target = sorted(t for _, t in curve)[len(curve) // 2]
    expected = 1 + next(i for i, (p, t) in enumerate(curve) if p <= target and t <= target)
    assert expected % math.ceil(200 / 16) != 0  # mid-epoch, so the in-epoch check matters
    config = tiny_config(
        fake_data_dir,
        epochs=3,
        lr=0.05,
        batch_size=16,
        target_train_loss=target,
        target_check_every=1,
    )
    logger = NullLogger()
    result = train(config, *prepare(config)[:3], logger)
    assert result.steps_to_target == expected
    assert logger.epochs[-1][1]["train_loss"] <= target


def test_a_missed_target_is_kept_and_marked(tracking, fake_data_dir):
    missed = run_training(tiny_config(fake_data_dir, epochs=1, target_train_loss=1e-9))
    reached = run_training(tiny_config(fake_data_dir, epochs=3, target_train_loss=5.0))
    c = MlflowClient()
    run = c.get_run(missed.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["reached_target"] == "false"
    assert "steps_to_target" not in run.data.metrics
    run = c.get_run(reached.run_id)
    assert run.data.tags["reached_target"] == "true"
    assert run.data.metrics["steps_to_target"] == 0  # the initialisation is below 5.0
    assert list(reached.history["epoch"]) == [0]


def test_an_accuracy_target_stops_where_the_accuracy_first_reaches_it(fake_data_dir):
    free = NullLogger()
    config = tiny_config(fake_data_dir, epochs=4, lr=0.02)
    train(config, *prepare(config)[:3], free)
    accs = [m["train_acc"] for _, m in free.epochs]
    first = next(e for e, a in enumerate(accs) if a >= 0.5)
    config = tiny_config(
        fake_data_dir, epochs=4, lr=0.02, target_train_acc=0.5, target_check_every=10**6
    )
    logger = NullLogger()
    result = train(config, *prepare(config)[:3], logger)
    assert [e for e, _ in logger.epochs][-1] == first
    assert result.steps_to_target == first * math.ceil(200 / 32)


def test_evaluation_on_its_own_schedule(fake_data_dir):
    config = tiny_config(fake_data_dir, epochs=5, eval_every=2, measure_every=3)
    seen = []

    def measured(state):
        seen.append((state.epoch, state.is_last))
        return MeasurementResult(metrics={"probe_metric": float(state.epoch)})

    measured.name = "probe"
    logger = NullLogger()
    train(config, *prepare(config)[:3], logger, [measured])
    logged = {e: m for e, m in logger.epochs}
    assert sorted(logged) == [0, 2, 3, 4, 5]  # evaluated 0, 2, 4, 5 (last); measured 3
    assert "test_loss" in logged[4] and "test_loss" in logged[5]
    assert logged[3] == {"probe_metric": 3.0}  # measured, not evaluated
    assert seen == [(0, False), (3, False), (5, True)]
    # the trajectory is the same as with evaluation every epoch
    every = NullLogger()
    train(tiny_config(fake_data_dir, epochs=5), *prepare(config)[:3], every)
    assert dict(every.epochs)[4]["train_loss"] == logged[4]["train_loss"]


def test_a_target_is_checked_every_epoch_and_the_final_point_evaluated_in_full(fake_data_dir):
    free = NullLogger()
    config = tiny_config(fake_data_dir, epochs=4, lr=0.02)
    train(config, *prepare(config)[:3], free)
    losses = [m["train_loss"] for _, m in free.epochs]
    target = (losses[2] + losses[3]) / 2  # reached at the end of epoch 3, an odd epoch
    config = tiny_config(
        fake_data_dir,
        epochs=4,
        lr=0.02,
        eval_every=2,
        target_train_loss=target,
        target_check_every=10**6,
    )
    logger = NullLogger()
    train(config, *prepare(config)[:3], logger)
    logged = dict(logger.epochs)
    assert list(logged) == [0, 1, 2, 3]
    assert set(logged[1]) == {"train_loss", "train_acc"}  # the target check's train split
    assert logged[1]["train_loss"] == losses[1] and "test_loss" in logged[2]
    assert logged[3]["test_loss"] == free.epochs[3][1]["test_loss"]  # the final point, in full


def test_stop_converged_ends_training_after_a_window_of_converged_measurements(
    fake_data_dir,
):
    from lossgeo.geometry.regimes import WINDOW

    # far below 2/lr while the loss falls fast: the detector reads converged_below early,
    # before the loss is down to 5% of its first, and again once it is
    config = tiny_config(
        fake_data_dir,
        epochs=20,
        lr=0.05,
        batch_size=16,
        measure_every_steps=2,
        stop_converged=True,
    )
    logger = NullLogger()
    train(config, *prepare(config)[:3], logger)
    measured = [(s, m) for s, m in logger.steps if "step/regime" in m]
    first_loss = measured[0][1]["step/probe_loss"]
    converged = [
        m["step/regime"] == 4.0 and m["step/probe_loss"] <= 0.05 * first_loss  # converged_below
        for _, m in measured
    ]
    # stopped at the first measurement that ends WINDOW converged ones in a row
    first = next(
        i for i in range(WINDOW - 1, len(converged)) if all(converged[i - WINDOW + 1 : i + 1])
    )
    assert first == len(measured) - 1, "training went on past the stop"
    # converged_below readings with the loss still high did not stop it
    assert any(m["step/regime"] == 4.0 and not c for (_, m), c in zip(measured, converged))
    stop_step = measured[first][0]
    assert logger.tags["stopped_early"].endswith(f"at step {stop_step}")
    n_batches = math.ceil(200 / 16)
    last_epoch = logger.epochs[-1][0]
    assert last_epoch == math.ceil(stop_step / n_batches) < config.epochs
    assert "test_loss" in logger.epochs[-1][1]  # the last (partial) epoch is evaluated in full


def test_stop_converged_without_per_step_tracking_is_refused(fake_data_dir):
    import pytest

    from lossgeo.errors import UserInputError

    with pytest.raises(UserInputError, match="stop_converged: needs per-step tracking"):
        tiny_config(fake_data_dir, stop_converged=True)
