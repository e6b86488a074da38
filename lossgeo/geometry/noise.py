r"""Gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training").

With per-sample gradients :math:`g_i` on N samples, :math:`G = \frac1N\sum_i g_i` and the
unbiased per-sample covariance trace
:math:`\mathrm{tr}\,\Sigma = \frac{1}{N-1}\sum_i \lVert g_i - G\rVert^2`, the simple noise
scale is :math:`B_\text{simple} = \mathrm{tr}\,\Sigma / \lVert G\rVert^2`: the batch size at
which the gradient's noise and signal are of the same size. In chunks, in eval mode; the
model is left untouched. Only the per-sample squared norms and the mean are needed, so:

- A chain of Linear layers and per-sample elementwise modules (an ``nn.Sequential``, or a
  model's ``as_sequence()``, e.g. the MLP) needs no per-sample gradient at all: sample i's
  gradient of a Linear weight is the outer product :math:`\delta_i a_i^\top` of the layer's
  output gradient and input, whose squared norm is :math:`\lVert\delta_i\rVert^2
  \lVert a_i\rVert^2` (Goodfellow 2015; ``lossgeo.curvature.persample``). One forward and
  one backward per chunk.
- Any other model: per-sample gradients from ``torch.func.vmap(grad)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from lossgeo.curvature.distributed import (
    all_sum_float,
    all_sum_tensor,
    resolve_group,
    total_count,
)
from lossgeo.curvature.operators import DataSource, LossFn, ParameterSpace, as_batches, eval_mode
from lossgeo.curvature.persample import LayerFactors, chain_factors, linear_chain

# one chunk: (sum over its samples of ||g_i||^2, the chunk's mean gradient per parameter)
ChunkMoments = tuple[float, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class NoiseScale:
    b_simple: float
    trace_covariance: float
    gradient_norm_sq: float
    n_samples: int


def gradient_noise_scale(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataSource,
    *,
    chunk_size: int = 64,
    process_group: Any = None,
) -> NoiseScale:
    """B_simple on `data` (see the module docstring). process_group: `data` is this rank's
    shard; the shards' moments are merged exactly (two all-reduces)."""
    group = resolve_group(process_group)
    space = ParameterSpace(model)
    batches = [b for b in as_batches(data, chunk_size) if len(b[1])]

    def sample_loss(params, x, y):
        out = functional_call(model, {**space.frozen, **params}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    chain = linear_chain(model, space)

    def moments(x: torch.Tensor, y: torch.Tensor) -> ChunkMoments:
        if chain is not None:
            return _chain_moments(chain_factors(chain, loss_fn, x, y))
        g = per_sample(space.values, x, y)
        b, row_sq, means = len(y), 0.0, {}
        for name in space.names:
            t = g[name].reshape(b, -1)
            means[name] = t.mean(dim=0).double().view(space.values[name].shape)
            # squared in place when it can be: the per-sample gradients are used no more,
            # and a fresh (chunk x parameters) temporary costs more in page faults than the
            # arithmetic; torch's cascade sum (a float32 einsum was off by 6e-5)
            squares = t.square_() if t.is_contiguous() else t * t
            row_sq += float(squares.sum(dim=1).double().sum())
        return row_sq, means

    # Chunks are merged by Chan et al.'s pairwise update of (count, mean, sum of squared
    # deviations): sum ||g_i||^2 - b ||mean||^2 cancels only within a chunk of b samples,
    # never over the whole probe set, where n ||G||^2 can be most of sum ||g_i||^2
    mean = {
        name: torch.zeros(v.shape, dtype=torch.float64, device=space.device)
        for name, v in space.values.items()
    }
    m2 = 0.0
    n = 0
    with eval_mode(model):
        for x, y in batches:
            b = len(y)
            total = n + b
            row_sq, chunk_means = moments(x, y)
            m2 += row_sq - b * float(sum(m.pow(2).sum() for m in chunk_means.values()))
            for name, chunk_mean in chunk_means.items():
                delta = chunk_mean - mean[name]
                m2 += float(delta.pow(2).sum()) * n * b / total
                mean[name] += delta * (b / total)
            n = total
    if group is not None:
        n, m2 = _merge_shards(n, mean, m2, group)
    if n < 2:
        raise ValueError("data: the noise scale needs at least 2 samples")
    g_sq = float(sum(m.pow(2).sum() for m in mean.values()))
    trace = m2 / (n - 1)
    return NoiseScale(
        b_simple=trace / g_sq if g_sq > 0 else float("inf"),
        trace_covariance=trace,
        gradient_norm_sq=g_sq,
        n_samples=n,
    )


def _merge_shards(
    n: int, mean: dict[str, torch.Tensor], m2: float, group: Any
) -> tuple[int, float]:
    """The shards' (count, mean, squared deviations) merged over the group: the mean in
    place, as the count-weighted mean of the shards' means, and each shard's deviations
    counted about that common mean (n_r ||mean_r - G||^2 added), as Chan et al.'s update
    does for two chunks."""
    total = total_count(n, group)
    names = list(mean)
    local = torch.cat([mean[name].reshape(-1) for name in names])
    common = all_sum_tensor(local * n, group) / max(total, 1)
    m2 = all_sum_float(m2 + n * float((local - common).pow(2).sum()), group)
    offset = 0
    for name in names:
        size = mean[name].numel()
        mean[name].copy_(common[offset : offset + size].view_as(mean[name]))
        offset += size
    return total, m2


def _chain_moments(layers: list[LayerFactors]) -> ChunkMoments:
    """Sum of ||g_i||^2 = sum_l ||delta_i||^2 (||a_i||^2 + 1 with a bias), and the mean."""
    n = len(layers[0].deltas)
    row_sq = torch.zeros(n, dtype=torch.float64, device=layers[0].deltas.device)
    means: dict[str, torch.Tensor] = {}
    for layer in layers:
        delta, a = layer.deltas, layer.inputs
        delta_sq = delta.double().pow(2).sum(dim=1)
        if layer.weight is not None:
            row_sq += delta_sq * a.double().pow(2).sum(dim=1)
            means[layer.weight] = (delta.T @ a).double() / n
        if layer.bias is not None:
            row_sq += delta_sq
            means[layer.bias] = delta.sum(dim=0).double() / n
    return float(row_sq.sum()), means
