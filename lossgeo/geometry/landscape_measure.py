"""Per-epoch sharpness and final-epoch landscapes of a training run (pure; no MLflow).

Units: random directions are filter-normalised, so a coordinate of 1 moves every filter by
its own norm. Eigenvectors are unit vectors: a coordinate is a distance in parameter space
(rescaling them to ||w|| made the 1D eigen slice rise by 10^5 over the grid on the MNIST MLP,
hiding its shape). PCA directions are unit vectors too and the grid is sized to cover the
recorded trajectory, whose coordinates are then true distances in that plane.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from lossgeo.curvature import Scope, hessian_eigen
from lossgeo.curvature.operators import DataSource, LossFn
from lossgeo.geometry.directions import random_direction, trajectory_pca
from lossgeo.geometry.landscape import axis, interpolate, slice_1d, surface_2d
from lossgeo.geometry.pac_bayes import NoiseDraws, pac_bayes_flatness
from lossgeo.geometry.sharpness import adaptive_sharpness, eps_sharpness, random_direction_sharpness


@dataclass(frozen=True)
class LandscapeSettings:
    sharpness: bool = True
    sharpness_directions: int = 10
    sharpness_radius: float = 0.05
    sharpness_eps: float = 1e-3
    adaptive_radius: float = 0.5
    pac_bayes: bool = True
    pac_bayes_increase: float = 0.1
    landscape: bool = True
    resolution: int = 21
    half_range: float = 1.0
    directions: str = "random"
    every_epoch: bool = False
    seed: int = 0


def measure_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataSource,
    s: LandscapeSettings,
    process_group: Any = None,
) -> dict[str, float]:
    """sharp_mean, sharp_max, eps_sharpness and adaptive_sharpness on `data` (this rank's
    shard under a process group)."""
    group = {"process_group": process_group}
    random = random_direction_sharpness(
        model,
        loss_fn,
        data,
        n_directions=s.sharpness_directions,
        radius=s.sharpness_radius,
        seed=s.seed,
        **group,
    )
    return {
        "sharp_mean": random.value,
        "sharp_max": random.max,
        "eps_sharpness": eps_sharpness(model, loss_fn, data, eps=s.sharpness_eps, **group).value,
        "adaptive_sharpness": adaptive_sharpness(
            model, loss_fn, data, radius=s.adaptive_radius, **group
        ).value,
    }


def pac_bayes_measures(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataSource,
    max_increase: float,
    seed: int = 0,
    process_group: Any = None,
) -> dict[str, float]:
    """pac_bayes_flatness and pac_bayes_mag_flatness (1/sigma^2, Jiang et al.'s convention:
    larger is sharper) and their sigmas."""
    group = {"process_group": process_group}
    draws = NoiseDraws(seed=seed)
    plain = pac_bayes_flatness(
        model, loss_fn, data, max_increase=max_increase, draws=draws, **group
    )
    magnitude = pac_bayes_flatness(
        model, loss_fn, data, max_increase=max_increase, magnitude_aware=True, draws=draws, **group
    )
    return {
        "pac_bayes_flatness": plain.flatness,
        "pac_bayes_sigma": plain.sigma,
        "pac_bayes_mag_flatness": magnitude.flatness,
        "pac_bayes_mag_sigma": magnitude.sigma,
    }


def top_eigenvectors(
    model: nn.Module,
    loss_fn: LossFn,
    probe: DataSource,
    cache: dict | None,
    k: int = 2,
    process_group: Any = None,
) -> torch.Tensor:
    top = (cache or {}).get("hessian_top")
    if top is None or top.vectors.shape[0] < k:
        top = hessian_eigen(
            model, loss_fn, probe, k=k, tol=1e-3, scope=Scope(process_group=process_group)
        )
    return top.vectors[:k]


def plane(
    model: nn.Module,
    loss_fn: LossFn,
    probe: DataSource,
    s: LandscapeSettings,
    trajectory: list[torch.Tensor],
    cache: dict | None,
    process_group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """(d1, d2, half_range, description) of the configured 2D plane."""
    if s.directions == "random":
        return (
            random_direction(model, seed=s.seed),
            random_direction(model, seed=s.seed + 1),
            s.half_range,
            f"random Gaussian, filter-normalised, seeds {s.seed}, {s.seed + 1}",
        )
    if s.directions == "eigen":
        v = top_eigenvectors(model, loss_fn, probe, cache, process_group=process_group)
        return (
            v[0],
            v[1],
            s.half_range,
            "top-2 Hessian eigenvectors (probe set; unit vectors, coordinates are distances)",
        )
    pca = trajectory_pca(trajectory)
    extent = float(pca.coordinates.abs().max()) * 1.25 or s.half_range
    d = pca.directions.to(trajectory[0].dtype)
    return (
        d[0],
        d[1],
        extent,
        "trajectory PCA (unit vectors; coordinates are distances), "
        f"explained variance {pca.explained_variance_ratio.tolist()}",
    )


@dataclass(frozen=True)
class LandscapeData:
    """What a landscape measurement reads.

    Attributes:
        probe: the sharpness, PAC-Bayes and plane-finding set.
        slices: the set the 1D/2D slices evaluate the loss on (the probe or the test split).
        trajectory: the flat weights at each epoch so far (PCA plane, interpolation).
    """

    probe: DataSource
    slices: DataSource
    trajectory: Sequence[torch.Tensor] = ()


def measure_landscape(
    model: nn.Module,
    loss_fn: LossFn,
    data: LandscapeData,
    s: LandscapeSettings,
    *,
    epoch: int,
    final: bool,
    cache: dict | None = None,
    process_group: Any = None,
) -> tuple[dict[str, float], dict[str, object]]:
    """Sharpness metrics every call, PAC-Bayes flatness at the final epoch; 2D/1D slices
    and the trajectory at the final epoch (or every call with `every_epoch`).
    process_group: `data`'s probe and slices are this rank's shards; every loss is over
    all shards, and every rank returns the same metrics and artifacts."""
    probe, slice_data, trajectory = data.probe, data.slices, data.trajectory
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    artifacts: dict[str, object] = {}
    group = {"process_group": process_group}
    if s.sharpness:
        metrics.update(measure_sharpness(model, loss_fn, probe, s, **group))
    if s.pac_bayes and final:  # its bisection costs ~170 loss evaluations: the end point only
        metrics.update(
            pac_bayes_measures(model, loss_fn, probe, s.pac_bayes_increase, s.seed, **group)
        )
    if s.landscape and (final or s.every_epoch):
        device = next(model.parameters()).device
        traj = [w.to(device) for w in trajectory]
        can_pca = len(traj) >= 3
        directions = s.directions if (s.directions != "pca" or can_pca) else "random"
        settings = s if directions == s.directions else _replace(s, directions=directions)
        d1, d2, extent, description = plane(model, loss_fn, probe, settings, traj, cache, **group)
        grid = axis(s.resolution, extent)
        surface = surface_2d(model, loss_fn, slice_data, (d1, d2), (grid, grid), **group)
        slice2d: dict[str, Any] = {
            **surface.as_dict(),
            "directions": description,
            "d1": d1.cpu(),
            "d2": d2.cpu(),
            "plane": directions,
            "epoch": epoch,
            "config": {"resolution": s.resolution, "range": extent},
        }
        prefix = "landscape/" if final else f"landscape/epoch_{epoch:03d}/"
        artifacts[prefix + "loss_slice_2d.pt"] = slice2d
        if final:
            artifacts.update(
                _final_only(
                    model,
                    loss_fn,
                    LandscapeData(probe, slice_data, traj),
                    s,
                    cache,
                    surface if directions == "pca" else None,
                    process_group,
                )
            )
    metrics["landscape_seconds"] = time.perf_counter() - start
    return metrics, artifacts


def _replace(s: LandscapeSettings, **changes) -> LandscapeSettings:
    import dataclasses

    return dataclasses.replace(s, **changes)


def _final_only(model, loss_fn, data, s, cache, pca_slice, process_group):
    probe, slice_data, traj = data.probe, data.slices, list(data.trajectory)
    artifacts: dict[str, object] = {}
    group = {"process_group": process_group}
    ts = axis(2 * s.resolution - 1, s.half_range)
    v = top_eigenvectors(model, loss_fn, probe, cache, k=1, **group)[0]
    one_d = {
        "random": slice_1d(
            model, loss_fn, slice_data, random_direction(model, seed=s.seed), ts, **group
        ).as_dict(),
        "eigen": slice_1d(model, loss_fn, slice_data, v, ts, **group).as_dict(),
    }
    if len(traj) >= 2:
        alphas = torch.linspace(-0.25, 1.25, 2 * s.resolution - 1, dtype=torch.float64)
        one_d["interpolation"] = interpolate(
            model, loss_fn, slice_data, traj[0], traj[-1], alphas, **group
        ).as_dict()
    artifacts["landscape/loss_slice_1d.pt"] = one_d
    if len(traj) >= 3:
        pca = trajectory_pca(traj)
        if pca_slice is None:
            extent = float(pca.coordinates.abs().max()) * 1.25
            d = pca.directions.to(traj[0].dtype)
            grid = axis(s.resolution, extent)
            pca_slice = surface_2d(model, loss_fn, slice_data, (d[0], d[1]), (grid, grid), **group)
        artifacts["landscape/trajectory.pt"] = {
            "coordinates": pca.coordinates,
            "explained_variance_ratio": pca.explained_variance_ratio,
            "directions": pca.directions.float().cpu(),
            "slice": pca_slice.as_dict(),
        }
    return artifacts
