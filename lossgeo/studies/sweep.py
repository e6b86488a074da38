"""Optuna sweeps over learning rate and batch size: each trial is one training run, an
MLflow child run of the study's parent run.

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
from typing import Any

import optuna

from lossgeo.errors import UserInputError
from lossgeo.run.experiment import prepare, run_training
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
from lossgeo.run.train import LoopContext
from lossgeo.studies.storage import DEFAULT_STORAGE, BudgetLock, _heartbeat, make_storage
from lossgeo.studies.studyfile import StudySpec
from lossgeo.studies.summary import summarise

PARENT_ATTR = "mlflow_parent_run_id"


class PrunedTrial(optuna.TrialPruned):
    """Pruned by Optuna: the trial's MLflow run ends KILLED (see TrackedRun)."""

    mlflow_status = "KILLED"


def parent_run_for(study: optuna.Study, spec: StudySpec, experiment: str) -> str:
    """The study's one parent run: found via the study's user attributes, else by tag in
    MLflow, else created. Concurrent workers that both create one agree on the oldest and
    delete their own."""
    known = study.user_attrs.get(PARENT_ATTR)
    if known:
        return known
    query = f"tags.lossgeo_study = '{study.study_name}' and tags.lossgeo_role = 'parent'"

    def candidates():
        return sorted(
            find_runs(experiment, query, max_results=100),
            key=lambda r: (r.info.start_time, r.info.run_id),
        )

    found = candidates()
    if not found:
        mine = create_run(
            experiment,
            f"{spec.kind}-{study.study_name}",
            {"lossgeo_study": study.study_name, "lossgeo_role": "parent", "study_kind": spec.kind},
        )
        time.sleep(0.5)  # let a worker racing us land its own, then all pick the oldest
        found = candidates()
        if found[0].info.run_id != mine:
            delete_run(mine)
    chosen = found[0].info.run_id
    study.set_user_attr(PARENT_ATTR, chosen)
    return chosen


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


def make_objective(
    spec: StudySpec, parent_run_id: str, experiment: str, stop: threading.Event | None = None
):
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
            config,
            parent_run_id=parent_run_id,
            prepared=prepared,
            tags={
                "lossgeo_study": trial.study.study_name,
                "trial_number": str(trial.number),
                "lossgeo_role": "trial",
            },
            on_run_created=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id),
            context=LoopContext(label=f"trial {trial.number}", on_epoch_end=report),
        )
        final = outcome.history.iloc[-1].to_dict()
        for key in ("lambda_max", "gen_gap", "sharp_max", "test_acc"):
            if key in final and math.isfinite(final[key]):
                trial.set_user_attr(key, float(final[key]))
        if outcome.diverged_epoch is not None:
            # Recorded, never fatal: the worst value for each objective, with the reason.
            trial.set_user_attr("state", "diverged")
            trial.set_user_attr(
                "reason", f"non-finite training loss at epoch {outcome.diverged_epoch}"
            )
            worst = [math.inf if d == "minimize" else -math.inf for d in spec.directions]
            return worst[0] if len(worst) == 1 else tuple(worst)
        trial.set_user_attr("state", "finished")
        scores = [float(final[o]) for o in spec.objectives]
        return scores[0] if len(scores) == 1 else tuple(scores)

    return objective


CLAIMED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.RUNNING,
)


FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def grid_points(spec: StudySpec) -> list[dict[str, Any]]:
    import itertools

    names = [p.name for p in spec.search_space]
    return [
        dict(zip(names, values))
        for values in itertools.product(*(p.choices or () for p in spec.search_space))
    ]


def _enqueue_grid(study: optuna.Study, spec: StudySpec, lock: BudgetLock) -> None:
    """Grid sampler: every point that no trial has finished, runs or waits for is enqueued,
    by whichever worker comes first; so a point whose trial an interrupt (or a lost worker)
    failed is run again when the study resumes, and no point is enqueued twice."""
    states = (*CLAIMED, optuna.trial.TrialState.WAITING)
    with lock:
        taken = [
            t.params or t.system_attrs.get("fixed_params", {})
            for t in study.get_trials(deepcopy=False, states=states)
        ]
        for point in grid_points(spec):
            if point not in taken:
                study.enqueue_trial(point)
        study.set_user_attr("grid_enqueued", True)


