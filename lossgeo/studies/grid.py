"""Grid studies: every cell (and seed) a child run of one parent; re-running resumes, and
several workers share a grid by claiming each (cell, seed) through the MLflow store."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any

from tqdm.auto import tqdm

from lossgeo.config import TrainConfig
from lossgeo.errors import UserInputError
from lossgeo.run.experiment import model_for, prepare, run_training
from lossgeo.run.tracking import (
    END_REASON_TAG,
    PARENT_TAG,
    TrackedRun,
    delete_run,
    end_run,
    find_runs,
    launcher_run_id,
    reopen_run,
    resolve_experiment,
)
from lossgeo.run.train import LoopContext
from lossgeo.studies.studyfile import StudySpec
from lossgeo.studies.summary import summarise
from lossgeo.studies.sweep import _launcher_as_worker

# the settings that decide a cell's data: cells that share them share one check of the data
_DATA_SETTINGS = (
    "dataset",
    "data_dir",
    "seed",
    "val_size",
    "train_subset",
    "probe_size",
    "label_noise",
)


def check_cells(configs: list[TrainConfig]) -> None:
    """Every cell checked before anything runs, as `prepare` checks one run: the data are
    loaded once per distinct data setting (not once per cell: 10,000 cells spent hours here
    before the first one ran), each cell's sizes are checked against them and each distinct
    model is built. The data are not kept (each cell loads its own when it runs)."""
    groups: dict[tuple, list[TrainConfig]] = {}
    for config in configs:
        groups.setdefault(tuple(getattr(config, k) for k in _DATA_SETTINGS), []).append(config)
    bar = tqdm(total=len(configs), desc="checking cells", disable=len(configs) < 100 or None)
    for group in groups.values():
        data, *_ = prepare(group[0])
        built = {_model_key(group[0])}
        for config in group[1:]:
            config.check_against_data(len(data.train))
            if _model_key(config) not in built:
                model_for(config, data)
                built.add(_model_key(config))
        bar.update(len(group))
    bar.close()


def _model_key(config: TrainConfig) -> tuple:
    return (config.model, config.hidden, config.activation)


def run_grid(spec: StudySpec, *, experiment: str = "") -> str:
    """Every model x regime x seed as a child run of one parent run; then the summary.

    Re-running the same study resumes it: the parent is found by the study's name, and every
    (cell, seed) that already has a FINISHED run is skipped, never run twice. Workers started
    on the same study at once share it: each (cell, seed) is claimed through the store before
    it runs (`_claim`), so none runs twice, and the parent stays RUNNING until the last
    worker's cell has ended. A new grid's parent is the launcher's run under `mlflow run`; a
    joining or resumed worker's launcher run is nested under it."""
    experiment = resolve_experiment(experiment)
    configs = {
        (model, regime, seed): spec.config(model=model, experiment=experiment, seed=seed, **values)
        for model in spec.models
        for regime, values in spec.regimes.items()
        for seed in spec.seeds
    }
    check_cells(list(configs.values()))
    tags = {"lossgeo_study": spec.name, "lossgeo_role": "parent", "study_kind": "grid"}
    parent_query = (
        f"tags.lossgeo_study = '{spec.name}' and tags.lossgeo_role = 'parent' "
        "and tags.study_kind = 'grid'"
    )
    existing = find_runs(
        experiment, parent_query, order_by=["attributes.start_time ASC"], max_results=1
    )
    worker: Any = contextlib.nullcontext()
    joined = bool(existing)  # a parent exists: this worker resumes or joins the study
    if existing:
        parent = TrackedRun(run_id=existing[0].info.run_id, tags=tags)
    else:
        parent = TrackedRun(experiment=experiment, run_name=f"grid-{spec.name}", tags=tags)
        winner = _first_claim(experiment, parent_query, parent.run_id) or parent.run_id
        if winner != parent.run_id:  # another worker made the parent at the same moment
            _withdraw(parent.run_id, winner, spec.name)
            parent, joined = TrackedRun(run_id=winner, tags=tags), True
    if joined:
        finished = {
            _cell_key(r): r
            for r in find_runs(
                experiment,
                f"tags.`{PARENT_TAG}` = '{parent.run_id}' and attributes.status = 'FINISHED'",
            )
        }
        _check_same_settings(spec.name, finished, configs)
        reopen_run(parent.run_id)
        worker = _launcher_as_worker(parent.run_id, spec.name)
    with parent, worker:
        parent.log_params(
            {
                "study": spec.name,
                "models": ",".join(spec.models),
                "regimes": ",".join(spec.regimes),
                "seeds": ",".join(map(str, spec.seeds)),
            }
        )
        # a tag, not a param: a study may declare its strata after it started
        parent.set_tags({"strata": ",".join(spec.strata)})
        try:
            said_waiting = False
            while True:
                _run_free_cells(spec, configs, experiment, parent.run_id)
                live, stale = _running_cells(experiment, parent.run_id)
                if stale:
                    _end_stale_cells(stale)
                    continue  # their cells are free now: run them here
                if not live:
                    break
                # a worker that died leaves its cell RUNNING until its heartbeat is stale;
                # survivors once exited 0 without a word and left the study unfinished
                if not said_waiting:
                    cells = ", ".join(
                        f"{r.data.tags.get('cell')} seed {r.data.tags.get('seed')}" for r in live
                    )
                    print(
                        f"waiting for {len(live)} cell(s) running in other workers ({cells}): "
                        "a cell whose worker died is ended KILLED once its heartbeat is stale, "
                        "then run here",
                        flush=True,
                    )
                    said_waiting = True
                time.sleep(_wait_interval(live))
        except BaseException:
            if _live_cells(experiment, parent.run_id):
                parent.keep_running()  # another worker is at work: it ends the parent
            raise
        summarise(parent.run_id)
    return parent.run_id


