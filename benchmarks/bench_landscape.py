"""2D loss slices: lossgeo against the `loss-landscapes` package's random_plane and against
the floor N^2 x (one forward pass over the probe set), same trained model, same probe
samples, same resolution, one process, run alternately (best of two rounds). Also per-epoch
sharpness cost as a fraction of a training epoch at defaults.
Run: python benchmarks/bench_landscape.py [samples] [steps] (writes results/landscape.md)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_curvature import alternating, epoch_seconds  # noqa: E402
from common import machine, mnist, timed, trained, write  # noqa: E402

from lossgeo.config import TrainConfig  # noqa: E402
from lossgeo.geometry.directions import random_direction  # noqa: E402
from lossgeo.geometry.landscape import axis, surface_2d  # noqa: E402
from lossgeo.geometry.landscape_measure import measure_sharpness  # noqa: E402
from lossgeo.losses import cross_entropy  # noqa: E402
from lossgeo.run.measurements import landscape_settings  # noqa: E402


def bench(name: str, data, samples: int, steps: int):
    import loss_landscapes
    import loss_landscapes.metrics

    model = trained(name, data, epochs=1).eval()
    x, y = data.probe.x[:samples], data.probe.y[:samples]
    with torch.no_grad():
        model(x)
        _, forward = timed(lambda: model(x), repeat=3)
    floor = steps * steps * forward
    metric = loss_landscapes.metrics.Loss(cross_entropy, x, y)
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    grid = axis(steps, 1.0)
    # alternately, best of two rounds each: this machine's speed drifts within seconds
    timings = alternating(
        {
            "theirs": lambda: loss_landscapes.random_plane(
                model, metric, distance=1, steps=steps, normalization="filter", deepcopy_model=True
            ),
            "plain": lambda: surface_2d(
                model, cross_entropy, (x, y), (d1, d2), (grid, grid), factorize=False
            ),
            "ours": lambda: surface_2d(model, cross_entropy, (x, y), (d1, d2), (grid, grid)),
        },
        rounds=2,
    )
    t_theirs, t_plain, t_ours = (timings[k][1] for k in ("theirs", "plain", "ours"))
    row = (
        f"| {name} | {samples} | {steps}x{steps} | {t_theirs:.2f} | {t_plain:.2f} | "
        f"{t_ours:.2f} | {floor:.2f} | {t_theirs / t_ours:.1f}x | {floor / t_ours:.1f}x |"
    )
    config = TrainConfig(model=name)
    settings = landscape_settings(config)
    probe = (data.probe.x[: config.probe_size], data.probe.y[: config.probe_size])
    _, sharp_s = timed(lambda: measure_sharpness(model, cross_entropy, probe, settings))
    ep = epoch_seconds(name, data)
    frac = (
        f"- {name}: per-epoch sharpness at defaults (K={settings.sharpness_directions} "
        f"random directions, eps-sharpness, adaptive sharpness; {config.probe_size} probe "
        f"samples) {sharp_s:.1f} s vs one training epoch on full MNIST at batch "
        f"{config.batch_size} {ep:.1f} s: **{sharp_s / ep:.2f} epochs**"
    )
    return row, frac


def main() -> None:
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 11
    data = mnist(probe_size=2048)
    rows = [
        "| model | samples | grid | loss-landscapes random_plane s "
        "| lossgeo, no factorisation s "
        "| lossgeo s | floor N^2 x forward s | ratio vs random_plane | ratio vs floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fracs = []
    for name in ("mlp", "cnn"):
        row, frac = bench(name, data, samples, steps)
        rows.append(row)
        fracs.append(frac)
        print(row, flush=True)
    write(
        "landscape.md",
        "\n".join(
            [
                f"# Landscape benchmark ({time.strftime('%Y-%m-%d')}; {machine()})",
                "",
                "Same trained model (1 epoch SGD), same probe samples, same grid; ratios > 1 mean "
                "lossgeo is faster.",
                "",
                *rows,
                "",
                "Per-epoch sharpness cost:",
                *fracs,
                "",
            ]
        ),
    )


if __name__ == "__main__":
    main()
