"""Logged runs back into pandas: one row per run, and a long table of per-epoch metrics.

from lossgeo.analysis import load_runs, load_history
runs = load_runs()      # the default experiment; or experiment=, parent_run=, filter=
history = load_history(runs, metrics=["lambda_max", "test_loss"])
history.pivot_table(index="epoch", columns="label", values="value")
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import pandas as pd

from lossgeo.run import tracking


def run_label(row: pd.Series) -> str:
    """A readable label: "cnn / high-noise" for grid cells, else model and lr/batch size."""
    model = row.get("model") or row.get("tags.model") or "?"
    regime = row.get("tags.regime")
    if isinstance(regime, str) and regime:
        return f"{model} / {regime}"
    try:
        return f"{model} / lr={float(row['lr']):g}, B={int(float(row['batch_size']))}"
    except (KeyError, TypeError, ValueError, OverflowError):  # missing, NaN or unparsable
        return f"{model} / {str(row.get('run_id', ''))[:8]}"


def _numeric_params() -> set[str]:
    """The training parameters that are numbers: read as numbers even when some run logged
    a value that does not parse (a launcher run rejected for `-P lr=abc`)."""
    from lossgeo.config import config_fields

    return {f.name for f in config_fields() if type(f.default) in (int, float)}


def load_runs(
    experiment: str | Iterable[str] | None = None,
    parent_run: str | None = None,
    filter: str | None = None,
    include_parent: bool = False,
) -> pd.DataFrame:
    """One row per run: run_id, status, params (numeric where they parse, under their own
    names), final metrics (their names), tags (``tags.*``), and a ``label``. A numeric
    training parameter that a run logged unparsable (``-P lr=abc``) reads NaN there, and
    ``unparsable_params`` names it (empty for every sound run)."""
    clauses = [filter] if filter else []
    experiment_ids = None
    if parent_run:
        parent = tracking.get_run(parent_run)
        experiment_ids = [parent.info.experiment_id]
        clauses.append(f"tags.`{tracking.PARENT_TAG}` = '{parent_run}'")
    names = (
        [experiment] if isinstance(experiment, str) else (list(experiment) if experiment else None)
    )
    if names is None and experiment_ids is None:
        names = [tracking.default_experiment()]
    frame = tracking.search_runs(
        experiment_names=names if experiment_ids is None else None,
        experiment_ids=experiment_ids,
        filter_string=" and ".join(clauses),
    )
    if frame.empty:
        return pd.DataFrame(columns=["run_id", "status", "label"])
    if parent_run and not include_parent:
        frame = frame[frame["run_id"] != parent_run]
    renamed = {}
    for column in frame.columns:
        if column.startswith("params."):
            renamed[column] = column[len("params.") :]
        elif column.startswith("metrics."):
            renamed[column] = column[len("metrics.") :]
    frame = frame.rename(columns=renamed)
    numeric = _numeric_params()
    unparsable = pd.Series("", index=frame.index)
    columns = {}
    for column in renamed.values():
        converted = pd.to_numeric(frame[column], errors="coerce")
        bad = converted.isna() & frame[column].notna()
        if column in numeric and bad.any():
            unparsable[bad] += column + " "
        if column in numeric or not bad.any():
            columns[column] = converted
    # built in one piece (column by column fragments the frame: pandas' PerformanceWarning)
    order = list(frame.columns)
    frame = pd.concat(
        [
            frame.drop(columns=list(columns)),
            pd.DataFrame(columns),
            unparsable.str.strip().rename("unparsable_params"),
        ],
        axis=1,
    )
    frame = frame[order + ["unparsable_params"]]
    frame = pd.concat([frame, unique_labels(frame).rename("label")], axis=1)
    return frame.sort_values("start_time").reset_index(drop=True)


def unique_labels(runs: pd.DataFrame) -> pd.Series:
    """`run_label` of each run; runs that would share one (the seeds of a grid cell) get
    their seed after it, "mlp / B-16 (seed 1)", or their run id's start without a seed tag,
    so that tables and legends tell them apart."""
    labels = runs.apply(run_label, axis=1) if len(runs) else pd.Series([], dtype=object)
    shared = labels.duplicated(keep=False)
    if not shared.any():
        return labels
    seeds = runs["tags.seed"] if "tags.seed" in runs else pd.Series(None, index=runs.index)
    ids = runs["run_id"].astype(str).str[:8] if "run_id" in runs else runs.index.astype(str)
    which = [
        f"seed {seed}" if isinstance(seed, str) and seed else str(run)
        for seed, run in zip(seeds[shared], ids[shared])
    ]
    labels = labels.copy()
    labels[shared] = [f"{label} ({tag})" for label, tag in zip(labels[shared], which)]
    return labels


def load_history(
    runs: pd.DataFrame | Iterable[str], metrics: Iterable[str] | None = None, max_workers: int = 8
) -> pd.DataFrame:
    """Long table (run_id, label, epoch, metric, value) of every per-epoch metric.

    Histories are fetched concurrently (one request per run and metric, in a thread pool),
    which keeps a tracking server's latency from adding up."""
    if isinstance(runs, pd.DataFrame):
        run_ids = list(runs["run_id"])
        labels = dict(zip(runs["run_id"], runs.get("label", runs["run_id"])))
    else:
        run_ids = list(runs)
        labels = {r: r for r in run_ids}
    wanted = list(metrics) if metrics is not None else None
    jobs = []
    for run_id in run_ids:
        keys = wanted if wanted is not None else tracking.run_metric_keys(run_id)
        jobs += [(run_id, key) for key in keys]

    def fetch(job):
        run_id, key = job
        return [
            (run_id, labels[run_id], step, key, value)
            for step, value in tracking.metric_history(run_id, key)
        ]

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        rows = [row for chunk in pool.map(fetch, jobs) for row in chunk]
    frame = pd.DataFrame(rows, columns=["run_id", "label", "epoch", "metric", "value"])
    return frame.sort_values(["run_id", "metric", "epoch"]).reset_index(drop=True)
