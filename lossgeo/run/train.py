"""The training loop: SGD, full evaluation every epoch, measurements on a schedule.

The loop knows nothing about MLflow: it reports to a `RunLogger` and runs `Measurement`s,
so curvature, sharpness and landscapes plug in without touching it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lossgeo.config import TrainConfig
from lossgeo.curvature.scope import Scope
from lossgeo.data import DataBundle, Split
from lossgeo.geometry.regimes import CONVERGED, REGIMES, WINDOW
from lossgeo.losses import LossFn
from lossgeo.run.measurements import curvature_settings, step_settings
from lossgeo.run.parallel import SINGLE, Ranks
from lossgeo.run.protocols import (  # noqa: F401  (the old import path of these names)
    EpochState,
    Measurement,
    MeasurementResult,
    RunLogger,
)
from lossgeo.run.tracker import Tracker


@dataclass
class TrainResult:
    # The per-epoch rows went to the logger (`RunLogger.log_epoch`), which keeps the one
    # history of the run; nothing here copies them.
    diverged_epoch: int | None
    model: nn.Module
    # Training to a fit: the optimizer step at which the target was reached (None: missed).
    steps_to_target: int | None
    # Artifacts from the last measured epoch, already logged; kept for plots.
    final_artifacts: dict[str, Any]


def measured_epochs(epochs: int, every: int) -> set[int]:
    """Epoch 0, every `every`-th epoch and the last one."""
    return {0, epochs} | set(range(0, epochs + 1, every))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: LossFn,
    split: Split,
    batch_size: int = 2048,
    ranks: Ranks = SINGLE,
) -> tuple[float, float]:
    """(mean loss, accuracy) in eval mode; the caller restores the mode. Under torchrun
    each rank evaluates its shard of the split and the sums are added up."""
    model.eval()
    total_loss, correct = 0.0, 0
    shard = Split(ranks.shard(split.x), ranks.shard(split.y))
    for x, y in shard.batches(batch_size):
        out = model(x)
        total_loss += float(loss_fn(out, y)) * len(y)
        correct += int((out.argmax(dim=-1) == y).sum())
    total_loss, correct_sum = ranks.sum([total_loss, float(correct)])
    n = len(split)
    return total_loss / n, correct_sum / n


def evaluation_metrics(
    model: nn.Module, loss_fn: LossFn, data: DataBundle, ranks: Ranks = SINGLE
) -> dict[str, float]:
    was_training = model.training
    metrics: dict[str, float] = {}
    for split_name in ("train", "val", "test"):
        loss, acc = evaluate(model, loss_fn, getattr(data, split_name), ranks=ranks)
        metrics[f"{split_name}_loss"] = loss
        metrics[f"{split_name}_acc"] = acc
    metrics["gen_gap"] = metrics["test_loss"] - metrics["train_loss"]
    metrics["gen_gap_acc"] = metrics["train_acc"] - metrics["test_acc"]
    model.train(was_training)
    return metrics


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to("cpu", copy=True)


def epoch_line(
    epoch: int,
    epochs: int,
    metrics: dict[str, float],
    seconds: float,
    split: dict[str, float] | None = None,
    label: str = "",
) -> str:
    """`[cell] epoch 2/3: train_loss 0.1234, test_loss 0.1301, test_acc 0.9612, lambda_max
    14.2, 5.1 s (train 2.0, eval 0.4, curvature 1.9, landscape 0.8)`: where the time went."""
    parts = [
        f"{key} {metrics[key]:.4g}"
        for key in ("train_loss", "test_loss", "test_acc", "lambda_max")
        if key in metrics
    ]
    where = (
        " (" + ", ".join(f"{name} {secs:.1f}" for name, secs in split.items()) + ")"
        if split
        else ""
    )
    prefix = f"[{label}] " if label else ""
    return f"{prefix}epoch {epoch}/{epochs}: " + ", ".join(parts + [f"{seconds:.1f} s{where}"])


@dataclass(frozen=True)
class LoopContext:
    """Who a training loop reports to, and the processes it runs on.

    Attributes:
        label: starts every printed line (a grid cell, a sweep trial).
        on_epoch_end: called with (epoch, metrics) after each epoch; it may raise (e.g.
            Optuna pruning) to stop early, and what was logged stays logged.
        ranks: the data-parallel job under torchrun (`parallel.py`): every rank trains,
            rank 0's logger writes.
    """

    label: str = ""
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
    ranks: Ranks = SINGLE


def train(
    config: TrainConfig,
    data: DataBundle,
    model: nn.Module,
    loss_fn: LossFn,
    logger: RunLogger,
    measurements: Sequence[Measurement] = (),
    context: LoopContext = LoopContext(),
) -> TrainResult:
    """Trains with SGD; logs evaluation (every `eval_every` epochs) and scheduled
    measurements; `context` labels the printed lines, calls back after each epoch and
    names the processes (`LoopContext`).

    A non-finite training loss stops training; the epoch is returned as `diverged_epoch`
    and everything computed up to then has been logged.
    """
    on_epoch_end = context.on_epoch_end
    loop = _Loop(config, data, model, loss_fn, logger, measurements, context.label, context.ranks)
    for epoch in loop.epoch_bar:
        started = time.perf_counter()
        split: dict[str, float] = {}
        if epoch > 0 and not loop.train_epoch(epoch, split):
            loop.record_divergence(epoch, {})
            break
        metrics, full, is_last = loop.evaluate(epoch, split)
        if "train_loss" in metrics and not math.isfinite(metrics["train_loss"]):
            # The last step of the epoch blew the weights up: as diverged as a NaN batch loss.
            loop.record_divergence(epoch, metrics)
            break
        loop.trajectory.append(flat_weights(model))
        if epoch in loop.schedule or is_last:
            loop.measure(epoch, is_last, metrics, split)
        if metrics:  # an epoch neither evaluated nor measured logs nothing
            loop.record(epoch, metrics)
        if full:
            loop.report(epoch, metrics, time.perf_counter() - started, split)
            if on_epoch_end is not None:  # e.g. pruning on val_loss: evaluated epochs only
                on_epoch_end(epoch, metrics)
        if is_last:
            break
    loop.epoch_bar.close()
    return TrainResult(
        diverged_epoch=loop.diverged_epoch,
        model=model,
        steps_to_target=loop.target.step,
        final_artifacts=loop.final_artifacts,
    )


def make_optimizer(
    config: TrainConfig, params: nn.Module | Iterable[torch.Tensor]
) -> torch.optim.Optimizer:
    """The run's optimizer over a model's parameters (or any tensors): SGD (with
    `momentum`), Adam or AdamW (with `beta1`, `beta2`, `adam_eps`), all with
    `weight_decay`."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    adaptive = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return adaptive(
        params,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )


