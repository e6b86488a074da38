"""What each rank of the distributed tests runs (a module of its own: spawned processes
import it by name). Every rank builds the same model and data from seeds, keeps its uneven
shard of the probe set, measures collectively and saves what it found."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lossgeo import Scope, SGDStep
from lossgeo.curvature import (
    BatchSampling,
    CurvatureSettings,
    curvature_eigen,
    hessian_eigen,
    hessian_trace,
    layerwise_lambda_max,
    measure_curvature,
    spectral_density,
)
from lossgeo.curvature.stochastic import batch_sharpness

N_SAMPLES = 23  # uneven over 2 (12, 11) and 3 (8, 8, 7) ranks


def problem(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An MLP, or a CNN with BatchNorm (measured in eval mode), and its probe set (float64)."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(3)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        x = torch.randn(N_SAMPLES, 5, generator=gen)
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
        )
        x = torch.randn(N_SAMPLES, 1, 6, 6, generator=gen)
    model = model.double()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        model(x.double())
    y = torch.randint(0, 3, (N_SAMPLES,), generator=gen)
    return model, x.double(), y


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, group) -> dict:
    """Every estimator once; group None = one process."""
    data = (x, y)
    opts = {"scope": Scope(process_group=group)}
    top = hessian_eigen(model, F.cross_entropy, data, k=3, tol=1e-10, **opts)
    low = hessian_eigen(model, F.cross_entropy, data, k=1, which="SA", tol=1e-10, **opts)
    ggn = curvature_eigen(model, F.cross_entropy, data, k=1, tol=1e-10, matrix="ggn", **opts)
    trace = hessian_trace(model, F.cross_entropy, data, n_samples=6, seed=1, **opts)
    density = spectral_density(model, F.cross_entropy, data, n_steps=8, seed=2, **opts)
    layers = layerwise_lambda_max(model, F.cross_entropy, data, tol=1e-10, **opts)
    measures = measure_curvature(
        model,
        F.cross_entropy,
        data,
        CurvatureSettings(k=2, tol=1e-10, secondary_tol=1e-10, trace_samples=4, density_steps=6),
        final=True,
        scope=Scope(process_group=group),
    )
    sharpness = batch_sharpness(
        model,
        F.cross_entropy,
        data,
        BatchSampling(batch_size=5, rel_se=0, min_batches=3, max_batches=3, seed=2),
        scope=Scope(process_group=group),
    )
    return {
        "batch_sharpness": (sharpness.value, sharpness.stderr, sharpness.n_batches),
        "top": top.values,
        "low": low.values,
        "ggn": ggn.values,
        "trace": trace.value,
        "density_nodes": density.nodes,
        "layers": {name: float(r.values[0]) for name, r in layers.items()},
        "measure_top": measures.top.values,
        "measure_trace": measures.trace.value,
        "measure_fisher": measures.fisher_lambda_max,
        "measure_loss": measures.probe_loss,
    }


def joined(rank: int, world_size: int, init_file: str):
    """This process as rank `rank` of a gloo group (float64, one thread); leave with
    dist.destroy_process_group()."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )


def worker(
    rank: int, world_size: int, init_file: str, out_dir: str, what: str = "curvature"
) -> None:
    """`measure` (what="curvature") or `measure_geometry` (what="geometry") on this rank's
    uneven shard, collectively; saved as rank{rank}.pt."""
    joined(rank, world_size, init_file)
    try:
        results = {}
        measured = measure if what == "curvature" else measure_geometry
        for name in ("mlp", "cnn"):
            model, x, y = problem(name)
            xs, ys = x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]
            results[name] = measured(model, xs, ys, True)
            if what == "curvature" and name == "mlp" and world_size == 2:
                # a DDP-wrapped model: through its module
                wrapped = nn.parallel.DistributedDataParallel(model)
                results["mlp_ddp"] = measure(wrapped, xs, ys, True)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def make_tracker(model: nn.Module, probe, group, logger, optimizer: str | None = None):
    """The Tracker of the distributed tests: lr 0.1 given, or read from an optimizer
    ("sgd" or "adam", which the FSDP test then steps)."""
    from lossgeo import CurvatureSettings as Settings
    from lossgeo import SGDStep, StepSettings, Tracker

    optimizers = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
    step = optimizers[optimizer](model.parameters(), lr=0.1) if optimizer else SGDStep(0.1)
    return Tracker(
        model,
        F.cross_entropy,
        probe,
        optimizer=step,
        steps=StepSettings(every=1, batch_size=4, tol=1e-10),
        curvature=Settings(k=2, tol=1e-10, secondary_tol=1e-10, trace_samples=4),
        scope=Scope(process_group=group),
        logger=logger,
    )


