"""Runs back into pandas, the comparison plots, the spike detector and the LaTeX report."""

import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from lossgeo.analysis.runs import load_history, load_runs
from lossgeo.analysis.statistics import correlations
from lossgeo.cli import cli
from lossgeo.geometry.spikes import detect_spikes
from lossgeo.run.experiment import run_training

from ..conftest import REPO, tiny_config


@pytest.fixture
def small_experiment(tracking, fake_data_dir):
    runs = []
    for lr, batch in ((0.2, 16), (0.05, 64), (0.02, 128)):
        runs.append(
            run_training(
                tiny_config(
                    fake_data_dir,
                    lr=lr,
                    batch_size=batch,
                    epochs=2,
                    curvature=True,
                    curvature_k=2,
                    density_steps=8,
                    trace_samples=2,
                    sharpness_directions=1,
                    landscape=False,
                    experiment="small",
                )
            )
        )
    return runs


def test_load_runs_and_history_match_what_was_logged(small_experiment):
    runs = load_runs(experiment="small")
    assert len(runs) == 3 and set(runs["run_id"]) == {o.run_id for o in small_experiment}
    assert runs["lr"].dtype.kind == "f" and set(runs["batch_size"]) == {16, 64, 128}
    for outcome in small_experiment:
        row = runs[runs["run_id"] == outcome.run_id].iloc[0]
        assert row["lambda_max"] == pytest.approx(outcome.history.iloc[-1]["lambda_max"])
        assert row["label"].startswith("mlp / lr=")
    history = load_history(runs, metrics=["train_loss", "lambda_max"])
    assert set(history.columns) == {"run_id", "label", "epoch", "metric", "value"}
    assert len(history) == 3 * 2 * 3
    wide = history.pivot_table(index=["run_id", "epoch"], columns="metric", values="value")
    first = small_experiment[0]
    assert wide.loc[first.run_id]["train_loss"].tolist() == pytest.approx(
        first.history["train_loss"].tolist()
    )
    every = load_history(runs.iloc[:1])
    assert {"test_acc", "lambda_max", "hessian_trace"} <= set(every["metric"])


def test_correlations_closed_form():
    frame = pd.DataFrame({"a": [1, 2, 3, 4, 5], "b": [2, 4, 6, 8, 100], "c": [5, 4, 3, 2, 1]})
    table = correlations(frame, [("a", "b"), ("a", "c"), ("a", "missing")]).set_index("y")
    assert table.loc["b", "spearman"] == pytest.approx(1.0)
    assert table.loc["b", "kendall"] == pytest.approx(1.0)
    assert table.loc["c", "spearman"] == pytest.approx(-1.0) and table.loc["c", "n"] == 5
    assert table.loc["missing", "n"] == 0


def test_spike_detector():
    history = pd.DataFrame(
        {
            "epoch": [0, 1, 2, 3, 4],
            "lambda_max": [10, 15, 40, 41, 39],
            "edge_ratio": [0.5, 0.8, 0.9, 1.05, 0.97],
        }
    )
    spikes = detect_spikes(history)
    assert [s.epoch for s in spikes] == [2, 3]
    assert "x2.67" in spikes[0].reason and "edge_ratio crossed 1" in spikes[1].reason
    assert detect_spikes(history, factor=3) == [s for s in spikes if s.epoch == 3]
    # measured only at the initialisation and the end: steady sharpening is no spike
    sparse = pd.DataFrame({"epoch": [0, 38], "lambda_max": [2.0, 12.0]})
    assert detect_spikes(sparse) == []
    assert [
        s.reason for s in detect_spikes(pd.DataFrame({"epoch": [0, 2], "lambda_max": [2.0, 9.0]}))
    ] == ["lambda_max x4.50 over 2 epochs"]
    with pytest.raises(ValueError):
        detect_spikes(history, factor=1)


def test_compare_writes_and_logs_the_seven_plots(small_experiment, tracking):
    result = CliRunner().invoke(cli, ["compare", "--experiment", "small", "--out", "plots"])
    assert result.exit_code == 0, result.output
    expected = {
        "loss_curves.png",
        "accuracy_curves.png",
        "lambda_max.png",
        "sharpness.png",
        "gen_gap_vs_lambda.png",
        "noise_vs_lambda.png",
        "spectra.png",
    }
    assert {p.name for p in (tracking / "plots").iterdir()} == expected
    logged = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("small").experiment_id], "tags.kind = 'comparison'"
    )
    assert {a.path for a in MlflowClient().list_artifacts(logged[0].info.run_id, "plots")} == {
        f"plots/{name}" for name in expected
    }
    bad = CliRunner().invoke(cli, ["compare", "--experiment", "nothing-here"])
    assert bad.exit_code == 2 and bad.stderr.strip().splitlines() == [
        f"lossgeo: error: experiment: there is no experiment 'nothing-here' in "
        f"sqlite:///{tracking}/mlflow.db"
    ]