def _run_free_cells(spec: StudySpec, configs: dict, experiment: str, parent: str) -> None:
    """One pass over the grid: every (cell, seed) that no run has finished or holds alive is
    run here, claimed through the store first."""
    for (model, regime, seed), config in configs.items():
        cell = f"{model}/{regime}"
        if _holder(experiment, parent, cell, seed) is not None:
            continue  # finished, or another worker runs it: not even a new run
        try:
            run_training(
                config,
                parent_run_id=parent,
                tags={
                    "regime": regime,
                    "cell": cell,
                    "seed": str(seed),
                    "lossgeo_study": spec.name,
                    "lossgeo_role": "cell",
                },
                on_run_created=functools.partial(_claim, experiment, parent, cell, seed),
                context=LoopContext(label=f"{cell} seed {seed}"),
            )
        except CellTaken as taken:  # another worker has run or runs this cell
            _discard(taken.run_id, f"{cell} seed {seed} is another worker's")


def _end_stale_cells(stale: list) -> None:
    """Ends KILLED the grid's RUNNING cells whose heartbeat is stale (their worker died: a
    SIGKILL, a lost machine), saying so."""
    for run in stale:
        end_run(
            run.info.run_id,
            "KILLED",
            {
                END_REASON_TAG: "stale: its worker's heartbeat stopped (killed, or its machine "
                f"lost); ended by grid worker {os.getpid()}, which runs the cell again"
            },
        )
        print(
            f"{run.data.tags.get('cell')} seed {run.data.tags.get('seed')}: its worker died "
            f"(run {run.info.run_id} ended KILLED); running it here",
            flush=True,
        )


def _wait_interval(live: list) -> float:
    """A tenth of the shortest heartbeat interval among the live cells, 1 to 10 s."""
    from lossgeo.run.tracking import HEARTBEAT_INTERVAL_TAG, heartbeat_interval

    intervals = [
        float(r.data.tags.get(HEARTBEAT_INTERVAL_TAG) or heartbeat_interval()) for r in live
    ]
    return min(10.0, max(1.0, min(intervals) / 10))


