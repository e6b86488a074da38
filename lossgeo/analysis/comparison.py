"""From logged runs to files: the comparison plots (plots/) and the LaTeX report (latex/),
both also logged to MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from lossgeo.analysis import plots
from lossgeo.analysis import runs as analysis
from lossgeo.analysis.statistics import study_verdicts
from lossgeo.errors import UserInputError
from lossgeo.run.tracking import TrackedRun, load_artifact_object


def select_runs(experiment: str | None, parent_run: str | None) -> pd.DataFrame:
    """The FINISHED training runs of an experiment (default: the default experiment) or of
    a study's parent run; none is bad input (nothing would be compared)."""
    from lossgeo.run.tracking import default_experiment, experiment_exists, tracking_uri

    experiment, parent_run = experiment or None, parent_run or None
    if not experiment and not parent_run:
        experiment = default_experiment()
    if experiment and not parent_run and not experiment_exists(experiment):
        raise UserInputError(
            f"experiment: there is no experiment {experiment!r} in {tracking_uri()}"
        )
    where = f"parent run {parent_run}" if parent_run else f"experiment {experiment!r}"
    try:
        runs = analysis.load_runs(experiment=experiment, parent_run=parent_run)
    except UserInputError:
        raise
    except Exception as exc:
        option = "parent_run" if parent_run else "experiment"
        raise UserInputError(
            f"{option}: cannot read the runs of {where} ({type(exc).__name__}: {exc})"
        ) from exc
    if not parent_run and "tags.lossgeo_role" in runs:
        runs = runs[runs["tags.lossgeo_role"].fillna("") != "parent"]
    if "tags.kind" in runs:  # comparison/report/interpolation runs are not training runs
        runs = runs[runs["tags.kind"].isna()]
    status = runs["status"] if "status" in runs else pd.Series("FINISHED", index=runs.index)
    unparsable = (
        (runs["unparsable_params"].fillna("") != "")
        if "unparsable_params" in runs
        else pd.Series(False, index=runs.index)
    )
    no_metrics = (
        runs["train_loss"].isna() if "train_loss" in runs else pd.Series(True, index=runs.index)
    )
    keep = (status == "FINISHED") & ~unparsable & ~no_metrics
    left_out = [f"{n} {s}" for s, n in status[status != "FINISHED"].value_counts().items()]
    for count, why in (
        (int((unparsable & (status == "FINISHED")).sum()), "with unparsable parameters"),
        (int((no_metrics & ~unparsable & (status == "FINISHED")).sum()), "without metrics"),
    ):
        if count:
            left_out.append(f"{count} {why}")
    if not keep.any():
        seen = ", ".join(left_out) or "none at all"
        raise UserInputError(
            f"experiment: no finished training runs in {where} ({seen}); nothing written"
        )
    runs = runs[keep]
    if "noise_temperature" not in runs and {"lr", "batch_size"} <= set(runs):
        runs = runs.assign(noise_temperature=runs["lr"] / runs["batch_size"])
    runs = runs.reset_index(drop=True)
    runs.attrs["left_out"] = ", ".join(left_out)  # said by compare/report, never fatal
    return runs


def final_densities(runs: pd.DataFrame) -> dict[str, dict]:
    densities = {}
    for _, row in runs.iterrows():
        try:
            densities[row["label"]] = load_artifact_object(row["run_id"], "spectrum/density.pt")
        except Exception:  # runs without curvature have no spectrum
            continue
    return densities


