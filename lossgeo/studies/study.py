"""Noise-temperature studies: a grid of named regimes, or an Optuna sweep over learning rate
and batch size. Each cell/trial is one training run, an MLflow child run of one parent run.

Workers on many machines share one study through an RDB storage (PostgreSQL): they join
with ``load_if_exists``, share a global trial budget (``MaxTrialsCallback``), and heartbeats
mark a killed worker's trial failed so that ``RetryFailedTrialCallback`` runs it again.
The parent run's id lives in the study's user attributes, so every worker's trials hang
under the same parent.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from lossgeo.analysis import plots
from lossgeo.analysis import runs as analysis
from lossgeo.analysis.statistics import cell_summary, study_verdicts
from lossgeo.errors import UserInputError
from lossgeo.run.experiment import prepare, run_training
from lossgeo.run.periodic import Periodic
from lossgeo.run.tracking import (
    END_REASON_TAG,
    PARENT_TAG,
    TrackedRun,
    create_run,
    delete_run,
    end_run,
    find_runs,
    launcher_run_id,
    reopen_run,
    resolve_experiment,
    run_experiment_name,
    start_heartbeat,
)
from lossgeo.studies.studyfile import StudySpec

DEFAULT_STORAGE = "sqlite:///studies/optuna.db"
PARENT_ATTR = "mlflow_parent_run_id"


class PrunedTrial(optuna.TrialPruned):
    """Pruned by Optuna: the trial's MLflow run ends KILLED (see TrackedRun)."""

    mlflow_status = "KILLED"


# -- storage and parent run ---------------------------------------------------------------

class FailRunAndRetry:
    """Called by Optuna for a trial whose worker stopped sending heartbeats: its MLflow run
    is ended FAILED (it would otherwise stay RUNNING forever) and the trial is retried."""

    def __init__(self, max_retry: int = 3) -> None:
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            try:
                end_run(run_id, "FAILED", {"failure": "worker lost: no heartbeat"})
            except Exception:  # the retry matters more than the bookkeeping
                pass
        self.retry(study, trial)


def sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite:/// URL, its folder created; None for other URLs."""
    if not url.startswith("sqlite:///"):
        return None
    path = Path(url[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def make_storage(url: str | None = None, *, heartbeat_interval: int = 10,
                 grace_period: int = 30) -> optuna.storages.RDBStorage:
    url = url or DEFAULT_STORAGE
    # heartbeats and the retry callback are marked experimental by Optuna
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sqlite_file(url)
    try:
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
            heartbeat_stale_trial_callback=FailRunAndRetry(max_retry=3),
            engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
    except Exception as exc:  # bad URL, unreachable server, missing driver
        raise UserInputError(f"storage: cannot open {url} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def parent_run_for(study: optuna.Study, spec: StudySpec, experiment: str) -> str:
    """The study's one parent run: found via the study's user attributes, else by tag in
    MLflow, else created. Concurrent workers that both create one agree on the oldest and
    delete their own."""
    known = study.user_attrs.get(PARENT_ATTR)
    if known:
        return known
    query = (f"tags.lossgeo_study = '{study.study_name}' and tags.lossgeo_role = 'parent'")

    def candidates():
        return sorted(find_runs(experiment, query, max_results=100),
                      key=lambda r: (r.info.start_time, r.info.run_id))

    found = candidates()
    if not found:
        mine = create_run(experiment, f"{spec.kind}-{study.study_name}",
                          {"lossgeo_study": study.study_name, "lossgeo_role": "parent",
                           "study_kind": spec.kind})
        time.sleep(0.5)  # let a worker racing us land its own, then all pick the oldest
        found = candidates()
        if found[0].info.run_id != mine:
            delete_run(mine)
    chosen = found[0].info.run_id
    study.set_user_attr(PARENT_ATTR, chosen)
    return chosen


# -- sweep --------------------------------------------------------------------------------

def _sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=None)
    if spec.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=spec.seed, scramble=True)
    if spec.sampler == "grid":
        # The grid's points are enqueued once (see _enqueue_grid); TPE's start-up is random
        # and only fills in if the budget is larger than the grid.
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if len(spec.objectives) > 1:
        return optuna.samplers.NSGAIISampler()
    return optuna.samplers.TPESampler(n_startup_trials=5)


def _suggest(trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for p in spec.search_space:
        if p.choices is not None:
            values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
            continue
        assert p.low is not None and p.high is not None  # a range when there are no choices
        if p.name == "batch_size":
            values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
        else:
            values[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
    if len(spec.models) > 1:
        values["model"] = trial.suggest_categorical("model", list(spec.models))
    else:
        values["model"] = spec.models[0]
    return values


def make_objective(spec: StudySpec, parent_run_id: str, experiment: str,
                   stop: threading.Event | None = None):
    """`stop` set (the worker was interrupted): a trial in another thread ends at its next
    epoch, KILLED, instead of running to its end."""
    def objective(trial: optuna.Trial):
        values = _suggest(trial, spec)
        config = spec.config(**values, experiment=experiment)
        prepared = prepare(config)
        trial.set_user_attr("noise_temperature", config.noise_temperature)

        def report(epoch: int, metrics: dict[str, float]) -> None:
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt("interrupted: the worker was asked to stop")
            if spec.pruner == "none" or epoch == 0:
                return
            trial.report(metrics["val_loss"], epoch)
            if trial.should_prune():
                raise PrunedTrial(f"pruned at epoch {epoch} (val_loss {metrics['val_loss']:.4g})")

        outcome = run_training(
            config, parent_run_id=parent_run_id, prepared=prepared, on_epoch_end=report,
            tags={"lossgeo_study": trial.study.study_name, "trial_number": str(trial.number),
                  "lossgeo_role": "trial"},
            on_run_created=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id),
            label=f"trial {trial.number}")
        final = outcome.history.iloc[-1].to_dict()
        for key in ("lambda_max", "gen_gap", "sharp_max", "test_acc"):
            if key in final and math.isfinite(final[key]):
                trial.set_user_attr(key, float(final[key]))
        if outcome.diverged_epoch is not None:
            # Recorded, never fatal: the worst value for each objective, with the reason.
            trial.set_user_attr("state", "diverged")
            trial.set_user_attr("reason", f"non-finite training loss at epoch "
                                          f"{outcome.diverged_epoch}")
            worst = [math.inf if d == "minimize" else -math.inf for d in spec.directions]
            return worst[0] if len(worst) == 1 else tuple(worst)
        trial.set_user_attr("state", "finished")
        scores = [float(final[o]) for o in spec.objectives]
        return scores[0] if len(scores) == 1 else tuple(scores)
    return objective


class BudgetLock:
    """Serialises "count the claimed trials, then ask for one" across workers, so that
    concurrent workers never overshoot the global budget (Optuna's MaxTrialsCallback checks
    only after a trial ends, and two workers then both start the last one: measured 7 of 6).
    PostgreSQL: a session advisory lock; SQLite: a file lock beside the database; other
    databases: a process-local lock only."""

    _local = threading.Lock()

    def __init__(self, url: str, study_name: str) -> None:
        import zlib

        self.url, self.key = url, zlib.crc32(study_name.encode()) & 0x7FFFFFFF
        self._engine = None
        if url.startswith("postgresql"):
            import sqlalchemy

            self._engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)

    def __enter__(self) -> "BudgetLock":
        self._local.acquire()
        try:
            if self._engine is not None:
                import sqlalchemy

                self._conn = self._engine.connect()
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"),
                                   {"k": self.key})
            elif self.url.startswith("sqlite:///"):
                import fcntl

                self._file = open(f"{sqlite_file(self.url)}.lock", "a")
                fcntl.flock(self._file, fcntl.LOCK_EX)
        except BaseException:
            # e.g. an unreachable server: __exit__ will not run, and a held process-wide lock
            # would hang the next sweep in this process forever
            self._local.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._engine is not None:
                import sqlalchemy

                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"),
                                   {"k": self.key})
                self._conn.close()
            elif self.url.startswith("sqlite:///"):
                import fcntl

                fcntl.flock(self._file, fcntl.LOCK_UN)
                self._file.close()
        finally:
            self._local.release()


CLAIMED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
           optuna.trial.TrialState.RUNNING)
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _heartbeat(storage: optuna.storages.RDBStorage, trial_id: int, interval: int) -> Periodic:
    """Records the trial's heartbeat now and every `interval` s until `stop()`."""
    storage.record_heartbeat(trial_id)
    return Periodic(lambda: storage.record_heartbeat(trial_id), interval,
                    name=f"trial-heartbeat-{trial_id}")


