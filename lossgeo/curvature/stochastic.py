r"""Curvature seen by mini-batch SGD, for per-step tracking.

Batch sharpness (Andreyev & Beneventano 2024, "edge of stochastic stability"): the curvature
of each mini-batch's own loss along its own gradient, averaged over mini-batches,

.. math:: \mathrm{BS} = \mathbb{E}_B\left[\frac{g_B^\top H_B\, g_B}{\lVert g_B\rVert^2}\right],

estimated by Monte Carlo over mini-batches of the probe set until the standard error of the
mean is below `rel_se` of it (or the probe set is used up). One gradient and one
Hessian-vector product per mini-batch.

Gradient alignment (Gur-Ari, Roberts & Dyer 2018): the share of the full probe gradient's
squared norm in the span of the top-k Hessian eigenvectors, ||V^T g||^2 / ||g||^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

from .batches import AnyLossFn, DataSource, as_batches, is_tensor_pair
from .distributed import all_gather, all_reduce, unwrap
from .operators import HessianOperator, full_precision
from .params import ParameterSpace
from .scope import Scope
from .sharded import is_sharded


@dataclass(frozen=True)
class BatchSharpnessResult:
    """value: the mean over the mini-batches used; stderr: its standard error (inf with one
    batch); n_batches: how many; n_hvp: products (one per batch)."""

    value: float
    stderr: float
    n_batches: int
    n_hvp: int


def minibatches(probe: DataSource, batch_size: int | None, generator: torch.Generator) -> list[Any]:
    """The probe set as mini-batches in random order: (x, y) pairs shuffled and cut into
    batches of `batch_size`; a list of batches (any kind) shuffled as given."""
    batches = as_batches(probe, None)
    if len(batches) == 1 and is_tensor_pair(batches[0]):
        x, y = batches[0]
        if batch_size is None or batch_size < 1:
            raise ValueError(
                "batch_size: batch sharpness needs the training batch size "
                "to cut an (x, y) probe set into mini-batches"
            )
        batch_size = min(batch_size, len(y))  # a probe smaller than one batch: the whole probe
        samples = torch.randperm(len(y), generator=generator)
        return [(x[idx], y[idx]) for idx in samples.split(batch_size) if len(idx) == batch_size]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


@dataclass(frozen=True)
class BatchSampling:
    """How batch sharpness samples the probe set.

    Attributes:
        batch_size: the training batch size, to cut an (x, y) probe set into mini-batches
            (a list-of-batches probe is used as given).
        rel_se: the Monte Carlo stops once the standard error is below this share of the mean.
        min_batches: mini-batches at least (before the standard error may stop it).
        max_batches: mini-batches at most.
        seed: the mini-batch draws.
    """

    batch_size: int | None = None
    rel_se: float = 0.1
    min_batches: int = 4
    max_batches: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        """Bad options fail here, in one line."""
        if not self.rel_se >= 0 or not 1 <= self.min_batches <= self.max_batches:
            raise ValueError(
                "batch sharpness: need rel_se >= 0 and 1 <= min_batches <= max_batches"
            )
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ValueError(f"batch_size: must be a whole number >= 1 (got {self.batch_size!r})")


@full_precision
def batch_sharpness(
    model: nn.Module,
    loss_fn: AnyLossFn,
    probe: DataSource,
    sampling: BatchSampling = BatchSampling(),
    *,
    scope: Scope = Scope(),
    preconditioner: torch.Tensor | None = None,
) -> BatchSharpnessResult:
    """E_B[g_B^T H_B g_B / ||g_B||^2] over mini-batches of the probe set (module docstring),
    drawn as `sampling` says.
    With a diagonal `preconditioner` P (flat, in the order of `scope.params`; Adam's
    sqrt(v_hat) + eps), the preconditioned form E_B[u^T H_B u / u^T P u] with u = P^-1 g_B:
    the curvature along the step the adaptive optimizer takes, to compare with its
    threshold on P^-1/2 H P^-1/2.
    A batch whose gradient vanishes contributes nothing (its ratio is undefined).
    scope.math_attention: start under the math attention backend; once one batch's operator
    falls back to it, the later batches start there too.
    scope.process_group: `probe` is this rank's shard. For an (x, y) shard (the shards in
    rank order make the whole probe set, as `tensor_split` cuts it), the mini-batches are
    those one process draws from the whole set with the same seed: each rank takes the
    samples of a batch that it holds, and the batch's gradient and product are summed over
    the ranks (one all-reduce each), so every rank returns the single-process estimate. For
    a list of batches, each round every rank draws one batch of its own shard and the
    rounds' ratios are gathered. None: one process."""
    scope = scope.resolved()
    group = scope.process_group
    rank, world = _rank_and_size(group)
    model = unwrap(model)
    shard = as_batches(probe, None)
    pair = len(shard) == 1 and is_tensor_pair(shard[0])
    if is_sharded(model) and not pair:
        raise ValueError("batch sharpness of a sharded (FSDP) model: needs an (x, y) probe shard")
    if (group is not None or is_sharded(model)) and pair:
        return _global_batch_sharpness(model, loss_fn, shard[0], sampling, scope, preconditioner)
    gen = torch.Generator().manual_seed(sampling.seed + 7919 * rank)  # each shard its own draws
    ratios: list[float] = []
    n_hvp = 0
    space = ParameterSpace(model, scope.params)  # one copy of the parameters for every batch
    batches = minibatches(probe, sampling.batch_size, gen)
    # every rank takes part in the same number of rounds: as many as the smallest shard has
    rounds = min(len(batches), max(1, math.ceil(sampling.max_batches / world)))
    if group is not None:
        rounds = _min_over(rounds, group)
    math_attention = scope.math_attention
    for batch in batches[:rounds]:
        op = HessianOperator(
            model,
            loss_fn,
            [batch],
            scope=_per_batch(scope, math_attention),
            space=space,
        )
        g = op.gradient()
        direction = g if preconditioner is None else g / preconditioner.to(g)
        norm_sq = float(torch.dot(g.double(), direction.double()))  # u^T P u, or ||g||^2
        ratio = math.nan
        if norm_sq != 0.0 and math.isfinite(norm_sq):
            ratio = float(torch.dot(direction.double(), (op @ direction).double())) / norm_sq
            n_hvp += 1
        # a vanished gradient contributes nothing (NaN, dropped), on every rank alike
        ratios += [r for r in _gathered(ratio, group, world) if not math.isnan(r)]
        math_attention = op.math_attention
        if _precise_enough(ratios, sampling.min_batches, sampling.rel_se):
            break
    return _result(ratios, n_hvp)


