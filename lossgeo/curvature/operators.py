r"""Curvature matrices of the mean training loss as matrix-free linear operators.

For parameters :math:`\theta \in \mathbb{R}^n` and the probe set split into batches
:math:`B_b` of sizes :math:`n_b` (:math:`N = \sum_b n_b`), the loss is

.. math:: L(\theta) = \sum_b \frac{n_b}{N}\, \ell(f_\theta(X_b), Y_b),

with :math:`\ell` mean-reduced, so a ragged last batch carries exactly its share. Operators:

- ``HessianOperator``: :math:`H = \nabla^2_\theta L`, exact Hessian-vector products.
- ``GGNOperator``: :math:`G = \sum_b \frac{n_b}{N} J_b^\top (\nabla^2_f \ell) J_b`, the
  generalised Gauss-Newton (Schraudolph 2002); PSD for convex losses.
- ``EmpiricalFisherOperator``: :math:`F = \frac1N \sum_i \nabla \ell_i \nabla \ell_i^\top`.

All products are evaluated in eval mode through ``torch.func.functional_call`` on detached
copies of the parameters: the model's parameters, buffers, ``.grad`` and ``training`` flag
are left exactly as they were.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
DataSource = Batch | Iterable[Batch]

HVP_METHODS = ("graph", "fwdrev")


def activation_bytes_per_sample(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of all leaf-module outputs for one sample (one no-grad eval forward pass)."""
    total = [0]

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with eval_mode(model), torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return max(total[0], 1)


def auto_chunk_size(model: nn.Module, x: torch.Tensor, budget_bytes: int = 48 * 2 ** 20) -> int:
    """Largest power-of-two chunk whose activations fit the budget (at least 64 samples).

    Measured on CPU (benchmarks/bench_curvature.py): one chunk of 2048 is fastest for the
    MNIST MLP, chunks of 512 for the CNN, whose conv activations otherwise spill the caches.
    """
    per_sample = activation_bytes_per_sample(model, x)
    chunk = 64
    while chunk * 2 * per_sample <= budget_bytes and chunk < len(x):
        chunk *= 2
    return chunk


def as_batches(data: DataSource, chunk_size: int | None = None) -> list[Batch]:
    """One (x, y) tuple or an iterable of them -> a list of batches of at most chunk_size."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        batches = [data]
    else:
        batches = [(x, y) for x, y in data]
    if not batches:
        raise ValueError("data: no batches given")
    if chunk_size:
        batches = [(x[i:i + chunk_size], y[i:i + chunk_size])
                   for x, y in batches for i in range(0, len(y), chunk_size)]
    return batches


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then each submodule's own flag restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class ParameterSpace:
    """Flattening between a dict of named parameters and one vector."""

    def __init__(self, model: nn.Module, names: Sequence[str] | None = None) -> None:
        named = dict(model.named_parameters())
        self.names = list(names) if names is not None else [
            n for n, p in named.items() if p.requires_grad]
        unknown = [n for n in self.names if n not in named]
        if unknown:
            raise ValueError(f"params: unknown parameter names {unknown}")
        # Detached copies: measurements never touch the model's tensors or their .grad.
        self.values = {n: named[n].detach().clone() for n in self.names}
        self.frozen = {n: p.detach() for n, p in named.items() if n not in self.values}
        self.shapes = [self.values[n].shape for n in self.names]
        self.sizes = [self.values[n].numel() for n in self.names]
        self.dim = sum(self.sizes)
        first = self.values[self.names[0]]
        self.dtype, self.device = first.dtype, first.device

    def flatten(self, tensors: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        items = [tensors[n] for n in self.names] if isinstance(tensors, dict) else tensors
        return torch.cat([t.reshape(-1) for t in items])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = torch.split(vector, self.sizes)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for n, size in zip(self.names, self.sizes):
            out[n] = slice(start, start + size)
            start += size
        return out


class CurvatureOperator:
    """A symmetric n x n curvature matrix, applied to flat vectors."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: DataSource, *,
                 params: Sequence[str] | None = None,
                 chunk_size: int | str | None = "auto") -> None:
        """chunk_size: samples per forward/backward chunk; "auto" sizes chunks by the
        model's activation memory, None keeps the batches as given."""
        self.model, self.loss_fn = model, loss_fn
        self.space = ParameterSpace(model, params)
        self.batches = as_batches(data, None)
        if chunk_size == "auto":
            chunk_size = auto_chunk_size(model, self.batches[0][0])
        self.batches = as_batches(self.batches, chunk_size)
        self.n_samples = sum(len(y) for _, y in self.batches)
        self.weights = [len(y) / self.n_samples for _, y in self.batches]
        self.n_matvec = 0

    @property
    def dim(self) -> int:
        return self.space.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.space.dtype

    @property
    def device(self) -> torch.device:
        return self.space.device

    def _forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**self.space.frozen, **params}, (x,))

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        vector = vector.to(self.dtype)
        with eval_mode(self.model):
            out = self._matvec(vector)
        self.n_matvec += 1
        return out

    def __matmul__(self, vector: torch.Tensor) -> torch.Tensor:
        return self.matvec(vector)

    def _matvec(self, vector: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The full matrix column by column (small models, tests)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(e) for e in eye], dim=1)


