r"""Hessian products of a model whose parameters are sharded (FSDP2 ``fully_shard``).

Under ``fully_shard`` every parameter is a DTensor holding one slice of the full tensor per
rank; a forward pass all-gathers the slices and a backward pass reduce-scatters the
gradients. Double backward does not go through that (PyTorch 2.14: "appears to not have
been used in the graph"), so products are central differences of gradients,

.. math:: H v \approx \frac{g(w + h v) - g(w - h v)}{2h},

each gradient one ordinary forward and backward pass of the sharded model, collectively.
Each rank holds its shard of the probe set, as it does for training. The vectors the
solvers work on are full and replicated (the same on every rank, as in `distributed.py`),
so the Lanczos, Hutchinson and SLQ code runs unchanged: a rank perturbs its own slice of
the parameters by ``h v``, and the gathered gradient is the product. Memory per rank: the
model's shards and activations, plus the solver's full-length vectors (k + a few).

Weights: FSDP averages the ranks' gradients (it divides the reduce-scatter by the world
size unless told otherwise), so each rank scales its loss by ``W n_b / N``; the average is
then the size-weighted mean over all N probe samples, uneven shards included. Every rank
must run the same number of forward and backward passes (each is collective), so a rank
with fewer chunks adds passes of weight 0.

The step ``h`` and its bias are those of ``HessianOperator(method="fd")``: float64 is
accurate to about 1e-9 at the default step, float32 only on smooth networks
(benchmarks/results/fd_step.md). The model's parameters and ``.grad`` are restored exactly
after every product (the perturbed slices are copied back from a saved copy, not
subtracted).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .batches import AnyLossFn, DataSource, eval_mode
from .distributed import all_reduce, all_sum_float
from .linear import LambdaOperator
from .operators import FD_STEPS, CurvatureOperator
from .params import ParameterSpace, select_parameters
from .scope import Scope


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are DTensors (FSDP2 `fully_shard`, tensor parallel).
    An FSDP module counts even while its parameters are gathered (after a forward pass
    without backward, FSDP2 swaps the full tensors in)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    return any(isinstance(m, FSDPModule) for m in model.modules()) or any(
        isinstance(p, DTensor) for p in model.parameters()
    )


def mesh_group(model: nn.Module) -> Any:
    """The process group a sharded model's parameters are spread over."""
    from torch.distributed.tensor import DTensor

    reshard(model)  # while gathered, the module holds plain tensors, not DTensors
    first = next(p for p in model.parameters() if isinstance(p, DTensor))
    return first.device_mesh.get_group()


