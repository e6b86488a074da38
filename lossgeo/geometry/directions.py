"""Directions in parameter space for slices and sharpness, as flat vectors in the order of
`ParameterSpace` (the model's trainable parameters).

Filter normalisation (Li et al. 2018): a Gaussian direction's every filter (a row of a
Linear weight, an output channel of a Conv weight) is rescaled to the norm of the same
filter of the weights, so that slices of networks with different weight scales compare.
One-dimensional parameters (biases, BatchNorm/LayerNorm scales and shifts) are zeroed by
default, as in the paper's ``ignore='biasbn'``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lossgeo.curvature.operators import ParameterSpace


def random_direction(
    model: nn.Module, *, seed: int = 0, filter_normalize: bool = True, include_bias_bn: bool = False
) -> torch.Tensor:
    space = ParameterSpace(model)
    gen = torch.Generator().manual_seed(seed)
    pieces = []
    for name in space.names:
        w = space.values[name]
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w.dtype).to(w.device)
        if w.dim() <= 1:
            if not include_bias_bn:
                d = torch.zeros_like(w)
            elif filter_normalize:
                d = d * (w.norm() / (d.norm() + 1e-12))
        elif filter_normalize:
            rows_w = w.reshape(w.shape[0], -1).norm(dim=1)
            rows_d = d.reshape(d.shape[0], -1).norm(dim=1)
            scale = (rows_w / (rows_d + 1e-12)).view(-1, *([1] * (w.dim() - 1)))
            d = d * scale
        pieces.append(d.reshape(-1))
    return torch.cat(pieces)


def weights_vector(model: nn.Module) -> torch.Tensor:
    space = ParameterSpace(model)
    return space.flatten(space.values)


@dataclass(frozen=True)
class TrajectoryPCA:
    """PCA of the optimisation path relative to its end point (Li et al. 2018, Sec. 7)."""

    directions: torch.Tensor  # (2, n), orthonormal
    explained_variance_ratio: torch.Tensor  # (2,)
    coordinates: torch.Tensor  # (T, 2): each w_t - w_final in the PCA plane

    def reconstruct(self, coordinates: torch.Tensor) -> torch.Tensor:
        return coordinates @ self.directions


def trajectory_pca(
    trajectory: list[torch.Tensor] | torch.Tensor, final: torch.Tensor | None = None
) -> TrajectoryPCA:
    """trajectory: flat weights per epoch; `final` defaults to the last of them."""
    path = (
        torch.stack(list(trajectory)).double()
        if isinstance(trajectory, list)
        else trajectory.double()
    )
    end = path[-1] if final is None else final.double()
    offsets = path - end
    if offsets.shape[0] < 2:
        raise ValueError("trajectory: at least two points other than the end are needed")
    # SVD of the T x n offset matrix; no centring, the end point is the origin (as the paper)
    _, singular, vt = torch.linalg.svd(offsets, full_matrices=False)
    n_dir = min(2, vt.shape[0])
    directions = vt[:n_dir]
    if n_dir < 2:
        raise ValueError("trajectory: the path spans fewer than two directions")
    energy = singular.pow(2)
    ratio = energy[:2] / energy.sum().clamp(min=1e-300)
    return TrajectoryPCA(
        directions=directions.to(path.dtype),
        explained_variance_ratio=ratio,
        coordinates=offsets @ directions.T,
    )
