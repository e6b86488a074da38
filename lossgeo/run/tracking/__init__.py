"""The only package that talks to MLflow (with the detached `lossgeo/run/settle.py`).

Everything goes through an explicit `MlflowClient` and run id rather than the fluent
"active run", which is thread-local: Optuna trials in threads (n_jobs > 1) and worker
processes each create their child runs with an explicit parent id.

- `store`: the tracking URI and opening the store; experiments.
- `launcher`: runs started by `mlflow run` (the launcher's run, process and experiment).
- `heartbeat`: heartbeats of live runs; ending the runs of dead processes.
- `logging`: `TrackedRun` and `ActiveRunLogger`, the loggers lossgeo ships.
- `queries`: reading and managing runs by id.

Everything is re-exported here: `from lossgeo.run.tracking import TrackedRun` as before.
"""

from .heartbeat import (  # noqa: F401
    DEFAULT_STALE_AFTER,
    END_REASON_TAG,
    HEARTBEAT_INTERVAL_TAG,
    HEARTBEAT_TAG,
    Heartbeat,
    _retrying,
    end_stale_runs,
    heartbeat_interval,
    start_heartbeat,
)
from .launcher import (  # noqa: F401
    LauncherWatch,
    default_experiment,
    launcher_pid,
    launcher_run_id,
    mark_launcher_run_rejected,
    resolve_experiment,
    settle_launcher_status,
)
from .logging import (  # noqa: F401
    _MAX_METRICS,
    _MAX_PARAMS,
    ActiveRunLogger,
    TrackedRun,
    _log_bytes,
    _metric_batches,
    _stringify,
    _torch_bytes,
)
from .queries import (  # noqa: F401
    create_run,
    delete_run,
    download_artifact,
    end_run,
    experiment_exists,
    find_or_create_run,
    find_runs,
    finished_child_runs,
    finished_children,
    get_run,
    has_artifact,
    load_artifact_object,
    metric_history,
    reopen_run,
    run_experiment_name,
    run_metric_keys,
    search_runs,
    ui_link,
)
from .store import (  # noqa: F401
    DEFAULT_TRACKING_URI,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    PARENT_TAG,
    _fluent_uri,
    _folder_lock,
    _local_path,
    _open_store,
    _store_state,
    check_artifact_access,
    client,
    experiment_id,
    mark_training_experiment,
    require_store,
    tracking_uri,
)
