"""Training losses, all mean-reduced over samples."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""loss_fn(output, target) -> mean loss (lossgeo's own signature)."""


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


def half_squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cohen et al. (2021)'s MSE: 0.5 * sum over classes of (output - one_hot)^2, mean over
    samples."""
    # A comparison, not F.one_hot: one_hot reads the labels' values (a data-dependent check),
    # which torch.func.vmap cannot do, and per-sample gradients run this loss under vmap.
    classes = torch.arange(output.shape[-1], device=output.device)
    one_hot = (target.unsqueeze(-1) == classes).to(output.dtype)
    return 0.5 * (output - one_hot).pow(2).sum(dim=-1).mean()


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": half_squared_error}