class _Loop:
    """The state of one training run and its steps, one method each: train an epoch,
    evaluate, measure, record, report. `train` reads as the order they run in."""

    def __init__(
        self,
        config: TrainConfig,
        data: DataBundle,
        model: nn.Module,
        loss_fn: LossFn,
        logger: RunLogger,
        measurements: Sequence[Measurement],
        label: str,
        ranks: Ranks = SINGLE,
    ) -> None:
        self.config, self.data, self.model, self.loss_fn = config, data, model, loss_fn
        self.ranks = ranks
        # what takes the training steps: under torchrun DDP averages the ranks' gradients
        self.stepper: nn.Module = (
            model if ranks.group is None else nn.parallel.DistributedDataParallel(model)
        )
        self.logger, self.measurements = logger, measurements
        self.optimizer = make_optimizer(config, model)
        self.shuffle_gen = torch.Generator().manual_seed(config.seed + 1)
        self.schedule = measured_epochs(config.epochs, config.measure_every)
        self.trajectory: list[torch.Tensor] = []
        self.final_artifacts: dict[str, Any] = {}
        self.diverged_epoch: int | None = None
        self.n_batches = math.ceil(len(data.train) / config.batch_size)
        self.target = TargetCheck(config, self.n_batches, model, loss_fn, data, ranks)
        # one measuring path for every loop: lossgeo's own uses the public Tracker
        self.tracker = Tracker(
            model,
            loss_fn,
            (ranks.shard(data.probe.x), ranks.shard(data.probe.y)),
            optimizer=self.optimizer,
            steps=step_settings(config),
            curvature=curvature_settings(config),
            scope=Scope(process_group=ranks.group),
            logger=logger,
        )
        self.converged = ConvergedStop(config.stop_converged, logger)
        self.step = 0
        self.label = label
        self.prefix = f"[{label}] " if label else ""
        self.epoch_bar = tqdm(
            range(config.epochs + 1),
            desc=f"[{label}] epochs" if label else "epochs",
            disable=None if ranks.logs else True,
        )

    def train_epoch(self, epoch: int, split: dict[str, float]) -> bool:
        """One epoch of SGD (shorter when the target fit is reached within it), with the
        per-step measurements when due; False when a batch loss was not finite."""
        started = time.perf_counter()
        self.model.train()
        batches = self.data.train.batches(
            self.config.batch_size, shuffle=True, generator=self.shuffle_gen
        )
        batch_bar = tqdm(
            batches,
            total=self.n_batches,
            desc=f"epoch {epoch}",
            leave=False,
            disable=None if self.ranks.logs else True,
        )
        finite = True
        for x, y in batch_bar:
            self.optimizer.zero_grad(set_to_none=True)
            loss, batch_loss = self.batch_loss(x, y)
            if not math.isfinite(batch_loss):  # on any rank: all of them stop here
                finite = False
                break
            loss.backward()
            self.optimizer.step()
            self.step += 1
            if self.tracker.due(self.step):
                measured = self.tracker.step(self.step, loss=batch_loss)
                if self.converged.update(self.step, measured):
                    break  # converged below the edge: this (partial) epoch is the last
            if self.target.due(self.step) and self.target.reached_within_epoch(self.step):
                break  # the fit is reached mid-epoch: this (partial) epoch is the last
        batch_bar.close()
        split["train"] = time.perf_counter() - started
        return finite

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(what to differentiate, the mini-batch's mean loss). Under torchrun each rank
        takes its slice of the global batch, weighted so that DDP's average of the ranks'
        gradients is the gradient of the whole batch's mean loss; the mean loss is summed
        over the ranks, so a NaN on one rank stops every rank at the same step."""
        if self.ranks.group is None:
            loss = self.loss_fn(self.stepper(x), y)
            return loss, float(loss.detach())
        xs, ys = self.ranks.shard(x), self.ranks.shard(y)
        out = self.stepper(xs)
        share = len(ys) / len(y)
        # an empty slice (a last batch smaller than the world) still joins DDP's reduction
        local = self.loss_fn(out, ys) if len(ys) else out.sum() * 0.0
        (total,) = self.ranks.sum([float(local.detach()) * share])
        return local * (share * self.ranks.world), total

    @property
    def stopped(self) -> bool:
        """Stopped before the epoch budget: the target fit reached, or converged below the
        stability edge."""
        return self.target.step is not None or self.converged.step is not None

    def evaluate(self, epoch: int, split: dict[str, float]) -> tuple[dict[str, float], bool, bool]:
        """(metrics, whether train/val/test were all evaluated, whether this is the last
        epoch). train/val/test run on their own schedule (eval_every); the first and the
        last epoch, and the point where a target was reached, always in full. A non-finite
        train loss is returned as it is, for the caller to record the divergence."""
        started = time.perf_counter()
        c = self.config
        full = epoch % c.eval_every == 0 or epoch == c.epochs or self.stopped
        if full:
            metrics = evaluation_metrics(self.model, self.loss_fn, self.data, self.ranks)
        elif self.target.active:  # the end-of-epoch target check needs the train split only
            train = evaluate(self.model, self.loss_fn, self.data.train, ranks=self.ranks)
            metrics = dict(zip(("train_loss", "train_acc"), train))
        else:
            metrics = {}
        if "train_loss" in metrics:
            if not math.isfinite(metrics["train_loss"]):
                return metrics, full, True
            self.target.check_epoch_end(self.step, metrics["train_loss"], metrics["train_acc"])
        is_last = epoch == c.epochs or self.stopped
        if is_last and not full:  # the target was reached at this epoch's end: in full
            metrics = evaluation_metrics(self.model, self.loss_fn, self.data, self.ranks)
            full = True
        split["eval"] = time.perf_counter() - started
        if self.target.step is not None:
            metrics["steps_to_target"] = float(self.target.step)
            metrics["epochs_to_target"] = self.target.step / self.n_batches
        return metrics, full, is_last

    def measure(
        self, epoch: int, is_last: bool, metrics: dict[str, float], split: dict[str, float]
    ) -> None:
        """The epoch set through the Tracker (curvature, then the loop's measurements);
        `metrics` receives every measured value and the artifacts are logged."""
        state = EpochState(
            epoch=epoch,
            is_last=is_last,
            model=self.model,
            loss_fn=self.loss_fn,
            data=self.data,
            trajectory=self.trajectory,
            metrics=metrics,
            ranks=self.ranks,
        )
        names = ", ".join(
            (["curvature"] if self.tracker.curvature is not None else [])
            + [getattr(m, "name", "measurement") for m in self.measurements]
        )
        if names:  # minutes on a large probe set: say so before, not only after
            self.epoch_bar.set_description_str(f"{self.prefix}epoch {epoch}: measuring {names}")
            if self.epoch_bar.disable and self.ranks.logs:
                print(
                    f"{self.prefix}epoch {epoch}/{self.config.epochs}: measuring {names}"
                    f"{' (last epoch: with the final-epoch extras)' if is_last else ''}"
                    " ...",
                    flush=True,
                )
        # the Tracker's curvature first: it leaves the top pairs for the landscapes
        measured, artifacts = self.tracker.measure_epoch(state)
        split.update(self.tracker.epoch_seconds)
        for measurement in self.measurements:
            started = time.perf_counter()
            result = measurement(state)
            split[getattr(measurement, "name", "measurement")] = time.perf_counter() - started
            measured.update(result.metrics)
            artifacts.update(result.artifacts)
        metrics.update(measured)  # the loop records what was measured
        for path, obj in artifacts.items():
            self.logger.log_object(path, obj)
        if is_last:
            self.final_artifacts.update(artifacts)

    def record(self, epoch: int, metrics: dict[str, float]) -> None:
        self.logger.log_epoch(epoch, metrics)

    def record_divergence(self, epoch: int, metrics: dict[str, float]) -> None:
        """A non-finite loss at `epoch`: recorded (with what was evaluated), not raised."""
        self.diverged_epoch = epoch
        self.record(epoch, {**metrics, "diverged_epoch": float(epoch)})

    def report(
        self, epoch: int, metrics: dict[str, float], seconds: float, split: dict[str, float]
    ) -> None:
        """The progress bar's figures, or one line per evaluated epoch off a terminal."""
        self.epoch_bar.set_postfix(
            train_loss=f"{metrics['train_loss']:.4f}", test_acc=f"{metrics['test_acc']:.4f}"
        )
        if self.epoch_bar.disable and self.ranks.logs:  # not a terminal, so no bar
            print(
                epoch_line(epoch, self.config.epochs, metrics, seconds, split, self.label),
                flush=True,
            )


class ConvergedStop:
    """`stop_converged`: training ends once WINDOW consecutive per-step measurements read
    `converged_below` and the probe loss is down to CONVERGED of its first measured value:
    the run has converged before its stability edge, so more steps will not get it there.
    The loss condition matters: early in training the ratio often falls (a catapult) while
    the loss falls fast, which the detector alone also reads as converged_below. `step` is
    where it stopped, and the run is tagged `stopped_early`."""

    def __init__(self, active: bool, logger: RunLogger) -> None:
        self.active, self.logger = active, logger
        self.run_length = 0
        self.first_loss = math.nan
        self.step: int | None = None

    def update(self, step: int, measured: dict[str, float] | None) -> bool:
        """True when training should stop now."""
        if not self.active or self.step is not None or not measured:
            return False
        regime, loss = measured.get("step/regime"), measured.get("step/probe_loss", math.nan)
        if regime is None:  # a measurement without a finite ratio is not counted
            return False
        if math.isnan(self.first_loss):
            self.first_loss = loss
        converged = regime == REGIMES["converged_below"] and loss <= CONVERGED * self.first_loss
        self.run_length = self.run_length + 1 if converged else 0
        if self.run_length < WINDOW:
            return False
        self.step = step
        self.logger.set_tags(
            {
                "stopped_early": f"converged_below the edge, probe loss at most {CONVERGED:g} "
                f"of its first, for {WINDOW} measurements at step {step}"
            }
        )
        return True


class TargetCheck:
    """Training to a fit (`target_train_loss` and/or `target_train_acc`): every
    `target_check_every` steps the probe set (a fixed training subset) is read, and when it
    meets every target set, the full train split confirms it; the end of every epoch checks
    the full split too. `step` is the optimizer step at which the targets were first
    confirmed (None until then)."""

    def __init__(
        self,
        config: TrainConfig,
        n_batches: int,
        model: nn.Module,
        loss_fn: LossFn,
        data: DataBundle,
        ranks: Ranks = SINGLE,
    ) -> None:
        self.loss, self.acc = config.target_train_loss, config.target_train_acc
        self.ranks = ranks
        self.every = config.target_check_every or max(1, n_batches // 10)
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.step: int | None = None

    @property
    def active(self) -> bool:
        return (self.loss > 0 or self.acc > 0) and self.step is None

    def met(self, loss: float, acc: float) -> bool:
        return (self.loss <= 0 or loss <= self.loss) and (self.acc <= 0 or acc >= self.acc)

    def due(self, step: int) -> bool:
        return self.active and step % self.every == 0

    def probe_may_meet(self) -> bool:
        """Whether the probe set leaves it plausible that the full split meets the targets:
        within two standard errors (from the means of 16 equal chunks). Requiring the probe
        mean itself to meet the target overshot: at train loss 0.05 the probe mean of 1,024
        samples has a standard error of about 20%, so the full split was confirmed only once
        the probe read low, by when the split was at 0.037."""
        chunk = math.ceil(len(self.data.probe) / 16)
        chunks = [
            evaluate(self.model, self.loss_fn, Split(x, y))
            for x, y in self.data.probe.batches(chunk)
        ]
        losses = torch.tensor([c[0] for c in chunks], dtype=torch.float64)
        accs = torch.tensor([c[1] for c in chunks], dtype=torch.float64)
        n = len(chunks)

        def se(v: torch.Tensor) -> float:
            return float(v.std() / math.sqrt(n)) if n > 1 else 0.0

        return self.met(float(losses.mean()) - 2 * se(losses), float(accs.mean()) + 2 * se(accs))

    def reached_within_epoch(self, step: int) -> bool:
        was_training = self.model.training
        try:
            if not self.probe_may_meet():
                return False
            if not self.met(*evaluate(self.model, self.loss_fn, self.data.train, ranks=self.ranks)):
                return False  # the probe set is a sample; the full split decides
        finally:
            self.model.train(was_training)
        self.step = step
        return True

    def check_epoch_end(self, step: int, train_loss: float, train_acc: float) -> None:
        if self.active and self.met(train_loss, train_acc):
            self.step = step
