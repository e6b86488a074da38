"""What a measurement differentiates, and over which processes: one settings object that the
per-epoch set (`measure_curvature`), batch sharpness and the `Tracker` share, in place of
five keyword arguments repeated down every call."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from .batches import LossForm
from .distributed import resolve_group

LOSS_FORMS = ("auto", "output_target", "model_batch")


@dataclass(frozen=True)
class Scope:
    """The loss whose curvature is measured, and where.

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

    def resolved(self) -> Scope:
        """The same scope with `process_group` resolved to a group (or None), once, so that
        the calls below it pass the group itself."""
        return replace(self, process_group=resolve_group(self.process_group))

    def operator_options(self) -> dict[str, Any]:
        """The keyword arguments of the curvature operators (`factories.hessian_operator`)."""
        return {
            "params": self.params,
            "loss_form": self.loss_form,
            "batch_size": self.size_fn,
            "process_group": self.process_group,
            "math_attention": self.math_attention,
        }
