"""`Tracker`: the loss-landscape geometry of any model, measured inside any training loop.

    tracker = Tracker(model, loss_fn, probe, optimizer=optimizer,
                      steps=StepSettings(every=50, batch_size=32))  # 32: the training batch
    step = 0                                     # global: never restarted by an epoch
    for epoch in range(1, epochs + 1):
        for batch in loader:
            ...; optimizer.step(); step += 1
            tracker.step(step, loss=loss.item())  # measures when due, logs with step=step
        tracker.epoch(epoch)                      # the epoch set, logged with step=epoch

`loss_fn` is `loss_fn(output, target)` with (x, y) probe batches, or `loss_fn(model, batch)`
with any batches (a list of them or a DataLoader); see `lossgeo.curvature.batches`. Metrics
go to the active MLflow run if there is one (or to `logger`), and are returned either way.
Every measurement leaves the model, its train/eval flags, buffers and `.grad` as they were.

The per-step set (prefix `step/`, MLflow step = the optimizer step): `lambda_max`
(warm-started from the previous Ritz vectors, `lossgeo.curvature.warm`),
`lambda_max_n_hvp`, `lambda_max_cold_gap` (at every cold check), `batch_sharpness` (+
`_se`, `_n`), `grad_alignment` (share of the probe gradient in the tracked top-k eigenspace),
`grad_norm`, `probe_loss`, `stability_threshold`, `edge_ratio` and `batch_edge_ratio`
(lambda_max and batch sharpness against the threshold of the optimizer that steps, see
`lossgeo.curvature.stability`; for Adam/AdamW against `preconditioned_lambda_max` and the
preconditioned batch sharpness), `regime` (below / at the edge / stalled / above / converged below,
`lossgeo.geometry.regimes`), `peak_mb`, `train_loss` (the value passed in), `seconds`. A
curvature spike is reported when it happens (`step/spike`, tag `lossgeo_last_spike`, a
warning).

The epoch set is `lossgeo.curvature.measure_curvature` with `CurvatureSettings` (metric
names from `lossgeo.run.names`): lambda_max .. lambda_k, lambda_min, the trace, the effective
dimension, GGN and Fisher lambda_max, lambda_max per layer, the edge ratio and the peak
memory (`curvature_peak_mb`). lossgeo's own
training loop (`lossgeo.run.train`) measures through this class too, with the same function,
settings and layer names; it runs its noise scale and landscapes after the Tracker's set.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lossgeo.curvature.batches import AnyLossFn, DataSource, as_batches
from lossgeo.curvature.distributed import collectively, unwrap
from lossgeo.curvature.factories import AnyHessianOperator, hessian_operator
from lossgeo.curvature.lanczos import lanczos
from lossgeo.curvature.measure import (
    CurvatureMeasures,
    CurvatureSettings,
    measure_curvature,
    probe_is_finite,
)
from lossgeo.curvature.operators import outside_autocast
from lossgeo.curvature.params import ParameterSpace
from lossgeo.curvature.peak import PeakMemory
from lossgeo.curvature.scope import Scope
from lossgeo.curvature.sharded import ShardedParameterSpace, is_sharded
from lossgeo.curvature.stability import (
    SGDStep,
    StabilityEdge,
    preconditioned_operator,
    preconditioner,
    stability_edge,
)
from lossgeo.curvature.stochastic import (
    BatchSampling,
    BatchSharpnessResult,
    batch_sharpness,
    gradient_alignment,
    minibatches,
)
from lossgeo.curvature.warm import WarmEigen
from lossgeo.geometry.regimes import REGIMES, EdgeRegimeDetector
from lossgeo.geometry.spikes import OnlineSpikeDetector
from lossgeo.run.names import curvature_artifacts, curvature_metrics
from lossgeo.run.protocols import EpochState, MetricLogger

log = logging.getLogger("lossgeo")
SDPA_TAG = "lossgeo_attention_backend"
SPIKE_TAG = "lossgeo_last_spike"


def _needs_batch_size(probe: list[Any], batch_size: int | None) -> bool:
    """Whether batch sharpness cannot cut this probe set without a batch size (it is one
    (x, y) pair and none was given); a bad batch size is still an error."""
    try:
        minibatches(probe, batch_size, torch.Generator())
    except ValueError:
        if batch_size is None:
            return True
        raise
    return False


@dataclass(frozen=True)
class StepSettings:
    """When the per-step set is measured, and its accuracy and cost.

    Attributes:
        every: measure every this many optimizer steps (0: no per-step set, `epoch` only).
        batch_size: the training batch size, to cut an (x, y) probe set into mini-batches
            for batch sharpness (a list-of-batches probe is used as given); None: batch
            sharpness is left out for an (x, y) probe, with one line saying so.
        k: Ritz pairs the warm start tracks (and the gradient alignment is measured on).
        tol: relative accuracy of step/lambda_max.
        cold_every: every n-th solve is checked from a random start (0: never).
        batch_sharpness_rse: Monte Carlo over mini-batches stops when the standard error is
            below this share of the mean.
        batch_sharpness_max: mini-batches at most per batch-sharpness measurement.
        spike_factor: a jump of lambda_max by this factor is reported as a spike.
        seed: random starts and mini-batch draws.

    The products' precision and memory budget are the Tracker's `Scope` (the default
    precision is the parameters' dtype even inside a training loop's autocast region).
    """

    every: int = 50
    batch_size: int | None = None
    k: int = 2
    tol: float = 1e-3
    cold_every: int = 10
    batch_sharpness_rse: float = 0.1
    batch_sharpness_max: int = 16
    spike_factor: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        """Bad options fail here, in one line, not at the first measurement."""
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"every: must be an integer >= 0 (got {self.every!r})")
        # the batch size and sampling limits are checked where batch sharpness is set up
        self.sampling()

    def sampling(self, draw: int = 0) -> BatchSampling:
        """How batch sharpness samples at the `draw`-th measurement (a fresh seed each)."""
        return BatchSampling(
            batch_size=self.batch_size,
            rel_se=self.batch_sharpness_rse,
            min_batches=min(4, self.batch_sharpness_max),
            max_batches=self.batch_sharpness_max,
            seed=self.seed + draw,
        )


# the per-epoch curvature of lossgeo's own loop at its defaults
DEFAULT_CURVATURE = CurvatureSettings()


class Tracker:
    """Curvature of `model` on a fixed probe set, every `steps.every` optimizer steps, and
    the epoch set when asked.

    Args:
        model: any nn.Module; measurements leave it as they found it.
        loss_fn: loss_fn(output, target) with (x, y) batches, or loss_fn(model, batch).
        probe: the fixed probe set: (x, y) tensors, a list of batches or a DataLoader (read
            once, kept).
        optimizer: what steps, for the edge ratios: a torch optimizer (its hyperparameters
            read at each measurement, so schedules are followed; `curvature.stability`), or
            `SGDStep(lr, momentum)` for an update lossgeo cannot read.
        steps: when the per-step set is measured (`every`), the training batch size for
            batch sharpness, and the set's accuracy and cost (`StepSettings`).
        curvature: the epoch set's curvature (`lossgeo.curvature.CurvatureSettings`, the same
            settings and the same function as lossgeo's own loop); None = no curvature.
        scope: the parameter filter, the loss's form, how batches are counted, and, inside a
            multi-process loop (DDP, torchrun), the process group (`Scope`): `probe` is then
            this rank's shard and every measurement is taken collectively over the group.
            Every rank gets the same metrics; only rank 0 logs them. An FSDP2
            (`fully_shard`) model is measured by differences of gradients.
        logger: where metrics go (default: the active MLflow run, if any).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: AnyLossFn,
        probe: DataSource,
        *,
        optimizer: torch.optim.Optimizer | SGDStep | None = None,
        steps: StepSettings = StepSettings(),
        curvature: CurvatureSettings | None = DEFAULT_CURVATURE,
        scope: Scope = Scope(),
        logger: MetricLogger | None = None,
    ) -> None:
        """See the class docstring; bad input (filters, batches, loss form, settings) fails
        here, not at the first measurement."""
        if isinstance(optimizer, (int, float)):  # a step size given where the optimizer goes
            raise ValueError(
                f"optimizer: a torch optimizer, or SGDStep(lr, momentum) for an update "
                f"lossgeo cannot read (got {optimizer!r})"
            )
        self.scope = scope.resolved()  # the process group resolved once, for every call
        self.group = self.scope.process_group
        self.model, self.loss_fn = unwrap(model), loss_fn
        # FSDP2: products by differences of gradients through the sharded model
        self.sharded = is_sharded(self.model)
        self.probe = as_batches(probe, None)
        self.optimizer = optimizer
        self.step_settings, self.curvature = steps, curvature
        self.warm = WarmEigen(
            k=steps.k, tol=steps.tol, cold_every=steps.cold_every, seed=steps.seed
        )
        # Adam's preconditioned lambda_max per step, warm-started like lambda_max
        self.warm_preconditioned = WarmEigen(
            k=1, tol=steps.tol, cold_every=steps.cold_every, seed=steps.seed
        )
        self.spikes = OnlineSpikeDetector(steps.spike_factor)
        self.regimes = EdgeRegimeDetector()
        if not _logs(self.group):  # one run, logged by rank 0; the others measure along
            logger = _NoLogger()
        elif logger is None:
            from lossgeo.run.tracking import ActiveRunLogger

            logger = ActiveRunLogger()
        self.logger = logger
        self.n_measurements = 0
        # seconds each epoch measurement took at the last epoch (for the loop's epoch line)
        self.epoch_seconds: dict[str, float] = {}
        self._operator()  # bad input (filters, batches, loss form) fails here, not later
        # batch sharpness needs the training batch size to cut an (x, y) probe set; without
        # it the rest of the per-step set is measured, and one line says what is left out
        self.batch_sharpness_off = False
        if steps.every:
            self.batch_sharpness_off = _needs_batch_size(self.probe, steps.batch_size)
            if self.batch_sharpness_off:
                log.warning(
                    "lossgeo: batch sharpness is left out: give StepSettings(batch_size=...) "
                    "the training batch size to cut the (x, y) probe set into mini-batches"
                )
        self._governing_is_batch = True
        self._last_step: int | None = None
        self._warned_backwards = self._warned_nonfinite = False
        self._edge_notes: set[str] = set()

    # -- what the optimizer runs at ---------------------------------------------------------
    @property
    def math_attention(self) -> bool:
        """Whether products run under the math attention backend (from the start, once an
        earlier measurement needed it)."""
        return self.scope.math_attention

    def stability_edge(self) -> StabilityEdge:
        """The stability threshold that the edge ratios use, read now: that of the optimizer
        stepping (`curvature.stability`), or of an `SGDStep`."""
        if self.optimizer is None:
            return StabilityEdge(None)  # nothing steps that lossgeo knows of: nothing to note
        if isinstance(self.optimizer, SGDStep):
            return self.optimizer.edge
        return stability_edge(self.optimizer)

    def _edge_metrics(
        self,
        op: AnyHessianOperator | None,
        lambda_max: float,
        prefix: str = "",
        edge: StabilityEdge | None = None,
        conditioner: tuple[torch.Tensor | None, str] | None = None,
    ) -> dict[str, float]:
        """stability_threshold and edge_ratio (against lambda_max, or for adaptive optimizers
        against preconditioned_lambda_max, which is measured here); a threshold that is not
        known, or a preconditioner not there yet, is noted once in the log and the tags."""
        edge = edge or self.stability_edge()
        if edge.threshold is None:
            self._note_edge(edge.note)
            return {}
        out = {f"{prefix}stability_threshold": edge.threshold}
        if not edge.preconditioned:
            out[f"{prefix}edge_ratio"] = lambda_max / edge.threshold
            return out
        p, why = conditioner or self._preconditioner()
        if p is None:
            self._note_edge(f"no preconditioned_lambda_max: {why}")
            return out
        operator = preconditioned_operator(op or self._operator(), p)
        if prefix == "step/":  # warm-started from the previous step's vector
            tracked = self.warm_preconditioned.solve(operator)
            value = tracked.lambda_max
            out[f"{prefix}preconditioned_lambda_max_n_hvp"] = float(tracked.n_hvp)
        else:
            top = lanczos(operator, k=1, tol=self.step_settings.tol, seed=self.step_settings.seed)
            value = float(top.values[0])
        out[f"{prefix}preconditioned_lambda_max"] = value
        out[f"{prefix}edge_ratio"] = value / edge.threshold
        return out

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _skip(self, what: str, error: BaseException) -> None:
        """A measurement that cannot fit in memory even one sample at a time: tagged and
        warned about; the training run goes on without it."""
        message = f"{what} skipped: {error}"
        log.warning("lossgeo: %s", message)
        self.logger.set_tags({f"{what}_skipped": message})

    def _preconditioner(self) -> tuple[torch.Tensor | None, str]:
        """The adaptive optimizer's diagonal preconditioner now, in the measured parameters'
        order (None and why before its first step)."""
        assert isinstance(self.optimizer, torch.optim.Optimizer)  # adaptive: a real optimizer
        space = (ShardedParameterSpace if self.sharded else ParameterSpace)(
            self.model, self.scope.params
        )
        return preconditioner(self.optimizer, self.model, space)

    def _note_edge(self, note: str) -> None:
        """Say once, in the log and the run tag `stability_edge_note`, why there is no edge
        ratio (or no preconditioned one)."""
        if note and note not in self._edge_notes:
            self._edge_notes.add(note)
            if _logs(self.group):  # said once for the job, by the rank that logs
                log.warning("lossgeo: no edge ratio: %s", note)
            self.logger.set_tags({"stability_edge_note": note})

    def _operator(self) -> AnyHessianOperator:
        """A Hessian operator on the probe set, under the math attention backend from the
        start once an earlier measurement needed it (difference products on a sharded
        model)."""
        return hessian_operator(self.model, self.loss_fn, self.probe, self.scope)

    def _note_attention(self, op: AnyHessianOperator) -> None:
        if op.math_attention:
            self._note_attention_backend()

    def _note_attention_backend(self) -> None:
        if not self.math_attention:
            self.logger.set_tags(
                {
                    SDPA_TAG: "math (fused scaled_dot_product_attention has no "
                    "double backward; products run under the math "
                    "backend)"
                }
            )
            self.scope = replace(self.scope, math_attention=True)

    # -- per step ---------------------------------------------------------------------------
    def due(self, global_step: int) -> bool:
        """Whether the per-step set is measured at `global_step`."""
        every = self.step_settings.every
        return every > 0 and global_step % every == 0

    def step(self, global_step: int, loss: float | None = None) -> dict[str, float] | None:
        """After the optimizer step `global_step` (counted over the whole run, not restarted
        every epoch): measures and logs the per-step set when due (returns it), else returns
        None. A step not after the last one is skipped, with one warning: logged at a step
        that went back, it would fold the curves onto each other."""
        if self._last_step is not None and global_step <= self._last_step:
            if not self._warned_backwards:
                warnings.warn(
                    f"lossgeo: Tracker.step({global_step}) after step {self._last_step}: steps "
                    "must grow over the whole run (count a global step, not "
                    "enumerate(loader) inside each epoch); such steps are not measured",
                    stacklevel=2,
                )
                self._warned_backwards = True
            return None
        self._last_step = global_step
        if not self.due(global_step):
            return None
        try:
            # under a process group an error on one rank ends every rank with its message
            with (
                PeakMemory(self._device) as peak,
                collectively(self.group, "step measurement"),
                outside_autocast(),
            ):
                metrics = self.measure_step()
        except MemoryError as error:
            self._skip("step_curvature", error)
            return None
        metrics["step/peak_mb"] = peak.megabytes
        if loss is not None:
            metrics["step/train_loss"] = float(loss)
        self._record_regime(metrics)
        spike = None
        # the sharpness that governs the optimizer: Adam's is the preconditioned one
        governing = metrics.get("step/preconditioned_lambda_max", metrics["step/lambda_max"])
        if math.isfinite(governing):
            spike = self.spikes.update(global_step, governing, metrics.get("step/edge_ratio"))
        metrics["step/spike"] = 0.0 if spike is None else 1.0
        self.logger.log_metrics(metrics, step=global_step)
        if spike is not None:
            message = f"step {global_step}: {spike}"
            self.logger.set_tags({SPIKE_TAG: message})
            log.warning("lossgeo: curvature spike at %s", message)
        return metrics

    def _record_regime(self, metrics: dict[str, float]) -> None:
        """The regime against the edge (`geometry.regimes`) of the sharpness that governs
        the optimizer: batch sharpness for mini-batch SGD, else the edge ratio (lambda_max
        for full-batch GD, the preconditioned lambda_max for adaptive methods, whose batch
        ratio is a noisy side estimate and never decides)."""
        ratio = metrics.get("step/edge_ratio", math.nan)
        if self._governing_is_batch:
            ratio = metrics.get("step/batch_edge_ratio", ratio)
        regime = self.regimes.update(ratio, metrics.get("step/probe_loss", math.nan))
        if regime is None:
            return
        metrics["step/regime"] = float(REGIMES[regime])
        metrics["step/at_edge_share"] = self.regimes.share_at_edge
        self.logger.set_tags({"edge_regime": regime})

    def measure_step(self) -> dict[str, float]:
        """The per-step set now (not logged). A model whose probe loss or gradient is not
        finite gets NaN curvature and one warning, never an exception in the user's loop."""
        started = time.perf_counter()
        op = self._operator()
        if not self._finite(op):
            return {
                "step/lambda_max": math.nan,
                "step/probe_loss": op.loss(),
                "step/seconds": time.perf_counter() - started,
            }
        eig = self.warm.solve(op)
        self._note_attention(op)
        gradient = op.gradient()
        lam = eig.lambda_max
        metrics = {
            "step/lambda_max": lam,
            "step/lambda_max_n_hvp": float(eig.n_hvp),
            "step/grad_alignment": gradient_alignment(gradient, eig.vectors),
            "step/grad_norm": float(gradient.double().norm()),
            "step/probe_loss": op.loss(),
        }
        if eig.cold_gap is not None:
            metrics["step/lambda_max_cold_gap"] = eig.cold_gap
            metrics["step/lambda_max_cold_n_hvp"] = float(eig.cold_n_hvp)
        # read once per measurement: batch sharpness and the edge use the same P
        edge = self.stability_edge()
        conditioner = self._preconditioner() if edge.preconditioned else (None, "")
        self._governing_is_batch = not edge.preconditioned
        metrics.update(self._edge_metrics(op, lam, "step/", edge, conditioner))
        if self.batch_sharpness_off:
            self.n_measurements += 1
            metrics["step/seconds"] = time.perf_counter() - started
            return metrics
        bs = self._batch_sharpness(op, conditioner[0])
        metrics.update(
            {
                "step/batch_sharpness": bs.value,
                "step/batch_sharpness_se": bs.stderr,
                "step/batch_sharpness_n": float(bs.n_batches),
            }
        )
        if "step/edge_ratio" in metrics:
            # for adaptive optimizers batch sharpness was taken in its preconditioned form
            metrics["step/batch_edge_ratio"] = bs.value / metrics["step/stability_threshold"]
        self.n_measurements += 1
        metrics["step/seconds"] = time.perf_counter() - started
        return metrics

    def _batch_sharpness(
        self, op: AnyHessianOperator, preconditioner: torch.Tensor | None
    ) -> BatchSharpnessResult:
        """Batch sharpness on the probe set, at the Tracker's batch size and settings."""
        return batch_sharpness(
            self.model,
            self.loss_fn,
            self.probe,
            self.step_settings.sampling(draw=self.n_measurements),
            scope=replace(self.scope, math_attention=op.math_attention),
            preconditioner=preconditioner,
        )

    # -- per epoch --------------------------------------------------------------------------
    def epoch(
        self, epoch: int, state: EpochState | None = None, *, final: bool = False
    ) -> dict[str, float]:
        """The epoch set at `epoch`, logged with step=epoch and returned. lossgeo's loop
        passes its EpochState; user code passes nothing. final=True adds the spectral
        density (artifacts `spectrum/eigen.pt` and `spectrum/density.pt`, sent to the
        logger's `log_object` if it has one)."""
        metrics, artifacts = self.measure_epoch(state, final=final)
        self.logger.log_metrics(metrics, step=epoch)
        log_object = getattr(self.logger, "log_object", None)  # optional in MetricLogger
        if log_object is not None:
            for path, obj in artifacts.items():
                log_object(path, obj)
        return metrics

    def measure_epoch(
        self, state: EpochState | None = None, *, final: bool = False
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """(metrics, artifacts) of the epoch set, neither logged nor written anywhere else:
        the caller records them. With lossgeo's EpochState, `state.is_last` means final, and
        the top eigenpairs are handed to the loop's later measurements in
        `state.cache["hessian_top"]` (landscapes along them). Under a process group an error
        on one rank ends every rank with its message (`distributed.collectively`)."""
        self.epoch_seconds = {}
        if self.curvature is None:
            return {}, {}
        final = final or (state is not None and state.is_last)
        with collectively(self.group, "epoch measurement"), outside_autocast():
            measured = self._epoch_curvature(final)
        if measured is None:
            return {}, {}
        measures, metrics = measured
        self.epoch_seconds["curvature"] = measures.seconds
        if state is not None and measures.top is not None:
            state.cache["hessian_top"] = measures.top
        return metrics, curvature_artifacts(measures, self.curvature)

    def _epoch_curvature(self, final: bool) -> tuple[CurvatureMeasures, dict[str, float]] | None:
        """The epoch set's curvature and its metrics (edge included); None when it was
        skipped because one sample does not fit in memory."""
        try:
            with PeakMemory(self._device) as peak:
                measures = self.measure_curvature(final=final)
        except MemoryError as error:  # one sample does not fit: train on without it
            if self.group is not None:
                raise  # alone, this rank would leave the others in a collective
            self._skip("curvature", error)
            return None
        metrics = curvature_metrics(measures)  # no lr: the edge comes next
        metrics["curvature_peak_mb"] = peak.megabytes
        # the optimizer's own edge (Nesterov, dampening, Adam's preconditioned form)
        metrics.update(self._edge_metrics(None, measures.lambda_max))
        return measures, metrics

    def measure_curvature(self, *, final: bool = False) -> CurvatureMeasures:
        """The epoch set's curvature (`lossgeo.curvature.measure_curvature` with this
        Tracker's probe, filter and settings); a non-finite probe loss warns once."""
        assert self.curvature is not None
        measures = measure_curvature(
            self.model, self.loss_fn, self.probe, self.curvature, scope=self.scope, final=final
        )
        if not measures.finite:
            self._warn_nonfinite(measures.probe_loss)
        elif measures.math_attention:
            self._note_attention_backend()
        return measures

    def _finite(self, op: AnyHessianOperator) -> bool:
        """Whether the probe loss and gradient are finite; warns once per Tracker when not."""
        if probe_is_finite(op):
            return True
        self._warn_nonfinite(op.loss())
        return False

    def _warn_nonfinite(self, loss: float) -> None:
        if not self._warned_nonfinite:
            log.warning(
                "lossgeo: the probe loss (%s) or its gradient is not finite: curvature "
                "is recorded as NaN until it is finite again",
                loss,
            )
            self._warned_nonfinite = True


def _logs(group: Any) -> bool:
    """Whether this process logs: one process, or rank 0 of the group."""
    if group is None:
        return True
    import torch.distributed as dist

    return dist.get_rank(group) == 0


class _NoLogger:
    """The logger of the ranks other than 0: they measure collectively, rank 0 logs."""

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass


__all__ = ["CurvatureSettings", "SGDStep", "Scope", "StepSettings", "Tracker"]