def _worker_loop(
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    lock: BudgetLock,
    budget: int,
    objective,
    interval: int,
    stop: threading.Event,
    ran: list[int],
    grid: bool = False,
) -> None:
    """Claims and runs trials until the budget is claimed or `stop` is set; appends the
    number of each trial it ran to `ran`. A designed grid (`grid`) runs only its enqueued
    points."""
    said_waiting = False
    while not stop.is_set():
        with warnings.catch_warnings():
            # heartbeats are ours (see _heartbeat), not Study.optimize's
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)  # a lost worker's trial: FAIL, retried
            with lock:
                claimed = len(study.get_trials(deepcopy=False, states=CLAIMED))
                waiting = study.get_trials(
                    deepcopy=False, states=(optuna.trial.TrialState.WAITING,)
                )
                nothing_to_ask = claimed >= budget or (grid and not waiting)
                if nothing_to_ask:
                    # trials still running elsewhere: wait for them, since a worker that died
                    # leaves its trial RUNNING until its heartbeat goes stale; then it is
                    # failed and retried (above), and run here. Survivors once exited 0
                    # with "5 complete, 1 running" and left it so.
                    running = study.get_trials(
                        deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)
                    )
                    if not running:
                        return
                else:
                    trial = study.ask()  # takes a waiting (retried or grid) trial first
        if nothing_to_ask:
            if not said_waiting and threading.current_thread() is threading.main_thread():
                numbers = ", ".join(str(t.number) for t in running)
                print(
                    f"waiting for {len(running)} trial(s) running elsewhere ({numbers}): a "
                    "trial whose worker died is failed once its heartbeat is stale, then "
                    "rerun here",
                    flush=True,
                )
                said_waiting = True
            stop.wait(max(1, interval))
            continue
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


def run_sweep(
    spec: StudySpec,
    *,
    storage: str | None = None,
    n_trials: int | None = None,
    n_jobs: int = 1,
    study_name: str | None = None,
    experiment: str = "",
    heartbeat_interval: int = 10,
    grace_period: int = 30,
) -> optuna.Study:
    """Runs (or joins) the study until its global budget of finished trials is reached.

    Each worker (process or thread) claims a trial under `BudgetLock`, sends heartbeats while
    it runs, and first fails the trials of workers that stopped beating (they are retried)."""
    budget = n_trials or spec.n_trials
    url = storage or DEFAULT_STORAGE
    # Workers starting together on an empty database would race on Optuna's table creation.
    try:
        with BudgetLock(url, "lossgeo-storage-init"):
            rdb = make_storage(
                url, heartbeat_interval=heartbeat_interval, grace_period=grace_period
            )
            study = optuna.create_study(
                study_name=study_name or spec.name,
                storage=rdb,
                load_if_exists=True,
                sampler=_sampler(spec),
                directions=list(spec.directions),  # type: ignore[arg-type]
                pruner=(
                    optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
                    if spec.pruner == "median"
                    else optuna.pruners.NopPruner()
                ),
            )
    except UserInputError:
        raise
    except Exception as exc:  # unreachable server, bad URL, missing driver
        raise UserInputError(
            f"storage: cannot open {url} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
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
    args = (
        study,
        rdb,
        lock,
        budget,
        objective,
        heartbeat_interval,
        stop,
        ran,
        spec.sampler == "grid",
    )
    beat = start_heartbeat(parent)
    interrupted = True
    try:
        with _launcher_as_worker(parent, study.study_name) as worker:
            # n_jobs - 1 threads, and the main thread as one more worker: signals reach it
            threads = [
                threading.Thread(target=_worker_loop, args=args, name=f"trials-{i}")
                for i in range(1, n_jobs)
            ]
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
        end_run(
            parent,
            "KILLED",
            {
                END_REASON_TAG: "interrupted before the budget was done; "
                "a new worker resumes the study"
            },
        )


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
        raise UserInputError(
            f"experiment: study {study_name!r} lives in experiment {name!r}; "
            f"join it with `mlflow run --experiment-name {name}`"
        )
    with TrackedRun(
        run_id=run_id,
        tags={
            PARENT_TAG: parent,
            "lossgeo_role": "worker",
            "lossgeo_study": study_name,
            "mlflow.runName": f"worker-{socket.gethostname()}-{os.getpid()}",
        },
    ) as worker:
        yield worker
