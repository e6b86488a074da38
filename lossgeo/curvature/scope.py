"""What a measurement differentiates, over which processes, and how its products are taken:
one settings object that the model-level functions (`hessian_eigen`, `hessian_trace`, ...),
the per-epoch set (`measure_curvature`), batch sharpness and the `Tracker` share, in place of
nine keyword arguments repeated down every call."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from .batches import LossForm, check_chunk_size, parse_memory
from .distributed import resolve_group
from .precision import resolve_compute_dtype

LOSS_FORMS = ("auto", "output_target", "model_batch")
HVP_METHODS = ("graph", "fwdrev", "fd")


@dataclass(frozen=True)
class Scope:
    """The loss whose curvature is measured, where, and how its products are taken.

    Attributes:
        params: a parameter filter (names, module paths, globs); None = every trainable one.
        loss_form: "output_target" for loss_fn(output, target), "model_batch" for
            loss_fn(model, batch), or "auto" (guessed from loss_fn and the batches).
        size_fn: the number of samples in a batch, for batches lossgeo cannot count (the
            mean loss weights batches by it).
        process_group: the probe set is spread over this group and every product is summed
            over it (True: the default group; None: one process).
        math_attention: products start under the math attention backend (fused attention
            has no double backward; lossgeo falls back on its own, this only starts there).
    """

    params: Sequence[str] | str | None = None
    loss_form: LossForm = "auto"
    size_fn: Callable[[Any], int] | None = None
    process_group: Any = None
    math_attention: bool = False
    chunk_size: int | str | None = "auto"
    hvp_method: str = "graph"
    max_memory: int | str | None = "auto"
    compute_dtype: str | torch.dtype | None = None

    def __post_init__(self) -> None:
        """Bad options fail here, in one line, before anything is measured."""
        if self.loss_form not in LOSS_FORMS:
            raise ValueError(
                f"loss_form: must be 'auto', 'output_target' or 'model_batch' "
                f"(got {self.loss_form!r})"
            )
        if self.size_fn is not None and not callable(self.size_fn):
            raise ValueError(f"size_fn: must be a callable(batch) -> int (got {self.size_fn!r})")
        if not isinstance(self.math_attention, bool):
            raise ValueError(f"math_attention: must be True or False (got {self.math_attention!r})")
        check_chunk_size(self.chunk_size)
        if self.hvp_method not in HVP_METHODS:
            raise ValueError(
                f"hvp_method: must be one of {', '.join(HVP_METHODS)} (got {self.hvp_method!r})"
            )
        if self.max_memory not in (None, "auto"):
            parse_memory(self.max_memory)  # type: ignore[arg-type]
        resolve_compute_dtype(self.compute_dtype)

    def resolved(self) -> Scope:
        """The same scope with `process_group` resolved to a group (or None), once, so that
        the calls below it pass the group itself."""
        return replace(self, process_group=resolve_group(self.process_group))
