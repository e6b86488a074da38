r"""Gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training").

With per-sample gradients :math:`g_i` on N samples, :math:`G = \frac1N\sum_i g_i` and the
unbiased per-sample covariance trace
:math:`\mathrm{tr}\,\Sigma = \frac{1}{N-1}\sum_i \lVert g_i - G\rVert^2`, the simple noise
scale is :math:`B_\text{simple} = \mathrm{tr}\,\Sigma / \lVert G\rVert^2`: the batch size at
which the gradient's noise and signal are of the same size. Per-sample gradients come from
``torch.func.vmap(grad)``, in chunks, in eval mode; the model is left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from lossgeo.curvature.operators import DataSource, LossFn, ParameterSpace, as_batches, eval_mode


@dataclass(frozen=True)
class NoiseScale:
    b_simple: float
    trace_covariance: float
    gradient_norm_sq: float
    n_samples: int


def gradient_noise_scale(model: nn.Module, loss_fn: LossFn, data: DataSource, *,
                         chunk_size: int = 64) -> NoiseScale:
    space = ParameterSpace(model)
    batches = as_batches(data, chunk_size)

    def sample_loss(params, x, y):
        out = functional_call(model, {**space.frozen, **params}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    total = torch.zeros(space.dim, dtype=torch.float64, device=space.device)
    sum_sq = 0.0
    n = 0
    with eval_mode(model):
        for x, y in batches:
            g = per_sample(space.values, x, y)
            flat = torch.cat([g[name].reshape(len(y), -1) for name in space.names], dim=1).double()
            total += flat.sum(dim=0)
            sum_sq += float(flat.pow(2).sum())
            n += len(y)
    if n < 2:
        raise ValueError("data: the noise scale needs at least 2 samples")
    mean = total / n
    g_sq = float(mean.pow(2).sum())
    trace = (sum_sq - n * g_sq) / (n - 1)
    return NoiseScale(b_simple=trace / g_sq if g_sq > 0 else float("inf"),
                      trace_covariance=trace, gradient_norm_sq=g_sq, n_samples=n)