def test_report_table_matches_load_runs_and_compiles(small_experiment, tracking):
    result = CliRunner().invoke(cli, ["report", "--experiment", "small", "--out", "latex"])
    assert result.exit_code == 0, result.output
    tex = (tracking / "latex" / "main.tex").read_text()
    for section in ("Theory", "Methods", "Results", "Interpretation", "Applications"):
        assert f"\\section{{{section}}}" in tex
    bib = (tracking / "latex" / "references.bib").read_text()
    for key in (
        "keskar2017",
        "jastrzebski2017",
        "li2018",
        "cohen2021",
        "ghorbani2019",
        "yao2020",
        "dinh2017",
        "mccandlish2018",
    ):
        assert f"{{{key}," in bib
    runs = load_runs(experiment="small")
    runs = runs[runs["tags.kind"].isna()] if "tags.kind" in runs else runs
    rows = {
        m.group(1): m.group(2) for m in re.finditer(r"^(mlp / .*?) & (.*) \\\\$", tex, re.MULTILINE)
    }
    assert len(rows) == 3
    for _, run in runs.iterrows():
        cells = rows[run["label"].replace("_", r"\_")].split(" & ")
        assert float(cells[0]) == pytest.approx(run["train_acc"], rel=1e-3)  # 4 significant
        assert float(cells[3]) == pytest.approx(run["lambda_max"], rel=1e-3)
    assert "Spearman" in tex and "$n = 3$" in tex
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed: the LaTeX sources were checked, not compiled")
    assert (tracking / "latex" / "main.pdf").stat().st_size > 10_000


@pytest.mark.slow
def test_scripts_have_help():
    for script in ("compare_landscape_results.py", "noise_vs_curvature.py"):
        out = subprocess.run(
            [sys.executable, str(REPO / "scripts" / script), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0 and "--parent-run" in out.stdout


def add_rejected_launcher_run(experiment: str) -> str:
    """What `mlflow run . -P lr=abc` leaves: a FAILED run whose lr does not parse."""
    c = MlflowClient()
    run = c.create_run(c.get_experiment_by_name(experiment).experiment_id, run_name="main")
    c.log_param(run.info.run_id, "lr", "abc")
    c.log_param(run.info.run_id, "batch_size", "32")
    c.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


RAW_FLOAT = re.compile(r"\d\.\d{7,}|\b\d+\.0\b")  # 0.0031475740228905443, "epochs: 2.0"


@pytest.mark.slow
def test_report_reads_right_on_the_page_beside_a_rejected_run(small_experiment, tracking):
    """One FAILED run with unparsable parameters once broke compare and report for the whole
    experiment; the pages printed wrong glyphs, "nan", raw floats, a canned OCR paragraph,
    and an H2 verdict from three runs never trained to equal fit."""
    add_rejected_launcher_run("small")
    for command in (
        ["compare", "--experiment", "small", "--out", "plots"],
        ["report", "--experiment", "small", "--out", "latex"],
    ):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 0, result.output
        assert "left out: 1 FAILED" in result.stderr and "parent_run" not in result.stderr
    tex = (tracking / "latex" / "main.tex").read_text()
    assert "OCR" not in tex and "nan" not in tex.lower().replace("nanmean", "")
    assert "low noise $\\rightarrow$ sharper" in tex and "$\\le$ 2(1+m)/lr" in tex
    assert "not trained to a common fit, and 3 runs are too few" in tex
    methods = tex.split("\\section{Methods}")[1].split("\\section{Results}")[0]
    assert not RAW_FLOAT.search(methods), methods
    assert "epochs: 2;" in methods and "learning rates: 0.02, 0.05, 0.2;" in methods
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed: the LaTeX sources were checked, not compiled")
    log = (tracking / "latex" / "main.log").read_text(errors="replace")
    assert "Overfull \\hbox" not in log
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext (poppler-utils) not installed: the log was checked, not the text")
    text = subprocess.run(
        ["pdftotext", "-layout", str(tracking / "latex" / "main.pdf"), "-"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "¡" not in text and "¿" not in text and "→" in text
    assert not re.search(r"\bnan\b", text) and not RAW_FLOAT.search(text.split("Results")[0])
    pages = text.split("\f")
    last = [p for p in pages if p.strip()][-1]
    assert "References" in last and len(re.findall(r"^\s*\[\d+\]", last, re.M)) > 1, last


def test_many_logged_metrics_read_back_without_a_fragmented_frame(tracking):
    """`report` printed pandas' "DataFrame is highly fragmented" twice: load_runs assigned
    its converted columns one by one."""
    import warnings

    from mlflow.entities import Metric, Param

    c = MlflowClient()
    run = c.create_run(c.create_experiment("wide")).info.run_id
    c.log_batch(
        run,
        metrics=[Metric(f"m{i}", float(i), 0, 0) for i in range(150)],
        params=[Param(f"p{i}", str(i)) for i in range(100)],
    )
    c.set_terminated(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.PerformanceWarning)
        runs = load_runs(experiment="wide")
    assert runs.loc[0, "m149"] == 149 and runs.loc[0, "p99"] == 99