class CellTaken(Exception):
    """A (cell, seed) is finished or being run by another worker: our new run withdraws."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id


# Runs created within this many seconds of each other may not yet see each other in the
# store; a claim looks again after it, and the earliest run (then the lowest id) wins.
CLAIM_SETTLE = 0.3


def _first_claim(experiment: str, query: str, mine: str | None) -> str | None:
    """The run that holds a claim: a FINISHED one if any, else the earliest live RUNNING
    one, among the runs matching `query` (ours, `mine`, among them after a settling pause;
    None: no claim yet, when we have none)."""
    if mine is not None:
        time.sleep(CLAIM_SETTLE)
    rivals = find_runs(experiment, query)
    finished = [r for r in rivals if r.info.status == "FINISHED"]
    if finished:
        return finished[0].info.run_id
    live = [r for r in rivals if r.info.run_id == mine or _is_live(r)]
    return min(live, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id if live else None


def _cell_query(parent: str, cell: str, seed: int) -> str:
    return f"tags.`{PARENT_TAG}` = '{parent}' and tags.cell = '{cell}' and tags.seed = '{seed}'"


def _holder(experiment: str, parent: str, cell: str, seed: int) -> str | None:
    """The run that has finished or is running (cell, seed), if any."""
    return _first_claim(experiment, _cell_query(parent, cell, seed), None)


def _claim(experiment: str, parent: str, cell: str, seed: int, mine: str) -> None:
    """Raises CellTaken unless our new run `mine` holds (cell, seed)."""
    if _first_claim(experiment, _cell_query(parent, cell, seed), mine) != mine:
        raise CellTaken(mine)


def _is_live(run) -> bool:
    """RUNNING with a fresh heartbeat, or too new to have one yet."""
    from lossgeo.run.tracking import HEARTBEAT_INTERVAL_TAG, HEARTBEAT_TAG, heartbeat_interval

    if run.info.status != "RUNNING":
        return False
    now_ms = time.time() * 1000
    beat = run.data.tags.get(HEARTBEAT_TAG)
    interval = float(run.data.tags.get(HEARTBEAT_INTERVAL_TAG) or heartbeat_interval())
    last = int(beat) if beat else run.info.start_time
    # three missed beats, and never under min(60 s, ten intervals): a clock skew between
    # machines sharing a store must not end a live cell (90 s at the default 30 s interval)
    return now_ms - last < 1000 * max(3 * interval, min(60.0, 10 * interval))


def _running_cells(experiment: str, parent: str) -> tuple[list, list]:
    """(live, stale): the grid's RUNNING cells, by whether their heartbeat is fresh."""
    running = [
        r
        for r in find_runs(
            experiment, f"tags.`{PARENT_TAG}` = '{parent}' and attributes.status = 'RUNNING'"
        )
        if r.data.tags.get("lossgeo_role") == "cell"
    ]
    return [r for r in running if _is_live(r)], [r for r in running if not _is_live(r)]


def _live_cells(experiment: str, parent: str) -> list:
    return _running_cells(experiment, parent)[0]


def _withdraw(mine: str, winner: str, study: str) -> None:
    """Our new parent lost to `winner`: deleted, or, if it is the `mlflow run` launcher's
    own run (which MLflow ends itself), turned into a worker under the winner."""
    if mine == launcher_run_id():
        TrackedRun(run_id=mine).set_tags({"lossgeo_role": "worker", PARENT_TAG: winner})
        return
    _discard(mine, f"another worker made study {study}'s parent {winner} at the same moment")


def _discard(run_id: str, why: str) -> None:
    """A run that lost a claim before it started: ended, said why, and deleted."""
    end_run(run_id, "KILLED", {END_REASON_TAG: why})
    delete_run(run_id)


def _cell_key(run) -> tuple[str | None, str | None, int]:
    """(model, regime, seed) of a grid's child run, from its tags."""
    tags = run.data.tags
    return tags.get("model"), tags.get("regime"), int(tags.get("seed", -1))


def _check_same_settings(study: str, finished: dict, configs: dict) -> None:
    """Resuming must not mix settings in one study: a finished (cell, seed) whose logged
    training parameters differ from what the study file says now is refused, before
    anything runs. `finished`: (model, regime, seed) -> run."""
    import dataclasses

    from lossgeo.run.experiment import config_from_params

    for key in sorted(k for k in finished if k in configs):  # the message names the first
        logged, wanted = config_from_params(finished[key].data.params), configs[key]
        for f in dataclasses.fields(wanted):
            if f.name in ("data_dir", "experiment"):
                continue  # where the data and runs live, not how a run trains
            if getattr(logged, f.name) != getattr(wanted, f.name):
                raise UserInputError(
                    f"study: {study} already has a finished run of {key[0]}/{key[1]} seed "
                    f"{key[2]} with {f.name}={getattr(logged, f.name)!r}; the file now says "
                    f"{getattr(wanted, f.name)!r}. Give the study a new name (or use a fresh "
                    "store), so that one study never mixes settings"
                )
