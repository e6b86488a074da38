"""PAC-Bayes flatness inside training runs (final point only) and on logged runs."""

from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from lossgeo.cli import cli
from lossgeo.geometry.landscape_measure import pac_bayes_measures
from lossgeo.run.experiment import load_logged_run, run_training

from ..conftest import tiny_config

KEYS = ["pac_bayes_flatness", "pac_bayes_sigma", "pac_bayes_mag_flatness", "pac_bayes_mag_sigma"]


def probe_measures(run_id: str, increase: float = 0.1) -> dict[str, float]:
    config, data, model, loss_fn = load_logged_run(run_id)
    return pac_bayes_measures(
        model, loss_fn, (data.probe.x, data.probe.y), increase, seed=config.seed
    )


def test_a_run_logs_pac_bayes_flatness_once_at_its_final_checkpoint(tracking, fake_data_dir):
    config = tiny_config(
        fake_data_dir,
        epochs=2,
        curvature=False,
        sharpness=True,
        sharpness_directions=1,
        landscape=False,
        pac_bayes=True,
    )
    outcome = run_training(config)
    client = MlflowClient()
    for key in KEYS:
        assert [m.step for m in client.get_metric_history(outcome.run_id, key)] == [2], key
    logged = client.get_run(outcome.run_id).data.metrics
    # the same numbers from the logged checkpoint and probe set
    assert {k: logged[k] for k in KEYS} == probe_measures(outcome.run_id)
    assert logged["pac_bayes_flatness"] == 1 / logged["pac_bayes_sigma"] ** 2


def test_pac_bayes_command_measures_logged_runs_and_refuses_bad_input(tracking, fake_data_dir):
    config = tiny_config(
        fake_data_dir, epochs=1, curvature=False, sharpness=False, landscape=False, pac_bayes=False
    )
    run_id = run_training(config).run_id
    client = MlflowClient()
    assert not set(KEYS) & set(client.get_run(run_id).data.metrics)
    runner = CliRunner()
    for bad in (
        ["pac-bayes", "--run-id", run_id, "--max-increase", "0"],
        ["pac-bayes"],
        ["pac-bayes", "--run-id", run_id, "--parent-run", run_id],
    ):
        result = runner.invoke(cli, bad)
        assert result.exit_code == 2 and "error" in result.output, result.output
    assert not set(KEYS) & set(client.get_run(run_id).data.metrics)  # nothing written
    result = runner.invoke(cli, ["pac-bayes", "--run-id", run_id, "--max-increase", "0.2"])
    assert result.exit_code == 0, result.output
    logged = client.get_run(run_id).data.metrics
    assert {k: logged[k] for k in KEYS} == probe_measures(run_id, 0.2)
    assert client.get_run(run_id).data.tags["pac_bayes_increase"] == "0.2"
    # a larger budget allows more noise than the default one
    assert logged["pac_bayes_sigma"] > probe_measures(run_id, 0.1)["pac_bayes_sigma"]