def tracker_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """A Tracker inside a 2-process loop: collective measurements, rank 0 logs."""
    from ..run.test_tracker import NullLogger

    joined(rank, world_size, init_file)
    try:
        model, x, y = problem("mlp")
        shard = (x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank])
        logger = NullLogger()
        tracker = make_tracker(nn.parallel.DistributedDataParallel(model), shard, True, logger)
        result = {"step": tracker.step(1), "epoch": tracker.epoch(1), "logged": logger.metrics}
        torch.save(result, Path(out_dir) / f"tracker{rank}.pt")
    finally:
        dist.destroy_process_group()


def smooth_problem(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tanh MLP (smooth, so difference products are accurate in float32 too) and its
    probe set, in `dtype`."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(3)
    # drawn in float64 whatever the default dtype, then cast: the same problem everywhere
    wide = torch.float64
    model = nn.Sequential(nn.Linear(5, 7, dtype=wide), nn.Tanh(), nn.Linear(7, 3, dtype=wide))
    model = model.to(dtype)
    x = torch.randn(N_SAMPLES, 5, generator=gen, dtype=wide).to(dtype)
    return model, x, torch.randint(0, 3, (N_SAMPLES,), generator=gen)


def fsdp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """The tanh MLP under FSDP2 `fully_shard` (each Linear, then the whole): lambda_max,
    lambda_2 and the trace by difference products, in float64 and float32; the parameters
    and a planted .grad are checked unchanged afterwards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    joined(rank, world_size, init_file)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        results = {}
        for dtype in (torch.float64, torch.float32):
            model, x, y = smooth_problem(dtype)
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.5)  # a training loop's gradient, to be kept
            before = [p.to_local().clone() for p in model.parameters()]
            shard = (x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank])
            top = hessian_eigen(model, F.cross_entropy, shard, k=2, tol=1e-10)
            trace = hessian_trace(model, F.cross_entropy, shard, n_samples=6, seed=1)
            unchanged = all(
                torch.equal(p.to_local(), b) and bool((p.grad.to_local() == 0.5).all())
                for p, b in zip(model.parameters(), before)
            )
            results[str(dtype)] = {"top": top.values, "trace": trace.value, "kept": unchanged}
        torch.save(results, Path(out_dir) / f"fsdp{rank}.pt")
    finally:
        dist.destroy_process_group()


class PlantedFailure:
    """A loss that raises `error` on rank 1 once `armed`: a measurement failing on one rank."""

    def __init__(self, error: type[Exception]) -> None:
        self.error, self.armed = error, False

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.armed and dist.get_rank() == 1:
            raise self.error("planted failure")
        return F.cross_entropy(output, target)


def failing_worker(rank: int, world_size: int, init_file: str, out_dir: str, when: str) -> None:
    """A Tracker whose step or epoch measurement fails on rank 1 only: every rank must end
    with the same message, promptly (not at the collective's timeout)."""
    import time

    from lossgeo import StepSettings, Tracker

    from ..run.test_tracker import NullLogger

    joined(rank, world_size, init_file)
    model, x, y = problem("mlp")
    shard = (x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank])
    loss = PlantedFailure(MemoryError if when == "step" else ValueError)
    tracker = Tracker(
        model,
        loss,
        shard,
        optimizer=SGDStep(0.1),
        steps=StepSettings(every=1, batch_size=4, tol=1e-6),
        scope=Scope(process_group=True),
        logger=NullLogger(),
    )
    tracker.step(1)  # a measurement that works, first
    loss.armed = True
    started = time.monotonic()
    try:
        tracker.step(2) if when == "step" else tracker.epoch(1)
        outcome = "no error"
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    Path(out_dir, f"failed{rank}.txt").write_text(f"{outcome}\n{time.monotonic() - started}")
    if dist.is_initialized():
        dist.destroy_process_group()


def measure_geometry(model: nn.Module, x: torch.Tensor, y: torch.Tensor, group) -> dict:
    """Every loss-based measurement once (sharpness, PAC-Bayes, noise scale, slices and the
    final-epoch landscape with eigen directions); group None = one process."""
    from lossgeo.geometry.landscape import surface_2d
    from lossgeo.geometry.landscape_measure import (
        LandscapeData,
        LandscapeSettings,
        measure_landscape,
    )
    from lossgeo.geometry.noise import gradient_noise_scale
    from lossgeo.geometry.pac_bayes import pac_bayes_flatness

    data, opts = (x, y), {"process_group": group}
    settings = LandscapeSettings(
        sharpness_directions=3, resolution=3, directions="eigen", pac_bayes_increase=0.05
    )
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    trajectory = [weights * 1.1, weights * 0.9 + 0.01, weights]
    metrics, artifacts = measure_landscape(
        model,
        F.cross_entropy,
        LandscapeData(data, data, trajectory),
        settings,
        epoch=2,
        final=True,
        **opts,
    )
    metrics.pop("landscape_seconds")
    d1 = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()))
    surface = surface_2d(
        model, F.cross_entropy, data, (d1, d1.flip(0)),
        (torch.tensor([0.0, 0.5]), torch.tensor([-0.5, 0.0])), factorize=False, **opts,
    )  # fmt: skip
    noise = gradient_noise_scale(model, F.cross_entropy, data, chunk_size=5, **opts)
    magnitude = pac_bayes_flatness(
        model, F.cross_entropy, data, max_increase=0.05, magnitude_aware=True, **opts
    )
    return {
        "metrics": metrics,
        "slice_1d": artifacts["landscape/loss_slice_1d.pt"],
        "slice_2d": artifacts["landscape/loss_slice_2d.pt"]["loss"],
        "trajectory": artifacts["landscape/trajectory.pt"]["slice"]["loss"],
        "surface": (surface.loss, surface.acc),
        "noise": (noise.b_simple, noise.trace_covariance, noise.gradient_norm_sq, noise.n_samples),
        "pac_bayes_evaluations": magnitude.n_evaluations,
    }