def compare(
    experiment: str | None = None,
    parent_run: str | None = None,
    out_dir: str | Path = "plots",
    log: bool = True,
    say: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Writes the seven comparison plots to out_dir and logs them to MLflow. `say` hears
    which runs were left out (unfinished, unparsable), if any."""
    finished = select_runs(experiment, parent_run)
    _say_left_out(finished, say)
    if not log:
        return draw_comparison(finished, out_dir)
    # entered, so the run has a heartbeat while the figures are drawn, and ends FAILED or
    # KILLED (not RUNNING) if drawing them fails or is interrupted
    with _output_run(experiment, parent_run, "comparison") as tracked:
        paths = draw_comparison(finished, out_dir, tracked)
        tracked.log_text("comparison_runs.csv", finished.to_csv(index=False))
    return paths


def draw_comparison(
    finished: pd.DataFrame, out_dir: str | Path, tracked: TrackedRun | None = None
) -> dict[str, Path]:
    """The comparison plots of these runs as PNG files in out_dir (and logged to `tracked`)."""
    import matplotlib.pyplot as plt

    history = analysis.load_history(finished)
    figures = plots.comparison_figures(finished, history, final_densities(finished))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, figure in figures.items():
        paths[name] = out / name
        figure.savefig(paths[name], dpi=130)
        if tracked is not None:
            tracked.log_file(paths[name], "plots")
        plt.close(figure)
    return paths


def _measures_if_a_study(runs: pd.DataFrame, figure_dir: Path) -> pd.DataFrame | None:
    """The measures' scores when the runs vary a factor (with their chart in figure_dir)."""
    import matplotlib.pyplot as plt

    from lossgeo.analysis.measures import score_measures, study_factors

    if not study_factors(runs):
        return None
    table = score_measures(runs)
    if table.empty or table["psi"].isna().all():
        return None
    figure = plots.measures_ranking(table)
    figure.savefig(figure_dir / "measures.png", dpi=130)
    plt.close(figure)
    return table


def _say_left_out(runs: pd.DataFrame, say: Callable[[str], None] | None) -> None:
    if say is not None and runs.attrs.get("left_out"):
        say(
            f"left out: {runs.attrs['left_out']} (not finished, or not valid training runs); "
            f"{len(runs)} finished run(s) used"
        )


def report(
    experiment: str | None = None,
    parent_run: str | None = None,
    out_dir: str | Path = "latex",
    compile_pdf: bool = True,
    log: bool = True,
    say: Callable[[str], None] | None = None,
) -> tuple[Path, Path | None]:
    """Writes latex/main.tex (+ figures, references.bib), compiles it where pdflatex exists,
    and logs the sources and PDF to MLflow."""
    from lossgeo.analysis.report import write_report

    out = Path(out_dir)
    figure_dir = out / "figures-src"
    runs = select_runs(experiment, parent_run)
    _say_left_out(runs, say)
    draw_comparison(runs, figure_dir)
    measures = _measures_if_a_study(runs, figure_dir)
    tex, pdf = write_report(
        runs, study_verdicts(runs), figure_dir, out, compile_pdf=compile_pdf, measures=measures
    )
    if log:
        with _output_run(experiment, parent_run, "report") as tracked:
            tracked.log_file(tex, "latex")
            tracked.log_file(out / "references.bib", "latex")
            if pdf is not None and pdf.exists():
                tracked.log_file(pdf, "latex")
            tracked.log_text("latex/table_runs.csv", runs.to_csv(index=False))
    return tex, pdf


def score_study_measures(
    parent_run: str, out_dir: str | Path = "measures", log: bool = True
) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Scores every logged measure of a study's runs against gen_gap and gen_gap_acc
    (`analysis.measures.score_measures`), writes measures.csv and measures.png to out_dir
    and logs them on the parent run (measures.csv, plots/measures.png)."""
    from lossgeo.analysis.measures import score_measures

    runs = select_runs(None, parent_run)
    table = score_measures(runs)
    if table.empty or table["psi"].isna().all():
        raise UserInputError(
            f"parent_run: its {len(runs)} finished run(s) vary no setting with a logged "
            "measure and gap to score (a study over at least one factor is needed)"
        )
    figure = plots.measures_ranking(table)
    return table, _table_and_figure(parent_run, out_dir, "measures", table, figure, log)


def study_edge(
    parent_run: str, out_dir: str | Path = "edge", log: bool = True
) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Whether each finished run of a study reached its optimizer's stability edge
    (`analysis.edge`): writes edge.csv and edge.png to out_dir and logs them on the parent
    run (edge.csv, plots/edge.png)."""
    from lossgeo.analysis.edge import edge_table

    runs = select_runs(None, parent_run)
    history = analysis.load_history(runs)
    lrs = dict(zip(runs["run_id"], runs["lr"])) if "lr" in runs else {}
    table = edge_table(history, lrs)
    if table.empty:
        raise UserInputError(
            f"parent_run: none of its {len(runs)} finished run(s) logged an edge ratio "
            "(curvature on, with an optimizer whose threshold is known, is needed)"
        )
    figure = plots.edge_curves(history, lrs)
    return table, _table_and_figure(parent_run, out_dir, "edge", table, figure, log)


def study_connectivity(
    parent_run: str, folder_run: str, out_dir: str | Path = "connectivity", log: bool = True
) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Barriers by kind of pair over a study's FINISHED connect runs (the children of
    `folder_run`, `run.connect.connect_study`): connectivity_pairs.csv, connectivity.csv and
    connectivity.png into out_dir, logged on the study's parent run."""
    from lossgeo.analysis.connectivity import connectivity_summary, pairs_table

    runs = analysis.load_runs(parent_run=folder_run)
    runs = runs[runs["status"] == "FINISHED"] if not runs.empty else runs
    if runs.empty or "tags.connect.kind" not in runs:
        raise UserInputError(f"parent_run: {parent_run} has no finished connect runs yet")
    pairs = pairs_table(runs)
    summary = connectivity_summary(pairs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs.to_csv(out / "connectivity_pairs.csv", index=False)
    if log:
        TrackedRun(run_id=parent_run).log_file(out / "connectivity_pairs.csv")
    paths = _table_and_figure(
        parent_run, out, "connectivity", summary, plots.connectivity_barriers(summary), log
    )
    return summary, {"connectivity_pairs.csv": out / "connectivity_pairs.csv", **paths}


def _table_and_figure(
    parent_run: str, out_dir: str | Path, name: str, table: pd.DataFrame, figure, log: bool
) -> dict[str, Path]:
    """<name>.csv and <name>.png into out_dir, and onto the parent run (the figure under
    plots/) when `log`."""
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {f"{name}.csv": out / f"{name}.csv", f"{name}.png": out / f"{name}.png"}
    table.to_csv(paths[f"{name}.csv"], index=False)
    figure.savefig(paths[f"{name}.png"], dpi=130)
    plt.close(figure)
    if log:
        parent = TrackedRun(run_id=parent_run)
        parent.log_file(paths[f"{name}.csv"])
        parent.log_file(paths[f"{name}.png"], "plots")
    return paths


ANALYSIS_RUN = "analysis"


def _output_run(experiment: str | None, parent_run: str | None, kind: str) -> TrackedRun:
    """A run tagged kind=<kind>, the child of the analysed parent run when one is given,
    else of the experiment's one "analysis" run, so that comparisons and reports fold
    under one row of the run list instead of cluttering it. Under `mlflow run` the
    launcher's run is adopted (so no empty run is left)."""
    from lossgeo.run.tracking import (
        default_experiment,
        find_or_create_run,
        run_experiment_name,
    )

    experiment, parent_run = experiment or None, parent_run or None
    if parent_run:
        experiment = run_experiment_name(parent_run)
    experiment = experiment or default_experiment()
    parent = parent_run or find_or_create_run(
        experiment, ANALYSIS_RUN, {"kind": ANALYSIS_RUN, "lossgeo_role": ANALYSIS_RUN}
    )
    return TrackedRun(
        experiment=experiment,
        run_name=kind,
        parent_run_id=parent,
        tags={"kind": kind},
        adopt_launcher=True,
    )
