"""Per-sample gradients of a chain of Linear layers without forming them.

For a Linear layer z = W a + b inside a network whose modules act on each sample alone,
sample i's gradient of its own loss is the outer product :math:`\\delta_i a_i^\\top` (and
:math:`\\delta_i` for the bias), with :math:`\\delta_i = \\partial l_i / \\partial z_i`
(Goodfellow 2015, "Efficient per-example gradient computations"). One forward and one
backward of :math:`\\sum_i l_i` give every layer's inputs ``a`` and output gradients
``delta``; from them:

- per-sample squared gradient norms :math:`\\sum_l \\lVert\\delta_i\\rVert^2
  \\lVert a_i\\rVert^2` and the mean gradient :math:`\\Delta^\\top A / n` (the gradient
  noise scale, ``lossgeo.geometry.noise``);
- the Gram matrix of per-sample gradients :math:`K_{ij} = g_i^\\top g_j =
  \\sum_l (\\delta_i^\\top\\delta_j)(a_i^\\top a_j + 1)`, whose nonzero eigenvalues, divided
  by n, are those of the empirical Fisher :math:`\\frac1n\\sum_i g_i g_i^\\top` (an n x n
  problem instead of one in parameter space).

Which models qualify: an ``nn.Sequential`` (or a model's ``as_sequence()``, the forward as
one chain, e.g. the MLP) of Linear layers on (samples, features) inputs and parameter-free
per-sample modules, whose Linear weights are exactly the trainable parameters, each layer
used once. Anything else returns None and callers take the general path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from .batches import LossFn, as_batches
from .params import ParameterSpace

# modules that act on each sample alone and hold no parameters (Dropout: eval mode)
PER_SAMPLE_MODULES = (
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
)


@dataclass(frozen=True)
class ChainLayer:
    """One module of the chain; weight/bias: the parameters' names when trainable."""

    module: nn.Module
    weight: str | None = None
    bias: str | None = None


@dataclass(frozen=True)
class LayerFactors:
    """A Linear layer's inputs a (n, in) and per-sample output gradients delta (n, out)."""

    weight: str | None
    bias: str | None
    inputs: torch.Tensor
    deltas: torch.Tensor


def linear_chain(model: nn.Module, space: ParameterSpace) -> list[ChainLayer] | None:
    """The model's forward as a chain of Linear layers and per-sample modules, or None."""
    as_sequence = getattr(model, "as_sequence", None)
    sequence = as_sequence() if callable(as_sequence) else model
    if not isinstance(sequence, nn.Sequential):
        return None
    names = {id(p): name for name, p in model.named_parameters()}
    trainable = set(space.names)
    chain: list[ChainLayer] = []
    seen: set[str] = set()
    for module in sequence:
        if isinstance(module, nn.Linear):
            weight = names.get(id(module.weight))
            bias = names.get(id(module.bias)) if module.bias is not None else None
            weight, bias = (n if n in trainable else None for n in (weight, bias))
            if weight in seen or bias in seen:  # a layer used twice: its outer products add
                return None
            seen.update(n for n in (weight, bias) if n is not None)
            chain.append(ChainLayer(module, weight, bias))
        elif isinstance(module, PER_SAMPLE_MODULES):
            chain.append(ChainLayer(module))
        else:
            return None
    return chain if seen == trainable else None


def chain_factors(
    chain: list[ChainLayer], loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor
) -> list[LayerFactors]:
    """Each Linear layer's inputs and per-sample loss gradients at its output, from one
    forward and one backward of sum_i loss_i (row i of the gradient at a layer's output is
    d loss_i / d z_i, as no module mixes samples). Call it in eval mode."""
    h = x
    inputs, outputs = [], []
    with torch.enable_grad():
        for layer in chain:
            module = layer.module
            if isinstance(module, nn.Linear):
                if h.dim() != 2:
                    raise ValueError("a Linear layer's input must be (samples, features)")
                inputs.append(h.detach())
                # detached weights: the graph leads to the layer outputs, not to parameters
                bias = module.bias.detach() if module.bias is not None else None
                h = F.linear(h, module.weight.detach(), bias)
                if not h.requires_grad:
                    h.requires_grad_(True)
                outputs.append(h)
            else:
                h = module(h)
        losses = vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(h, y)
        deltas = torch.autograd.grad(losses.sum(), outputs)
    linears = [layer for layer in chain if isinstance(layer.module, nn.Linear)]
    return [
        LayerFactors(layer.weight, layer.bias, a, d.detach())
        for layer, a, d in zip(linears, inputs, deltas)
    ]


def fisher_gram(
    model: nn.Module, loss_fn: LossFn, data, *, chunk_size: int = 1024
) -> torch.Tensor | None:
    """(1/n) K, K_ij = g_i . g_j of the per-sample loss gradients on `data` (float64), for a
    Linear chain; None for other models. Its nonzero eigenvalues are the empirical
    Fisher's. Call it in eval mode."""
    space = ParameterSpace(model)
    chain = linear_chain(model, space)
    if chain is None:
        return None
    per_chunk = [chain_factors(chain, loss_fn, x, y) for x, y in as_batches(data, chunk_size)]
    n = sum(len(chunk[0].deltas) for chunk in per_chunk)
    gram = torch.zeros(n, n, dtype=torch.float64, device=space.device)
    for layer in range(len(per_chunk[0])):
        factors = per_chunk[0][layer]
        a = torch.cat([chunk[layer].inputs for chunk in per_chunk]).double()
        d = torch.cat([chunk[layer].deltas for chunk in per_chunk]).double()
        inputs = a @ a.T if factors.weight is not None else torch.zeros_like(gram)
        if factors.bias is not None:
            inputs += 1.0
        gram += (d @ d.T) * inputs
    return gram / n
