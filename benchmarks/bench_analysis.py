"""load_history on 100 runs x 20 metrics x 11 epochs in a fresh SQLite store: concurrent
fetching (lossgeo) against one get_metric_history round trip after another, same process.
Run: python benchmarks/bench_analysis.py  (writes results/analysis.md)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write  # noqa: E402

RUNS, METRICS, EPOCHS = 100, 20, 11


def main() -> None:
    tmp = tempfile.mkdtemp()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    from lossgeo.analysis import runs as analysis
    from lossgeo.run import tracking

    for r in range(RUNS):
        with tracking.TrackedRun(experiment="bench", run_name=f"r{r}") as run:
            run.log_params({"model": "mlp", "lr": 0.1, "batch_size": 64})
            for epoch in range(EPOCHS):
                run.log_epoch(epoch, {f"m{k}": float(epoch * k + r) for k in range(METRICS)})
    runs = analysis.load_runs(experiment="bench")
    start = time.perf_counter()
    frame = analysis.load_history(runs)
    ours = time.perf_counter() - start
    client = tracking.client()
    start = time.perf_counter()
    rows = 0
    for run_id in runs["run_id"]:
        for key in client.get_run(run_id).data.metrics:
            rows += len(client.get_metric_history(run_id, key))
    serial = time.perf_counter() - start
    assert rows == len(frame) == RUNS * METRICS * EPOCHS
    write(
        "analysis.md",
        "\n".join(
            [
                f"# load_history benchmark ({time.strftime('%Y-%m-%d')}; {machine()})",
                "",
                f"{RUNS} runs x {METRICS} metrics x {EPOCHS} epochs ({rows} values), "
                "local SQLite store.",
                "",
                "| method | seconds |",
                "|---|---|",
                f"| lossgeo load_history (8 threads) | {ours:.2f} |",
                f"| one get_metric_history after another | {serial:.2f} |",
                "",
            ]
        ),
    )


if __name__ == "__main__":
    main()
