import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from lossgeo.models import build_model
from lossgeo.run.experiment import prepare, run_training
from lossgeo.run.tracking import load_artifact_object
from lossgeo.run.train import EpochState, LoopContext, MeasurementResult, measured_epochs, train

from ..conftest import tiny_config

EVAL_METRICS = [
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "test_loss",
    "test_acc",
    "gen_gap",
    "gen_gap_acc",
]


class NullLogger:
    def __init__(self):
        self.epochs, self.objects, self.steps, self.tags = [], {}, [], {}

    def log_epoch(self, epoch, metrics):
        self.epochs.append((epoch, dict(metrics)))

    def log_object(self, path, obj):
        self.objects[path] = obj

    def log_metrics(self, metrics, step=0):
        self.steps.append((step, dict(metrics)))

    def set_tags(self, tags):
        self.tags.update(tags)


def test_schedule_always_has_first_and_last():
    assert measured_epochs(7, 3) == {0, 3, 6, 7}
    assert measured_epochs(0, 5) == {0}


def test_same_seed_same_numbers_bitwise(fake_data_dir):
    runs = []
    for _ in range(2):
        config = tiny_config(fake_data_dir, epochs=2)
        data, model, loss_fn, _ = prepare(config)
        logger = NullLogger()
        train(config, data, model, loss_fn, logger)
        runs.append((logger.epochs, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_measurements_run_on_schedule_and_see_eval_metrics(fake_data_dir):
    config = tiny_config(fake_data_dir, epochs=3, measure_every=2)
    data, model, loss_fn, _ = prepare(config)
    seen = []

    def probe_loss(state: EpochState) -> MeasurementResult:
        seen.append((state.epoch, state.is_last, model.training, len(state.trajectory)))
        assert "train_loss" in state.metrics
        return MeasurementResult(
            metrics={"probe_metric": float(state.epoch)},
            artifacts={"x/y.pt": {"epoch": state.epoch}},
        )

    probe_loss.name = "probe"
    logger = NullLogger()
    result = train(config, data, model, loss_fn, logger, [probe_loss])
    assert [s[0] for s in seen] == [0, 2, 3]
    assert [s[1] for s in seen] == [False, False, True]
    assert [s[3] for s in seen] == [1, 3, 4]
    assert [("probe_metric" in m) for _, m in logger.epochs] == [True, False, True, True]
    assert result.final_artifacts == {"x/y.pt": {"epoch": 3}}


def test_tracked_run_logs_every_epoch_and_artifacts(tracking, fake_data_dir):
    config = tiny_config(fake_data_dir, epochs=2)
    outcome = run_training(config)
    client = MlflowClient()
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["model"] == "mlp" and run.data.tags["dataset"] == "mnist"
    assert run.data.tags["diverged"] == "false"
    assert float(run.data.params["noise_temperature"]) == pytest.approx(0.05 / 32)
    assert run.data.params["lr"] == "0.05" and run.data.params["batch_size"] == "32"
    for metric in EVAL_METRICS:
        history = client.get_metric_history(outcome.run_id, metric)
        assert [m.step for m in history] == [0, 1, 2], metric
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"config.yaml", "metrics.csv", "checkpoint", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(outcome.run_id, "plots")}
    assert {"plots/loss_curves.png", "plots/accuracy_curves.png"} <= plots
    # metrics.csv equals the logged metrics
    local = client.download_artifacts(outcome.run_id, "metrics.csv", str(tracking))
    csv = pd.read_csv(local)
    assert list(csv["epoch"]) == [0, 1, 2]
    for metric in EVAL_METRICS:
        logged = [m.value for m in client.get_metric_history(outcome.run_id, metric)]
        assert csv[metric].tolist() == pytest.approx(logged, rel=1e-12), metric
    # checkpoint loads with weights_only=True into the same architecture
    state = load_artifact_object(outcome.run_id, "checkpoint/model.pt", weights_only=True)
    model = build_model("mlp", 1, 28, 10, hidden=(16,))
    model.load_state_dict(state)
    assert (tracking / "mlruns").is_dir()


def test_divergence_is_recorded_not_crashed(tracking, fake_data_dir):
    config = tiny_config(fake_data_dir, epochs=3, lr=1e6)
    outcome = run_training(config)
    run = MlflowClient().get_run(outcome.run_id)
    assert outcome.diverged_epoch is not None
    assert run.info.status == "FINISHED"
    assert run.data.tags["diverged"] == "true"
    assert run.data.metrics["diverged_epoch"] == outcome.diverged_epoch
    # epoch 0 (the initialisation) was logged before the blow-up and is still there
    assert MlflowClient().get_metric_history(outcome.run_id, "train_loss")[0].step == 0
    assert "metrics.csv" in {a.path for a in MlflowClient().list_artifacts(outcome.run_id)}


@pytest.mark.parametrize(
    "exc,status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_run_status_on_exceptions_keeps_what_was_logged(tracking, fake_data_dir, exc, status):
    config = tiny_config(fake_data_dir, epochs=3)
    created = []

    def stop_after_first_epoch(epoch, metrics):
        if epoch == 1:
            raise exc

    with pytest.raises(type(exc)):
        run_training(
            config,
            context=LoopContext(on_epoch_end=stop_after_first_epoch),
            on_run_created=created.append,
        )
    client = MlflowClient()
    assert client.get_run(created[0]).info.status == status
    assert [m.step for m in client.get_metric_history(created[0], "train_loss")] == [0, 1]
    assert "metrics.csv" in {a.path for a in client.list_artifacts(created[0])}


def test_printed_lines_say_whose_epoch_and_where_the_time_went(fake_data_dir, capsys):
    """A 115-s last epoch printed nothing until it ended, the epoch line gave a total only,
    and a sweep's or grid's lines did not say which trial or cell they were."""
    config = tiny_config(
        fake_data_dir,
        epochs=1,
        curvature=True,
        curvature_k=1,
        trace_samples=2,
        density_steps=4,
        noise_scale=True,
    )
    data, model, loss_fn, _ = prepare(config)
    from lossgeo.run.measurements import build_measurements

    train(
        config,
        data,
        model,
        loss_fn,
        NullLogger(),
        measurements=build_measurements(config),
        context=LoopContext(label="mlp/low-noise seed 1"),
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "[mlp/low-noise seed 1] epoch 0/1: measuring curvature, noise_scale ..."
    assert lines[2].startswith("[mlp/low-noise seed 1] epoch 1/1: measuring curvature")
    assert "(last epoch" in lines[2]
    last = lines[3]
    assert last.startswith("[mlp/low-noise seed 1] epoch 1/1: train_loss")
    split = last.split(" s (", 1)[1].rstrip(")")
    assert [part.split()[0] for part in split.split(", ")] == [
        "train",
        "eval",
        "curvature",
        "noise_scale",
    ]


def test_init_scale_multiplies_every_initial_parameter(fake_data_dir):
    _, plain, _, _ = prepare(tiny_config(fake_data_dir))
    _, small, _, _ = prepare(tiny_config(fake_data_dir, init_scale=0.2))
    pairs = list(zip(plain.parameters(), small.parameters()))
    assert len(pairs) > 0
    assert all(torch.allclose(b, 0.2 * a, rtol=1e-6, atol=0) for a, b in pairs)


@pytest.mark.parametrize("most", [2, 5])
def test_batch_sharpness_budget_reaches_the_per_step_set(fake_data_dir, most):
    # rse 1e-9 is never met, so every measurement uses exactly the budget's batches
    config = tiny_config(
        fake_data_dir,
        epochs=1,
        batch_size=8,  # 8 mini-batches in the 64-sample probe set
        measure_every_steps=10,
        batch_sharpness_rse=1e-9,
        batch_sharpness_max=most,
    )
    data, model, loss_fn, _ = prepare(config)
    logger = NullLogger()
    train(config, data, model, loss_fn, logger)
    counts = [m["step/batch_sharpness_n"] for _, m in logger.steps if "step/batch_sharpness_n" in m]
    assert counts and all(n == most for n in counts)
