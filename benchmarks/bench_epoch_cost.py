"""What one measured epoch costs at the defaults, part by part, in full-MNIST training epochs.

The default full set is what `lossgeo train` runs at a measured epoch that is not the last:
curvature (lambda_1..5 and lambda_min, Hutchinson trace, GGN and Fisher lambda_max,
layer-wise lambda_max), the gradient noise scale and sharpness (random directions,
eps-sharpness, adaptive), built by `build_measurements` from the default `TrainConfig`, on
the default probe set (1,024 training images). Models: the default MLP and CNN after one
epoch of SGD on full MNIST. One training epoch: full MNIST (55,000 images) at batch 32.
Measurement sets and training epochs alternate; the headline is the median over rounds of
set / epoch, each pair measured back to back (the machine's speed drifts by up to 2x).

Run: python benchmarks/bench_epoch_cost.py   (writes benchmarks/results/epoch_cost.md)
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_curvature import epoch_seconds  # noqa: E402
from common import RESULTS, machine, mnist, trained, write  # noqa: E402

import lossgeo.curvature.measure as curvature_measure  # noqa: E402
import lossgeo.geometry.landscape_measure as landscape_measure  # noqa: E402
from lossgeo.config import TrainConfig  # noqa: E402
from lossgeo.losses import cross_entropy  # noqa: E402
from lossgeo.run.measurements import build_measurements, curvature_settings  # noqa: E402
from lossgeo.run.protocols import EpochState  # noqa: E402
from lossgeo.run.tracker import SGDStep, StepSettings, Tracker  # noqa: E402

ROUNDS = 3
KEPT = "\n## The default run, side by side"
# the solver and sharpness calls inside the measurements, timed where they are looked up
PARTS = {
    curvature_measure: {
        "lanczos_extremes": "curvature: top-5 and lambda_min (Lanczos)",
        "hutchinson": "curvature: trace (Hutchinson, 14 vectors, Krylov-deflated)",
        "lanczos_top": "curvature: GGN, layer-wise (and, off Linear chains, "
        "Fisher) lambda_max (Lanczos)",
        "fisher_gram": "curvature: Fisher Gram matrix (Linear chains)",
    },
    landscape_measure: {
        "random_direction_sharpness": "sharpness: random directions (K = 10)",
        "eps_sharpness": "sharpness: eps-sharpness (L-BFGS-B)",
        "adaptive_sharpness": "sharpness: adaptive",
    },
}


def instrument(seconds: dict[str, float]) -> None:
    for module, names in PARTS.items():
        for attr, label in names.items():
            real = getattr(module, attr)

            def timed_call(*args, _real=real, _label=label, **kwargs):
                start = time.perf_counter()
                try:
                    return _real(*args, **kwargs)
                finally:
                    seconds[_label] += time.perf_counter() - start

            setattr(module, attr, timed_call)


class _NoLogger:
    def log_metrics(self, metrics, step=0):
        pass

    def set_tags(self, tags):
        pass


def measure_once(name: str, model, data, seconds: dict[str, float]) -> dict[str, float]:
    """The default epoch set as lossgeo's loop runs it: the Tracker's curvature, then the
    measurements `build_measurements` gives."""
    config = TrainConfig(model=name)
    state = EpochState(
        epoch=1,
        is_last=False,
        model=model,
        loss_fn=cross_entropy,
        data=data,
        trajectory=[],
        metrics={},
    )
    tracker = Tracker(
        model,
        cross_entropy,
        (data.probe.x, data.probe.y),
        optimizer=SGDStep(config.lr, momentum=config.momentum),
        steps=StepSettings(every=0),
        curvature=curvature_settings(config),
        logger=_NoLogger(),
    )
    metrics, _ = tracker.measure_epoch(state)
    for part, spent in tracker.epoch_seconds.items():
        seconds[f"total: {part}"] += spent
    for measurement in build_measurements(config):  # as the loop runs them, after the Tracker
        started = time.perf_counter()
        metrics.update(measurement(state).metrics)
        seconds[f"total: {measurement.name}"] += time.perf_counter() - started
    return metrics


def main() -> None:
    data = mnist(probe_size=TrainConfig().probe_size)
    lines = [
        f"# Cost of one measured epoch ({time.strftime('%Y-%m-%d')}; {machine()})",
        "",
        "`python benchmarks/bench_epoch_cost.py`: the default full set at a measured "
        "epoch (not the last), part by part, in seconds and in full-MNIST training "
        f"epochs at batch 32; {ROUNDS} rounds, each the set then a training epoch.",
        "",
    ]
    calls: dict[str, float] = defaultdict(float)
    instrument(calls)
    for name in ("mlp", "cnn"):
        model = trained(name, data, epochs=1)
        best: dict[str, float] = {}
        epochs: list[float] = []
        ratios: list[float] = []
        metrics: dict[str, float] = {}
        for _ in range(ROUNDS):
            calls.clear()
            metrics = measure_once(name, model, data, calls)
            for part, s in calls.items():
                best[part] = min(best.get(part, float("inf")), s)
            epochs.append(epoch_seconds(name, data))
            # the set and the epoch right after it: their ratio is robust to the machine's
            # drift, which moves both (training epochs of 1.8-3.4 s were seen in one hour)
            ratios.append(
                sum(s for part, s in calls.items() if part.startswith("total:")) / epochs[-1]
            )
        epoch_best = min(epochs)
        total = sum(s for part, s in best.items() if part.startswith("total:"))
        lines += [
            f"## {name}: the full set {total:.2f} s (best of {ROUNDS}); a training epoch "
            f"{min(epochs):.2f}-{max(epochs):.2f} s; set / epoch per round "
            f"{', '.join(f'{r:.2f}' for r in ratios)}: median "
            f"**{statistics.median(ratios):.2f} training epochs**",
            "",
            "| part | seconds (best) | training epochs (of the fastest epoch) |",
            "|---|---|---|",
        ]
        for part in sorted(best):
            lines.append(f"| {part} | {best[part]:.2f} | {best[part] / epoch_best:.2f} |")
        parts = sum(s for part, s in best.items() if part.startswith("curvature:"))
        lines.append(
            f"| curvature: the rest (graphs, Ritz vectors, bookkeeping) | "
            f"{best['total: curvature'] - parts:.2f} | "
            f"{(best['total: curvature'] - parts) / epoch_best:.2f} |"
        )
        lines += [
            "",
            f"Hessian-vector products (curvature): {metrics['curvature_n_hvp']:.0f}; "
            f"lambda_max {metrics['lambda_max']:.3f}, trace {metrics['hessian_trace']:.1f}"
            f" +- {metrics['hessian_trace_se']:.1f}, eps-sharpness "
            f"{metrics['eps_sharpness']:.3f}, B_simple {metrics['grad_noise_scale']:.1f}",
            "",
        ]
    # the hand-run sections below the generated part (the default run, side by side) stay
    previous = RESULTS / "epoch_cost.md"
    kept = ""
    if previous.exists() and KEPT in previous.read_text():
        kept = previous.read_text()[previous.read_text().index(KEPT) :]
    write("epoch_cost.md", "\n".join(lines) + "\n" + kept)


if __name__ == "__main__":
    main()