class HessianOperator(CurvatureOperator):
    """Exact Hessian-vector products of the mean loss.

    method="graph" (default, fastest on CPU, see benchmarks/bench_curvature.py): the
    gradient of each chunk is computed once with ``create_graph=True`` and its graph kept,
    so every product is one backward pass through it (double backward). Memory: one
    retained graph per chunk, i.e. the activations of the whole probe set.
    method="fwdrev": ``torch.func`` forward-over-reverse, ``jvp(grad(L))``; nothing kept
    between products (for probe sets whose graphs do not fit in memory).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: DataSource, *,
                 params: Sequence[str] | None = None,
                 chunk_size: int | str | None = "auto", method: str = "graph") -> None:
        if method not in HVP_METHODS:
            raise ValueError(f"method: must be one of {', '.join(HVP_METHODS)} (got {method!r})")
        super().__init__(model, loss_fn, data, params=params, chunk_size=chunk_size)
        self.method = method
        self._graphs: list[tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]] | None = None

    def _chunk_loss(self, params: dict[str, torch.Tensor], x, y) -> torch.Tensor:
        return self.loss_fn(self._forward(params, x), y)

    def _retained_gradients(self):
        if self._graphs is None:
            self._graphs = []
            with eval_mode(self.model), torch.enable_grad():
                for (x, y), w in zip(self.batches, self.weights):
                    leaves = {n: v.detach().requires_grad_(True)
                              for n, v in self.space.values.items()}
                    loss = w * self._chunk_loss(leaves, x, y)
                    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
                    self._graphs.append((list(leaves.values()), grads))
        return self._graphs

    def _matvec(self, vector: torch.Tensor) -> torch.Tensor:
        if self.method == "graph":
            return self.block_product(range(len(self.space.names)), vector, self.space)
        tangent = self.space.unflatten(vector)
        total = torch.zeros_like(vector)
        for (x, y), w in zip(self.batches, self.weights):
            gradient = grad(lambda p: self._chunk_loss(p, x, y))
            _, hv = jvp(gradient, (self.space.values,), (tangent,))
            total += w * self.space.flatten(hv)
        return total

    def block_product(self, positions: Iterable[int], vector: torch.Tensor,
                      space: ParameterSpace) -> torch.Tensor:
        """H_bb v for the parameters at `positions` (of self.space.names; `space` flattens
        them), through the retained graph: the vector-Jacobian product of those gradient
        entries with v, so no extra dot-product graph is built."""
        positions = list(positions)
        vs = list(space.unflatten(vector).values())
        total = None
        with torch.enable_grad():
            for leaves, grads in self._retained_gradients():
                hv = space.flatten(torch.autograd.grad(
                    [grads[i] for i in positions], [leaves[i] for i in positions],
                    grad_outputs=vs, retain_graph=True))
                total = hv if total is None else total.add_(hv)
        return total

    def gradient(self) -> torch.Tensor:
        """The full-batch gradient of the mean loss (flat)."""
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with eval_mode(self.model):
            for (x, y), w in zip(self.batches, self.weights):
                g = grad(lambda p: self._chunk_loss(p, x, y))(self.space.values)
                total += w * self.space.flatten(g)
        return total

    def loss(self) -> float:
        with eval_mode(self.model), torch.no_grad():
            return float(sum(w * self._chunk_loss(self.space.values, x, y)
                             for (x, y), w in zip(self.batches, self.weights)))


class HessianBlockOperator(CurvatureOperator):
    """A diagonal block H_bb of a HessianOperator (its parameters `names` varied, the rest
    fixed), multiplied through the parent's retained gradient graph: no graph of its own is
    built, so every layer of a network costs products only."""

    def __init__(self, parent: HessianOperator, names: Sequence[str]) -> None:
        if parent.method != "graph":
            raise ValueError("parent: a Hessian block shares the retained graph of a "
                             "HessianOperator with method='graph'")
        self.model, self.loss_fn, self.parent = parent.model, parent.loss_fn, parent
        self.space = ParameterSpace(parent.model, names)
        unknown = [n for n in self.space.names if n not in parent.space.names]
        if unknown:
            raise ValueError(f"params: {unknown} are not parameters of the parent operator")
        self.batches, self.weights = parent.batches, parent.weights
        self.n_samples, self.n_matvec = parent.n_samples, 0
        self._positions = [parent.space.names.index(n) for n in self.space.names]

    def _matvec(self, vector: torch.Tensor) -> torch.Tensor:
        return self.parent.block_product(self._positions, vector, self.space)


class _RetainedJacobianOperator(CurvatureOperator):
    """Products with J and J^T of a per-chunk output z(theta) through retained graphs.

    Per chunk, z is computed once and g(u) = J^T u is built with a dummy u that requires
    grad; then J v = d<g(u), v>/du is one backward pass through g's graph (the "double
    vjp" trick) and J^T w one backward pass through z's graph. A product needs no forward
    pass: measured 1.5-2x faster than torch.func jvp + vjp, which recompute the forward."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: DataSource, *,
                 params: Sequence[str] | None = None,
                 chunk_size: int | str | None = "auto") -> None:
        super().__init__(model, loss_fn, data, params=params, chunk_size=chunk_size)
        self._retained: list[dict] | None = None

    def _outputs(self, params: dict[str, torch.Tensor], x, y) -> torch.Tensor:
        raise NotImplementedError

    def _prepare(self, chunk: dict) -> None:
        """Anything else the middle matrix needs from a chunk, built once."""

    def _apply_middle(self, chunk: dict, jv: torch.Tensor) -> torch.Tensor:
        """The matrix between J^T and J, applied to J v (already weighted)."""
        raise NotImplementedError

    def _chunks(self) -> list[dict]:
        if self._retained is None:
            self._retained = []
            with eval_mode(self.model), torch.enable_grad():
                for (x, y), w in zip(self.batches, self.weights):
                    leaves = [v.detach().requires_grad_(True) for v in self.space.values.values()]
                    z = self._outputs(dict(zip(self.space.names, leaves)), x, y)
                    u = torch.zeros_like(z, requires_grad=True)
                    jtu = torch.autograd.grad(z, leaves, grad_outputs=u, create_graph=True)
                    chunk = {"leaves": leaves, "z": z, "u": u, "jtu": jtu, "y": y, "w": w}
                    self._prepare(chunk)
                    self._retained.append(chunk)
        return self._retained

    def _matvec(self, vector: torch.Tensor) -> torch.Tensor:
        vs = list(self.space.unflatten(vector).values())
        total = None
        with torch.enable_grad():
            for chunk in self._chunks():
                (jv,) = torch.autograd.grad(chunk["jtu"], chunk["u"], grad_outputs=vs,
                                            retain_graph=True)
                pulled = torch.autograd.grad(chunk["z"], chunk["leaves"],
                                             grad_outputs=self._apply_middle(chunk, jv),
                                             retain_graph=True)
                flat = self.space.flatten(pulled)
                total = flat if total is None else total.add_(flat)
        return total


