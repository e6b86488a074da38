"""Per-epoch sharpness at the defaults (probe 1024, MLP and CNN after one epoch of SGD on
full MNIST): each of the three measures timed separately, with its loss(+gradient)
evaluations, and the whole set as a fraction of one training epoch at the default batch size.

Run: python benchmarks/bench_sharpness.py [label]   (prints one Markdown row per model; the
label names the checkout, so two checkouts can be run alternately and compared)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_curvature import epoch_seconds  # noqa: E402
from common import mnist, timed, trained  # noqa: E402

from lossgeo.config import TrainConfig  # noqa: E402
from lossgeo.geometry.sharpness import adaptive_sharpness, eps_sharpness, random_direction_sharpness  # noqa: E402
from lossgeo.losses import cross_entropy  # noqa: E402


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "lossgeo"
    data = mnist(probe_size=1024)
    print(
        "| checkout | model | random directions s (evals) | eps-sharpness s (evals) | "
        "adaptive s (evals) | all s | training epoch s | sharpness / epoch |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in ("mlp", "cnn"):
        config = TrainConfig(model=name)
        model = trained(name, data, epochs=1)
        probe = (data.probe.x, data.probe.y)
        rnd, t_rnd = timed(
            lambda: random_direction_sharpness(
                model,
                cross_entropy,
                probe,
                n_directions=config.sharpness_directions,
                radius=config.sharpness_radius,
            ),
            repeat=2,
        )
        eps, t_eps = timed(
            lambda: eps_sharpness(model, cross_entropy, probe, eps=config.sharpness_eps), repeat=2
        )
        ada, t_ada = timed(
            lambda: adaptive_sharpness(model, cross_entropy, probe, radius=config.adaptive_radius),
            repeat=2,
        )
        total = t_rnd + t_eps + t_ada
        epoch = epoch_seconds(name, data)
        print(
            f"| {label} | {name} | {t_rnd:.2f} ({rnd.n_evaluations}) | {t_eps:.2f} "
            f"({eps.n_evaluations}) | {t_ada:.2f} ({ada.n_evaluations}) | {total:.2f} | "
            f"{epoch:.1f} | {total / epoch:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    print(f"<!-- {time.strftime('%Y-%m-%d %H:%M')} -->")
    main()