def _global_batch_sharpness(
    model: nn.Module,
    loss_fn: AnyLossFn,
    shard: tuple[torch.Tensor, torch.Tensor],
    sampling: BatchSampling,
    scope: Scope,
    preconditioner: torch.Tensor | None,
) -> BatchSharpnessResult:
    """Batch sharpness over the mini-batches one process would draw from the whole probe
    set, each spread over the ranks that hold its samples (see `batch_sharpness`). A
    sharded (FSDP) model takes each batch's gradient and product by differences through
    the model, every rank passing its part of the batch, or a placeholder sample of weight
    0 when it holds none (every pass is collective); any other model, by exact products on
    this rank's part, summed over the group."""
    x, y = shard
    sharded = is_sharded(model)
    group, params, math_attention = scope.process_group, scope.params, scope.math_attention
    if sharded:
        from .sharded import ShardedHessianOperator, mesh_group

        group = mesh_group(model)
        if not len(y):
            raise ValueError("probe: batch sharpness of a sharded model needs a sample a rank")
    offset, order = _global_order(len(y), group, sampling.batch_size, sampling.seed)
    space = None if sharded else ParameterSpace(model, params)

    def parts(mine: torch.Tensor, share: float) -> tuple[torch.Tensor, Callable]:
        """The batch's gradient (summed over the ranks) and its product function."""
        nonlocal math_attention
        if sharded:
            batch = (x[mine], y[mine]) if len(mine) else (x[:1], y[:1])
            sharded_op = ShardedHessianOperator(
                model, loss_fn, [batch], scope=_per_batch(scope, math_attention)
            )
            sharded_op.reweigh([share])
            return sharded_op.gradient(), sharded_op.matvec
        assert space is not None
        if not len(mine):  # no sample of this batch here: nothing to add
            nothing = torch.zeros(space.dim, dtype=space.dtype, device=space.device)
            return _summed(nothing, group), lambda u: _summed(torch.zeros_like(u), group)
        op = HessianOperator(
            model, loss_fn, [(x[mine], y[mine])], scope=_per_batch(scope, math_attention),
            space=space,
        )  # fmt: skip
        math_attention = op.math_attention
        return _summed(op.gradient() * share, group), lambda u: _summed((op @ u) * share, group)

    ratios: list[float] = []
    n_hvp = 0
    for indices in order[: sampling.max_batches]:
        mine = indices[(indices >= offset) & (indices < offset + len(y))] - offset
        # this rank's part of the batch's mean loss
        g, product = parts(mine, len(mine) / len(indices))
        direction = g if preconditioner is None else g / preconditioner.to(g)
        norm_sq = float(torch.dot(g.double(), direction.double()))
        if norm_sq == 0.0 or not math.isfinite(norm_sq):
            continue  # a vanished gradient contributes nothing, on every rank alike
        ratios.append(float(torch.dot(direction.double(), product(direction).double())) / norm_sq)
        n_hvp += 1
        if _precise_enough(ratios, sampling.min_batches, sampling.rel_se):
            break
    return _result(ratios, n_hvp)


