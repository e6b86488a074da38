"""Studies (kept as the import path of earlier versions): the code lives in
`storage` (Optuna storage, locks), `sweep` (Optuna sweeps), `grid` (grid studies) and
`summary` (what a study logs on its parent run)."""

from lossgeo.studies.grid import (  # noqa: F401
    CLAIM_SETTLE,
    CellTaken,
    _cell_key,
    _cell_query,
    _check_same_settings,
    _claim,
    _discard,
    _first_claim,
    _holder,
    _is_live,
    _live_cells,
    _withdraw,
    run_grid,
)
from lossgeo.studies.storage import (  # noqa: F401
    DEFAULT_STORAGE,
    BudgetLock,
    FailRunAndRetry,
    _heartbeat,
    make_storage,
    sqlite_file,
)
from lossgeo.studies.summary import (  # noqa: F401
    summarise,
)
from lossgeo.studies.sweep import (  # noqa: F401
    CLAIMED,
    FINISHED,
    PARENT_ATTR,
    PrunedTrial,
    _close_parent,
    _enqueue_grid,
    _launcher_as_worker,
    _sampler,
    _suggest,
    _worker_loop,
    grid_points,
    make_objective,
    parent_run_for,
    run_sweep,
)