def grid_points(spec: StudySpec) -> list[dict[str, Any]]:
    import itertools

    names = [p.name for p in spec.search_space]
    return [dict(zip(names, values))
            for values in itertools.product(*(p.choices or () for p in spec.search_space))]


def _enqueue_grid(study: optuna.Study, spec: StudySpec, lock: BudgetLock) -> None:
    """Grid sampler: every point that no trial has finished, runs or waits for is enqueued,
    by whichever worker comes first; so a point whose trial an interrupt (or a lost worker)
    failed is run again when the study resumes, and no point is enqueued twice."""
    states = (*CLAIMED, optuna.trial.TrialState.WAITING)
    with lock:
        taken = [t.params or t.system_attrs.get("fixed_params", {})
                 for t in study.get_trials(deepcopy=False, states=states)]
        for point in grid_points(spec):
            if point not in taken:
                study.enqueue_trial(point)
        study.set_user_attr("grid_enqueued", True)


def _worker_loop(study: optuna.Study, storage: optuna.storages.RDBStorage, lock: BudgetLock,
                 budget: int, objective, interval: int, stop: threading.Event,
                 ran: list[int], grid: bool = False) -> None:
    """Claims and runs trials until the budget is claimed or `stop` is set; appends the
    number of each trial it ran to `ran`. A designed grid (`grid`) runs only its enqueued
    points."""
    while not stop.is_set():
        with warnings.catch_warnings():
            # heartbeats are ours (see _heartbeat), not Study.optimize's
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)  # a lost worker's trial: FAIL, retried
            with lock:
                claimed = len(study.get_trials(deepcopy=False, states=CLAIMED))
                if claimed >= budget:
                    return
                if grid and not study.get_trials(deepcopy=False,
                                                 states=(optuna.trial.TrialState.WAITING,)):
                    return  # every point is done or taken; ask() would repeat one
                trial = study.ask()  # takes a waiting (retried or grid) trial first
        beat = _heartbeat(storage, trial._trial_id, interval)
        ran.append(trial.number)
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except (RuntimeError, ValueError) as exc:  # one broken trial never stops the study
            trial.set_user_attr("reason", f"{type(exc).__name__}: {exc}"[:500])
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        except BaseException as exc:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if isinstance(exc, KeyboardInterrupt) and stop.is_set():
                return  # this thread was stopped by the worker's `stop`; main re-raises
            raise
        else:
            study.tell(trial, value)
        finally:
            beat.stop()