def reshard(model: nn.Module) -> None:
    """Free every FSDP module's gathered (unsharded) parameters. The root module keeps them
    after a forward pass without backward (FSDP2 does not reshard the root after forward),
    and its next forward would then use them instead of gathering the slices just moved."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class ShardedParameterSpace(ParameterSpace):
    """Full-length flat vectors over the selected parameters of a sharded model, and each
    rank's slice of them. `values` are this rank's slices, saved (the measurement's point)."""

    def __init__(self, model: nn.Module, names: Sequence[str] | str | None = None) -> None:
        reshard(model)  # the sharded parameters registered, not gathered copies
        named = dict(model.named_parameters())
        self.names = select_parameters(model, names)
        self.params: dict[str, Any] = {n: named[n] for n in self.names}  # DTensors
        self.shapes = [self.params[n].shape for n in self.names]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.dim = sum(self.sizes)
        self.values = {n: p.to_local().detach().clone() for n, p in self.params.items()}
        first = self.values[self.names[0]]
        self.dtype, self.device = first.dtype, first.device
        self.frozen: dict[str, torch.Tensor] = {}

    def local_slices(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """This rank's slice of each parameter's part of a full (replicated) vector; no
        communication (`src_data_rank=None`: every rank already holds the full vector)."""
        from torch.distributed.tensor import distribute_tensor

        out = {}
        for name, full in self.unflatten(vector).items():
            p = self.params[name]
            out[name] = distribute_tensor(
                full, p.device_mesh, p.placements, src_data_rank=None
            ).to_local()
        return out

    def gathered(self, slices: dict[str, torch.Tensor]) -> torch.Tensor:
        """One full flat vector from every rank's slices (one all-gather per parameter)."""
        from torch.distributed.tensor import DTensor

        parts = []
        for name in self.names:
            p = self.params[name]
            parts.append(
                DTensor.from_local(
                    slices[name], p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                ).full_tensor()
            )
        return self.flatten(parts)


class ShardedHessianOperator(CurvatureOperator):
    """The Hessian of the mean loss over all ranks' probe shards, for a sharded model, by
    differences of gradients (see the module docstring). Products need no all-reduce of
    their own: the gathered gradient is already the whole probe set's."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: AnyLossFn,
        data: DataSource,
        *,
        scope: Scope = Scope(),
        fd_step: float | None = None,
    ) -> None:
        """scope: as `CurvatureOperator`'s, with the process group the mesh's and products
        by differences of gradients ("graph", the default, and "fd" both mean those)."""
        if scope.hvp_method not in ("fd", "graph"):
            raise ValueError(
                f"hvp_method: a sharded (FSDP) model takes products by differences of "
                f"gradients only, hvp_method='fd' (got {scope.hvp_method!r})"
            )
        if fd_step is not None and not fd_step > 0:
            raise ValueError(f"fd_step: must be > 0 (got {fd_step!r})")
        sharded_space = ShardedParameterSpace(model, scope.params)
        first = sharded_space.params[sharded_space.names[0]]
        mesh_group = first.device_mesh.get_group()
        scope = replace(scope, process_group=mesh_group)
        super().__init__(model, loss_fn, data, scope=scope, space=sharded_space)
        self.sharded = sharded_space
        self.method = "fd"
        self.fd_step = fd_step if fd_step is not None else FD_STEPS.get(self.dtype, 3e-3)
        import torch.distributed as dist

        self.world_size = dist.get_world_size(mesh_group)
        # the same number of (collective) passes on every rank: pad with weight-0 chunks
        counts = all_reduce(torch.tensor([len(self.batches)], dtype=torch.int64), mesh_group, "max")
        self.passes = list(zip(self.batches, self.weights))
        self.passes += [(self.batches[-1], 0.0)] * (int(counts[0]) - len(self.batches))
        squares = all_sum_float(
            sum(float(w.double().pow(2).sum()) for w in sharded_space.values.values()),
            mesh_group,
        )
        self._fd_scale = 1.0 + math.sqrt(squares)
        self.n_gradients = 0

    def reweigh(self, weights: Sequence[float]) -> None:
        """Each of this rank's batches weighted by `weights` (its share of the whole loss
        over all ranks) instead of by its size: for a loss that is not the mean over the
        ranks' shards, such as one mini-batch spread over the ranks, where a rank holding
        none of it passes a placeholder batch of weight 0 (every pass is collective)."""
        if len(weights) != len(self.batches):
            raise ValueError(f"weights: one per batch ({len(self.batches)}, got {len(weights)})")
        padding = [(batch, 0.0) for batch, _ in self.passes[len(self.batches) :]]
        self.passes = [(b, float(w)) for b, w in zip(self.batches, weights)] + padding

    def _fit_memory(self, max_memory: int | str) -> None:
        """ "auto" (the default of the settings) leaves the chunks as they are; a given
        budget cannot be met yet: measuring a chunk's graph takes passes of the sharded
        model, collective, that every rank would have to run alike."""
        if max_memory != "auto":
            raise ValueError("max_memory: sizing in advance is not built for sharded models yet")
        self.memory_note = "not sized in advance (sharded model)"

    def _difference_step(self, vector: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
        """(h, this rank's slices of v): the central difference's step along `vector`
        (h = fd_step (1 + ||w||) / ||v||; nonzero v), counted as one product."""
        self.n_matvec += 1
        h = self.fd_step * self._fd_scale / float(vector.double().norm())
        return h, self.sharded.local_slices(vector.to(self.dtype))

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        """H V column by column (each product is collective)."""
        return torch.stack([self.matvec(column) for column in block.unbind(1)], dim=1)

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        if not vector.any():
            return torch.zeros_like(vector, dtype=self.dtype)
        h, step = self._difference_step(vector)
        plus = self._local_gradient_at({n: h * s for n, s in step.items()})
        minus = self._local_gradient_at({n: -h * s for n, s in step.items()})
        # the difference of the slices, gathered once
        return self.sharded.gathered({n: (plus[n] - minus[n]) / (2.0 * h) for n in plus})

    def _direct_loss(self, batch: Any) -> torch.Tensor:
        """The batch's loss through the sharded model itself (its hooks gather the shards)."""
        if self.objective.form == "model_batch":
            return self.loss_fn(self.model, batch)  # type: ignore[call-arg, arg-type]
        x, y = batch
        return self.loss_fn(self.model(x), y)  # type: ignore[call-arg, arg-type]

    def _local_gradient_at(
        self,
        shift: dict[str, torch.Tensor] | None,
        pass_loss: Callable[[int, Any], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """This rank's slices of the mean loss's gradient with its parameter slices moved by
        `shift`; with `pass_loss(i, batch)`, of the sum of that over the passes instead
        (each pass's share of the whole, as the loss's weight n_b / N is)."""
        with self._moved(shift or {}):
            params = dict(self.model.named_parameters())
            saved_grads = {n: p.grad for n, p in params.items()}
            try:
                for p in params.values():
                    p.grad = None
                with eval_mode(self.model), torch.enable_grad(), self._attention():
                    for i, (batch, weight) in enumerate(self.passes):
                        part = (
                            weight * self._direct_loss(batch)
                            if pass_loss is None
                            else pass_loss(i, batch)
                        )
                        (self.world_size * part).backward()
                self.n_gradients += 1
                return {
                    n: (
                        torch.zeros_like(self.space.values[n])
                        if p.grad is None
                        else p.grad.to_local().clone()
                    )
                    for n, p in self.sharded.params.items()
                }
            finally:
                for n, p in params.items():
                    p.grad = saved_grads[n]

    @contextlib.contextmanager
    def _moved(self, shift: dict[str, torch.Tensor]) -> Iterator[None]:
        """This rank's parameter slices moved by `shift` for the duration, then copied back
        from the saved point (exactly, not subtracted). Resharded on the way in and out:
        while gathered, the module holds full copies in place of the sharded parameters
        (their .grad is not the one training reads, and a forward pass would not see the
        moved slices), and a forward pass without backward leaves the root gathered."""
        reshard(self.model)
        try:
            with torch.no_grad():
                for name, delta in shift.items():
                    self.sharded.params[name].to_local().add_(delta)
            yield
        finally:
            with torch.no_grad():
                for name, value in self.space.values.items():
                    self.sharded.params[name].to_local().copy_(value)
            reshard(self.model)

    def gradient(self) -> torch.Tensor:
        return self.sharded.gathered(self._local_gradient_at(None))

    def loss(self) -> float:
        total = 0.0
        try:
            with eval_mode(self.model), torch.no_grad(), self._attention():
                for batch, weight in self.passes:
                    total += weight * float(self._direct_loss(batch))
        finally:
            # a forward pass without backward leaves the root's parameters gathered: the
            # training loop's next forward would use them after its optimizer step
            reshard(self.model)
        return all_sum_float(total, self.group)


def block_operator(op: ShardedHessianOperator, names: Sequence[str]) -> LambdaOperator:
    """The diagonal block H_bb of a sharded model's Hessian (its parameters `names` varied,
    the rest fixed). Each product is one difference product of the full Hessian with the
    vector embedded (zeros elsewhere), read back on the block: no cheaper than a full
    product, unlike the exact blocks, which share one retained graph."""
    unknown = [n for n in names if n not in op.space.names]
    if unknown:
        raise ValueError(f"params: {unknown} are not parameters of the parent operator")
    where = op.space.slices()
    index = torch.cat([torch.arange(where[n].start, where[n].stop) for n in names])
    index = index.to(op.device)

    def product(vector: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(op.dim, dtype=op.dtype, device=op.device)
        full[index] = vector.to(op.dtype)
        return (op @ full)[index]

    return LambdaOperator(product, len(index), dtype=op.dtype, device=op.device)


class ShardedOutputCurvatureOperator(ShardedHessianOperator):
    """The GGN (J^T H_out J) or the empirical Fisher ((1/N) sum_i g_i g_i^T) of a sharded
    model, for loss_fn(output, target) with a mean over samples. J v comes from a central
    difference of two forward passes, J^T u from one backward pass of (f . u), so a product
    costs two forward passes and one gradient, and needs neither double backward nor
    forward-mode AD through FSDP.

    In output space: the GGN's u is the Hessian of each batch's mean loss in its outputs
    times J v (exact, by torch.func); the Fisher's is r_i (r_i . J_i v) / N, with r_i the
    gradient of sample i's own loss in its outputs (g_i = J_i^T r_i)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: AnyLossFn,
        data: DataSource,
        *,
        matrix: str,
        scope: Scope = Scope(),
    ) -> None:
        if matrix not in ("ggn", "fisher"):
            raise ValueError(f"matrix: 'ggn' or 'fisher' (got {matrix!r})")
        super().__init__(model, loss_fn, data, scope=replace(scope, hvp_method="fd"))
        if self.objective.form != "output_target":
            raise ValueError(f"loss_fn: the {matrix.upper()} needs loss_fn(output, target)")
        self.matrix = matrix

    def _outputs_at(self, shift: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Each pass's network outputs with this rank's parameter slices moved by `shift`."""
        with self._moved(shift), eval_mode(self.model), torch.no_grad(), self._attention():
            return [self.model(batch[0]) for batch, _ in self.passes]

    def _output_vector(
        self, out: torch.Tensor, target: torch.Tensor, jv: torch.Tensor, weight: float
    ) -> torch.Tensor:
        """u for one pass: the middle matrix applied to J v, times the pass's share."""
        from torch.func import grad, jvp, vmap

        loss_fn: Any = self.loss_fn

        def batch_loss(o: torch.Tensor) -> torch.Tensor:
            return loss_fn(o, target)

        if self.matrix == "ggn":
            h_jv = jvp(grad(batch_loss), (out,), (jv,))[1]
            return weight * h_jv
        residuals = vmap(grad(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0))))(out, target)
        along = (residuals * jv).flatten(1).sum(1)  # g_i . v, one per sample
        share = 0.0 if weight == 0.0 else 1.0 / self.n_samples  # a padding pass adds nothing
        return share * residuals * along.view(-1, *[1] * (residuals.dim() - 1))

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        if not vector.any():
            return torch.zeros_like(vector, dtype=self.dtype)
        h, step = self._difference_step(vector)
        plus = self._outputs_at({n: h * s for n, s in step.items()})
        minus = self._outputs_at({n: -h * s for n, s in step.items()})
        # the outputs at w are (f(w + hv) + f(w - hv)) / 2 to O(h^2), as J v is: the middle
        # matrix taken at f(w + hv) instead was off by O(h) (4e-7 at the float64 step)
        middle = [
            self._output_vector((p + m) / 2.0, batch[1], (p - m) / (2.0 * h), weight)
            for p, m, (batch, weight) in zip(plus, minus, self.passes)
        ]

        def transposed(i: int, batch: Any) -> torch.Tensor:  # f . u, whose gradient is J^T u
            return (self.model(batch[0]) * middle[i]).sum()

        return self.sharded.gathered(self._local_gradient_at(None, transposed))