class GGNOperator(_RetainedJacobianOperator):
    """Generalised Gauss-Newton J^T (d^2 loss / d output^2) J of the network outputs."""

    def _outputs(self, params, x, y):
        return self._forward(params, x)

    def _prepare(self, chunk):
        # the loss Hessian in output space, as a retained graph of the loss gradient
        out = chunk["z"].detach().requires_grad_(True)
        chunk["out"] = out
        chunk["loss_grad"] = torch.autograd.grad(self.loss_fn(out, chunk["y"]), out,
                                                 create_graph=True)[0]

    def _apply_middle(self, chunk, jv):
        (hjv,) = torch.autograd.grad(chunk["loss_grad"], chunk["out"], grad_outputs=jv,
                                     retain_graph=True, allow_unused=True,
                                     materialize_grads=True)  # zero for piecewise-linear losses
        return chunk["w"] * hjv


class EmpiricalFisherOperator(_RetainedJacobianOperator):
    """(1/N) sum_i grad l_i grad l_i^T v = (1/N) J_l^T (J_l v), where J_l is the Jacobian
    of the vector of per-sample losses."""

    def _outputs(self, params, x, y):
        out = self._forward(params, x)
        return vmap(lambda o, t: self.loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y)

    def _apply_middle(self, chunk, jv):
        return jv / self.n_samples


MATRICES: dict[str, type[CurvatureOperator]] = {
    "hessian": HessianOperator, "ggn": GGNOperator, "fisher": EmpiricalFisherOperator}


def make_operator(matrix: str, model: nn.Module, loss_fn: LossFn, data: DataSource,
                  **options) -> CurvatureOperator:
    if matrix not in MATRICES:
        raise ValueError(f"matrix: must be one of {', '.join(MATRICES)} (got {matrix!r})")
    if matrix != "hessian":
        options.pop("method", None)
    return MATRICES[matrix](model, loss_fn, data, **options)