def _per_batch(scope: Scope, math_attention: bool) -> Scope:
    """The scope of one mini-batch's operator: the batch whole (no chunks), not sized in
    advance (a mini-batch's graph is small), by double backward in the parameters' dtype,
    in this process (the ratios are gathered over the group, not the products)."""
    return replace(
        scope,
        chunk_size=None,
        max_memory=None,
        hvp_method="graph",
        compute_dtype=None,
        process_group=None,
        math_attention=math_attention,
    )


def _global_order(
    n_local: int, group: Any, batch_size: int | None, seed: int
) -> tuple[int, list[torch.Tensor]]:
    """(this rank's offset in the whole probe set, the whole set's mini-batches as sample
    indices in the seeded order one process draws them with rank 0's generator)."""
    sizes = [int(t[0]) for t in all_gather(torch.tensor([n_local], dtype=torch.int64), group)]
    offset, total = sum(sizes[: _rank_and_size(group)[0]]), sum(sizes)
    batches = minibatches(
        (torch.arange(total), torch.zeros(total)), batch_size, torch.Generator().manual_seed(seed)
    )
    return offset, [indices for indices, _ in batches]


def _precise_enough(ratios: list[float], min_batches: int, rel_se: float) -> bool:
    """Whether the Monte Carlo may stop: enough batches, and a standard error below rel_se
    of the mean."""
    if len(ratios) < max(min_batches, 2):
        return False
    mean, se = _mean_se(ratios)
    return se <= rel_se * abs(mean)


def _result(ratios: list[float], n_hvp: int) -> BatchSharpnessResult:
    if not ratios:
        raise ValueError("batch sharpness: every mini-batch gradient vanished")
    mean, se = _mean_se(ratios)
    return BatchSharpnessResult(value=mean, stderr=se, n_batches=len(ratios), n_hvp=n_hvp)


def _summed(vector: torch.Tensor, group: Any) -> torch.Tensor:
    """A copy of `vector` summed over the ranks (the input is never reduced in place)."""
    return all_reduce(vector.clone(), group)


def _rank_and_size(group: Any) -> tuple[int, int]:
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def _min_over(value: int, group: Any) -> int:
    return int(all_reduce(torch.tensor([value], dtype=torch.int64), group, "min")[0])


def _gathered(value: float, group: Any, world: int) -> list[float]:
    """`value` from every rank of `group`, in rank order ([value] for one process)."""
    if group is None:
        return [value]
    return [float(t[0]) for t in all_gather(torch.tensor([value], dtype=torch.float64), group)]


def _mean_se(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    if len(values) < 2:
        return float(t.mean()), math.inf
    return float(t.mean()), float(t.std() / math.sqrt(len(values)))


def gradient_alignment(gradient: torch.Tensor, vectors: torch.Tensor) -> float:
    """||V^T g||^2 / ||g||^2 for orthonormal rows V (k, n): 1 when g lies in their span."""
    g = gradient.double()
    norm_sq = float(g.pow(2).sum())
    if norm_sq == 0.0:
        return 0.0
    projected = vectors.double() @ g
    return float(projected.pow(2).sum()) / norm_sq
