"""From logged runs to files: the comparison plots (plots/) and the LaTeX report (latex/),
both also logged to MLflow."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lossgeo.analysis import plots
from lossgeo.analysis import runs as analysis
from lossgeo.errors import UserInputError
from lossgeo.run.tracking import TrackedRun, load_artifact_object
from lossgeo.studies.statistics import study_verdicts


def select_runs(experiment: str | None, parent_run: str | None) -> pd.DataFrame:
    """The FINISHED training runs of an experiment (default: the default experiment) or of
    a study's parent run; none is bad input (nothing would be compared)."""
    from lossgeo.run.tracking import default_experiment, experiment_exists, tracking_uri

    experiment, parent_run = experiment or None, parent_run or None
    if not experiment and not parent_run:
        experiment = default_experiment()
    if experiment and not parent_run and not experiment_exists(experiment):
        raise UserInputError(f"experiment: there is no experiment {experiment!r} in "
                             f"{tracking_uri()}")
    try:
        runs = analysis.load_runs(experiment=experiment, parent_run=parent_run)
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(
            f"parent_run: cannot read runs ({type(exc).__name__}: {exc})") from exc
    if not parent_run and "tags.lossgeo_role" in runs:
        runs = runs[runs["tags.lossgeo_role"].fillna("") != "parent"]
    if "tags.kind" in runs:  # comparison/report/interpolation runs are not training runs
        runs = runs[runs["tags.kind"].isna()]
    if "train_loss" in runs:
        runs = runs[runs["train_loss"].notna()]
    finished = runs[runs["status"] == "FINISHED"] if "status" in runs else runs
    if finished.empty:
        states = runs["status"].value_counts().to_dict() if "status" in runs else {}
        seen = ", ".join(f"{n} {s}" for s, n in states.items()) or "none at all"
        where = f"parent run {parent_run}" if parent_run else f"experiment {experiment!r}"
        raise UserInputError(f"experiment: no finished training runs in {where} ({seen}); "
                             "nothing written")
    runs = finished
    if "noise_temperature" not in runs and {"lr", "batch_size"} <= set(runs):
        runs = runs.assign(noise_temperature=runs["lr"] / runs["batch_size"])
    return runs.reset_index(drop=True)


def final_densities(runs: pd.DataFrame) -> dict[str, dict]:
    densities = {}
    for _, row in runs.iterrows():
        try:
            densities[row["label"]] = load_artifact_object(row["run_id"], "spectrum/density.pt")
        except Exception:  # runs without curvature have no spectrum
            continue
    return densities


def compare(experiment: str | None = None, parent_run: str | None = None,
            out_dir: str | Path = "plots", log: bool = True) -> dict[str, Path]:
    """Writes the seven comparison plots to out_dir and logs them to MLflow."""
    import matplotlib.pyplot as plt

    finished = select_runs(experiment, parent_run)
    history = analysis.load_history(finished)
    figures = plots.comparison_figures(finished, history, final_densities(finished))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    tracked = _output_run(experiment, parent_run, "comparison") if log else None
    for name, figure in figures.items():
        paths[name] = out / name
        figure.savefig(paths[name], dpi=130)
        if tracked is not None:
            tracked.log_file(paths[name], "plots")
        plt.close(figure)
    if tracked is not None:
        tracked.log_text("comparison_runs.csv", finished.to_csv(index=False))
        tracked.finish()
    return paths


def report(experiment: str | None = None, parent_run: str | None = None,
           out_dir: str | Path = "latex", compile_pdf: bool = True,
           log: bool = True) -> tuple[Path, Path | None]:
    """Writes latex/main.tex (+ figures, references.bib), compiles it where pdflatex exists,
    and logs the sources and PDF to MLflow."""
    from lossgeo.analysis.report import write_report

    out = Path(out_dir)
    figure_dir = out / "figures-src"
    compare(experiment, parent_run, figure_dir, log=False)
    runs = select_runs(experiment, parent_run)
    tex, pdf = write_report(runs, study_verdicts(runs), figure_dir, out,
                            compile_pdf=compile_pdf)
    if log:
        tracked = _output_run(experiment, parent_run, "report")
        tracked.log_file(tex, "latex")
        tracked.log_file(out / "references.bib", "latex")
        if pdf is not None and pdf.exists():
            tracked.log_file(pdf, "latex")
        tracked.log_text("latex/table_runs.csv", runs.to_csv(index=False))
        tracked.finish()
    return tex, pdf


def _output_run(experiment: str | None, parent_run: str | None, kind: str) -> TrackedRun:
    """A run tagged kind=<kind>, a child of the parent run when one is given: under
    `mlflow run` the launcher's run (so no empty run is left), else a new one."""
    from lossgeo.run.tracking import default_experiment, run_experiment_name

    experiment, parent_run = experiment or None, parent_run or None
    if parent_run:
        experiment = run_experiment_name(parent_run)
    return TrackedRun(experiment=experiment or default_experiment(), run_name=kind,
                      parent_run_id=parent_run, tags={"kind": kind}, adopt_launcher=True)