def fsdp_tracker_run(model: nn.Module, x, y, n_total: int, tracker) -> dict:
    """A step and an epoch measured, one optimizer step on the mean loss over all n_total
    samples (x, y: this rank's shard), then a step measured again."""
    step1, epoch1 = tracker.step(1), tracker.epoch(1, final=True)
    optimizer = tracker.optimizer
    optimizer.zero_grad()
    world = dist.get_world_size() if dist.is_initialized() else 1
    # FSDP averages the ranks' gradients: each rank's sum over n_total, times the world size
    (F.cross_entropy(model(x), y, reduction="sum") * world / n_total).backward()
    optimizer.step()
    return {"step1": step1, "epoch1": epoch1, "step2": tracker.step(2)}


def fsdp_tracker_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """A Tracker on the tanh MLP under FSDP2, inside a training step (float64)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..run.test_tracker import NullLogger

    joined(rank, world_size, init_file)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        results = {}
        for optimizer in ("sgd", "adam"):
            model, x, y = smooth_problem(torch.float64)
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            xs, ys = x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]
            logger = NullLogger()
            tracker = make_tracker(model, (xs, ys), True, logger, optimizer)
            result = fsdp_tracker_run(model, xs, ys, len(y), tracker)
            result["tags"], result["n_logged"] = logger.tags, len(logger.metrics)
            results[optimizer] = result
        torch.save(results, Path(out_dir) / f"fsdp_tracker{rank}.pt")
    finally:
        dist.destroy_process_group()