def run_sweep(spec: StudySpec, *, storage: str | None = None, n_trials: int | None = None,
              n_jobs: int = 1, study_name: str | None = None, experiment: str = "",
              heartbeat_interval: int = 10, grace_period: int = 30) -> optuna.Study:
    """Runs (or joins) the study until its global budget of finished trials is reached.

    Each worker (process or thread) claims a trial under `BudgetLock`, sends heartbeats while
    it runs, and first fails the trials of workers that stopped beating (they are retried)."""
    budget = n_trials or spec.n_trials
    url = storage or DEFAULT_STORAGE
    # Workers starting together on an empty database would race on Optuna's table creation.
    try:
        with BudgetLock(url, "lossgeo-storage-init"):
            rdb = make_storage(url, heartbeat_interval=heartbeat_interval,
                               grace_period=grace_period)
            study = optuna.create_study(
                study_name=study_name or spec.name, storage=rdb, load_if_exists=True,
                sampler=_sampler(spec), directions=list(spec.directions),  # type: ignore[arg-type]
                pruner=(optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
                        if spec.pruner == "median" else optuna.pruners.NopPruner()))
    except UserInputError:
        raise
    except Exception as exc:  # unreachable server, bad URL, missing driver
        raise UserInputError(f"storage: cannot open {url} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    lock = BudgetLock(url, study.study_name)
    experiment = resolve_experiment(experiment)
    with lock:  # one worker creates the parent run, the others find it
        parent = parent_run_for(study, spec, experiment)
        reopen_run(parent)  # a later worker reopens a closed study
    if spec.sampler == "grid":
        _enqueue_grid(study, spec, lock)
        budget = min(budget, len(grid_points(spec)))
    stop = threading.Event()
    objective = make_objective(spec, parent, experiment, stop)
    ran: list[int] = []
    args = (study, rdb, lock, budget, objective, heartbeat_interval, stop, ran,
            spec.sampler == "grid")
    beat = start_heartbeat(parent)
    interrupted = True
    try:
        with _launcher_as_worker(parent, study.study_name) as worker:
            # n_jobs - 1 threads, and the main thread as one more worker: signals reach it
            threads = [threading.Thread(target=_worker_loop, args=args, name=f"trials-{i}")
                       for i in range(1, n_jobs)]
            for t in threads:
                t.start()
            try:
                _worker_loop(*args)
            except BaseException:
                stop.set()  # interrupted: the threads end their trials at the next epoch
                raise
            finally:
                for t in threads:
                    t.join()
                if worker is not None:
                    worker.log_metrics({"worker_trials": float(len(ran))})
        interrupted = False
    finally:
        beat.stop()
        with lock:
            _close_parent(study, parent, budget, interrupted)
    summarise(parent, study=study)
    return study


def _close_parent(study: optuna.Study, parent: str, budget: int, interrupted: bool) -> None:
    """The parent says the truth: RUNNING while any worker has a trial running; FINISHED
    once the budget is done; KILLED when the last worker was interrupted before that."""
    if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        return  # another worker is at work; the last one closes the parent
    if len(study.get_trials(deepcopy=False, states=CLAIMED)) >= budget:
        end_run(parent, "FINISHED")
    elif interrupted:
        end_run(parent, "KILLED", {END_REASON_TAG: "interrupted before the budget was done; "
                                                   "a new worker resumes the study"})


@contextlib.contextmanager
def _launcher_as_worker(parent: str, study_name: str):
    """Under `mlflow run`, the launcher's own run becomes this worker's run, nested under the
    study's parent (tag lossgeo_role=worker) instead of an empty top-level run. Yields the
    TrackedRun, or None outside `mlflow run`."""
    run_id = launcher_run_id()
    if not run_id:
        yield None
        return
    name = run_experiment_name(parent)
    if run_experiment_name(run_id) != name:
        raise UserInputError(f"experiment: study {study_name!r} lives in experiment {name!r}; "
                             f"join it with `mlflow run --experiment-name {name}`")
    with TrackedRun(run_id=run_id, tags={
            PARENT_TAG: parent, "lossgeo_role": "worker", "lossgeo_study": study_name,
            "mlflow.runName": f"worker-{socket.gethostname()}-{os.getpid()}"}) as worker:
        yield worker


# -- grid ---------------------------------------------------------------------------------

def run_grid(spec: StudySpec, *, experiment: str = "") -> str:
    """Every model x regime x seed as a child run of one parent run; then the summary.

    Re-running the same study resumes it: the parent is found by the study's name, and every
    (cell, seed) that already has a FINISHED run is skipped, never run twice. Workers started
    on the same study at once share it: each (cell, seed) is claimed through the store before
    it runs (`_claim`), so none runs twice, and the parent stays RUNNING until the last
    worker's cell has ended. A new grid's parent is the launcher's run under `mlflow run`; a
    joining or resumed worker's launcher run is nested under it."""
    experiment = resolve_experiment(experiment)
    configs = {(model, regime, seed): spec.config(model=model, experiment=experiment,
                                                  seed=seed, **values)
               for model in spec.models for regime, values in spec.regimes.items()
               for seed in spec.seeds}
    for config in configs.values():
        # validate every cell before anything runs; the data are not kept, since a grid of
        # cells x seeds would hold one copy per cell (each cell loads its own when it runs)
        prepare(config)
    tags = {"lossgeo_study": spec.name, "lossgeo_role": "parent", "study_kind": "grid"}
    parent_query = (f"tags.lossgeo_study = '{spec.name}' and tags.lossgeo_role = 'parent' "
                    "and tags.study_kind = 'grid'")
    existing = find_runs(experiment, parent_query, order_by=["attributes.start_time ASC"],
                         max_results=1)
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
        finished = {_cell_key(r): r for r in find_runs(
            experiment, f"tags.`{PARENT_TAG}` = '{parent.run_id}' and "
            "attributes.status = 'FINISHED'")}
        _check_same_settings(spec.name, finished, configs)
        reopen_run(parent.run_id)
        worker = _launcher_as_worker(parent.run_id, spec.name)
    with parent, worker:
        parent.log_params({"study": spec.name, "models": ",".join(spec.models),
                           "regimes": ",".join(spec.regimes),
                           "seeds": ",".join(map(str, spec.seeds))})
        try:
            for (model, regime, seed), config in configs.items():
                cell = f"{model}/{regime}"
                if _holder(experiment, parent.run_id, cell, seed) is not None:
                    continue  # finished, or another worker runs it: not even a new run
                try:
                    run_training(config, parent_run_id=parent.run_id,
                                 tags={"regime": regime, "cell": cell, "seed": str(seed),
                                       "lossgeo_study": spec.name, "lossgeo_role": "cell"},
                                 on_run_created=lambda run_id: _claim(
                                     experiment, parent.run_id, cell, seed, run_id),
                                 label=f"{cell} seed {seed}")
                except CellTaken as taken:  # another worker has run or runs this cell
                    _discard(taken.run_id, f"{cell} seed {seed} is another worker's")
        except BaseException:
            if _live_cells(experiment, parent.run_id):
                parent.keep_running()  # another worker is at work: it ends the parent
            raise
        if _live_cells(experiment, parent.run_id):
            parent.keep_running()
            return parent.run_id
        summarise(parent.run_id)
    return parent.run_id


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
    return min(live, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id \
        if live else None


def _cell_query(parent: str, cell: str, seed: int) -> str:
    return (f"tags.`{PARENT_TAG}` = '{parent}' and tags.cell = '{cell}' and "
            f"tags.seed = '{seed}'")


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
    return now_ms - last < 1000 * max(3 * interval, 60)


def _live_cells(experiment: str, parent: str) -> list:
    return [r for r in find_runs(experiment, f"tags.`{PARENT_TAG}` = '{parent}' and "
                                             "attributes.status = 'RUNNING'")
            if r.data.tags.get("lossgeo_role") == "cell" and _is_live(r)]


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
                    "store), so that one study never mixes settings")


# -- after a study ------------------------------------------------------------------------

def summarise(parent_run_id: str, study: optuna.Study | None = None) -> pd.DataFrame:
    """On the parent run: runs.csv (one row per run), summary.csv (one row per cell: means
    and 95% t-intervals over seeds, see `analysis.cell_summary`), correlations.csv and the
    comparison plots."""

    runs = analysis.load_runs(parent_run=parent_run_id)
    run = TrackedRun(run_id=parent_run_id)
    if runs.empty:
        return runs
    if "noise_temperature" not in runs and {"lr", "batch_size"} <= set(runs):
        runs["noise_temperature"] = runs["lr"] / runs["batch_size"]
    keep = [c for c in ["run_id", "label", "status", "tags.cell", "tags.regime", "tags.seed",
                        "tags.trial_number", "tags.diverged", "tags.reached_target", "model",
                        "lr", "batch_size", "momentum",
                        "noise_temperature", "train_loss", "test_loss", "train_acc", "test_acc",
                        "val_loss", "gen_gap", "gen_gap_acc", "lambda_max", "lambda_min",
                        "hessian_trace", "sharp_mean", "sharp_max", "eps_sharpness",
                        "adaptive_sharpness", "edge_ratio", "grad_noise_scale",
                        "steps_to_target", "epochs_to_target"] if c in runs]
    table = runs[keep]
    run.log_text("runs.csv", table.to_csv(index=False))
    finished = runs[runs["status"] == "FINISHED"]
    if "tags.diverged" in finished:
        finished = finished[finished["tags.diverged"] != "true"]
    if len(finished):
        run.log_text("summary.csv", cell_summary(finished).to_csv(index=False))
    verdicts = study_verdicts(finished)
    run.log_text("correlations.csv", verdicts.to_csv(index=False))
    score = {"held": 1.0, "inconclusive": 0.0, "contradicted": -1.0}
    for _, row in verdicts.iterrows():
        pair = {"H3": "lambda_max_on_lr_and_B", "H4": "edge_ratio"}.get(
            row["hypothesis"], f"{row['x']}_vs_{row['y']}")
        metrics = {f"verdict/{row['hypothesis']}_{pair}": score[row["verdict"]]}
        for column in ("spearman", "spearman_ci_low", "spearman_ci_high", "kendall",
                       "partial_spearman"):
            if pd.notna(row.get(column)):
                metrics[f"{column}/{pair}"] = float(row[column])
        run.log_metrics(metrics)
    history = analysis.load_history(finished) if len(finished) else pd.DataFrame()
    run.log_figures(plots.comparison_figures(finished, history), prefix="plots/")
    if study is not None:
        run.log_figures(plots.optuna_figures(study), prefix="optuna/")
    return table
