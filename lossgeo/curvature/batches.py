r"""The probe set and the loss every curvature estimator differentiates.

Two loss signatures are accepted:

- ``loss_fn(output, target)``: lossgeo's own (``lossgeo.losses``, ``F.cross_entropy``); the
  probe set is ``(x, y)`` tensor pairs and the model is called as ``model(x)``.
- ``loss_fn(model, batch)``: anything else. ``batch`` is whatever the probe set yields (a
  dict from a tokenizer, a tuple, an object); the function runs the model itself, so
  Hugging Face models (``model(**batch).loss``) and custom losses work unchanged.

``loss_form="auto"`` reads the function's first parameter: annotated as an ``nn.Module`` or
called ``model``/``module``/``net``/``m`` means the second form, ``input``/``output``/
``logits``/``pred``... the first; otherwise the batches decide ((x, y) tensor pairs: the
first). Pass ``loss_form`` to say it explicitly.

The mean loss over the probe set weights every batch by its size, so a ragged last batch
carries exactly its share. A batch's size is, unless ``batch_size`` says otherwise: the
length of ``y`` for an ``(x, y)`` pair, else the first dimension of the first tensor found in
the batch (a dict's values in order, a tuple's items), e.g. the number of sequences of a
tokenizer's ``input_ids``. Pass ``batch_size=callable`` for token-weighted means.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch import nn
from torch.func import functional_call

from ..losses import LossFn

ModelLossFn = Callable[[nn.Module, Any], torch.Tensor]
"""loss_fn(model, batch) -> mean loss over the batch (any model, any batch)."""
AnyLossFn = LossFn | ModelLossFn
Batch = tuple[torch.Tensor, torch.Tensor]
DataSource = Batch | Iterable[Any]
LossForm = Literal["auto", "output_target", "model_batch"]


_MODEL_NAMES = {"model", "module", "net", "network", "m"}
_OUTPUT_NAMES = {
    "input",
    "inputs",
    "output",
    "outputs",
    "out",
    "logits",
    "pred",
    "preds",
    "prediction",
    "predictions",
    "y_pred",
    "y_hat",
    "scores",
}


def resolve_loss_form(
    loss_fn: Callable, loss_form: LossForm = "auto", first_batch: Any = None
) -> Literal["output_target", "model_batch"]:
    """Which signature `loss_fn` has. "auto": the first parameter's annotation (nn.Module) or
    name (model, module, net, m / input, output, logits, pred, ...) decides; when neither
    does, the batches do: (x, y) tensor pairs mean (output, target), anything else
    (model, batch)."""
    if loss_form in ("output_target", "model_batch"):
        return loss_form
    if loss_form != "auto":
        raise ValueError(
            f"loss_form: must be 'auto', 'output_target' or 'model_batch' (got {loss_form!r})"
        )
    try:
        first = next(iter(inspect.signature(loss_fn).parameters.values()), None)
    except (TypeError, ValueError):  # builtins without a signature
        first = None
    if first is not None:
        annotation = first.annotation
        if (isinstance(annotation, type) and issubclass(annotation, nn.Module)) or annotation in (
            "nn.Module",
            "torch.nn.Module",
            "Module",
        ):
            return "model_batch"
        if first.name in _MODEL_NAMES:
            return "model_batch"
        if first.name in _OUTPUT_NAMES:
            return "output_target"
    return "output_target" if first_batch is None or is_tensor_pair(first_batch) else "model_batch"


def is_tensor_pair(batch: Any) -> bool:
    return (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and all(isinstance(t, torch.Tensor) for t in batch)
    )


def first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict) or hasattr(batch, "values") and callable(batch.values):
        items: Iterable[Any] = batch.values()
    elif isinstance(batch, (tuple, list)):
        items = batch
    else:
        items = vars(batch).values() if hasattr(batch, "__dict__") else ()
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def batch_size_of(batch: Any, batch_size: Callable[[Any], int] | None = None) -> int:
    """How many samples a batch holds (the module docstring says how it is found)."""
    if batch_size is not None:
        size = int(batch_size(batch))
    elif is_tensor_pair(batch):
        size = len(batch[1])
    else:
        tensor = first_tensor(batch)
        if tensor is None or tensor.dim() == 0:
            raise ValueError(
                "batch_size: no tensor with a batch dimension in the batch; "
                "pass batch_size=callable(batch) -> int"
            )
        size = int(tensor.shape[0])
    if size <= 0:
        raise ValueError(f"batch_size: a batch of size {size}")
    return size


def check_chunk_size(chunk_size: Any, *, auto: bool = True) -> None:
    """chunk_size is None, "auto" (where allowed) or a whole number >= 1; anything else is a
    one-line ValueError (a negative size once gave no batches, and so lambda 0, silently)."""
    if chunk_size is None or (auto and chunk_size == "auto"):
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        allowed = '"auto", None or' if auto else "None or"
        raise ValueError(f"chunk_size: {allowed} a whole number >= 1 (got {chunk_size!r})")


def as_batches(data: DataSource, chunk_size: int | None = None) -> list[Any]:
    """One (x, y) pair, a list of batches or a DataLoader -> a list of batches; (x, y) pairs
    are split into chunks of at most chunk_size (other batches are kept as given)."""
    check_chunk_size(chunk_size, auto=False)
    if is_tensor_pair(data) and isinstance(data, tuple):
        batches: list[Any] = [data]
    else:
        batches = [tuple(b) if is_tensor_pair(b) else b for b in data]
    if not batches:
        raise ValueError("data: no batches given")
    # an empty (x, y) pair contributes nothing: a probe of only those is no probe
    batches = [b for b in batches if not (is_tensor_pair(b) and len(b[1]) == 0)]
    if not batches:
        raise ValueError("data: every batch given is empty (0 samples)")
    if chunk_size:
        batches = [
            chunk
            for b in batches
            for chunk in (
                [
                    (b[0][i : i + chunk_size], b[1][i : i + chunk_size])
                    for i in range(0, len(b[1]), chunk_size)
                ]
                if is_tensor_pair(b)
                else [b]
            )
        ]
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


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's refusal."""
    message = str(error)
    return isinstance(error, torch.OutOfMemoryError) or (
        "can't allocate memory" in message or "not enough memory" in message
    )


def one_sample_too_large(error: BaseException) -> MemoryError:
    """The one-line error for a probe sample that does not fit even alone."""
    first_line = str(error).splitlines()[0] if str(error) else ""
    return MemoryError(
        "curvature: out of memory with one probe sample per chunk "
        f"({type(error).__name__}: {first_line})"
    )


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
    except RuntimeError as error:
        if is_out_of_memory(error):
            raise one_sample_too_large(error) from None
        raise
    finally:
        for h in handles:
            h.remove()
    return max(total[0], 1)


_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def parse_memory(value: int | float | str) -> int:
    """Bytes from an int or a string such as "512MB", "2.5GB" (binary units)."""
    bad = ValueError(f"max_memory: a size such as 2GB or 512MB (got {value!r})")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        text = str(value).strip().upper().replace("IB", "B")
        digits = text.rstrip("KMGTB ")
        try:
            number, unit = float(digits), text[len(digits) :].strip()
        except ValueError:
            raise bad from None
    if unit not in _UNITS or not number > 0:
        raise bad
    return int(number * _UNITS[unit])


def available_memory(device: torch.device) -> int:
    """Bytes free for a measurement: CUDA's free memory, else the system's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**34  # no way to know: 16 GiB


def graph_bytes(compute: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves while `compute()` runs (each once): the memory
    a retained gradient graph holds."""
    seen: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # a tensor's own bytes (a slice of the probe set is not the whole set), each once
        n_bytes = tensor.numel() * tensor.element_size()
        seen[(tensor.data_ptr(), n_bytes)] = n_bytes
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compute()
    return sum(seen.values())


def auto_chunk_size(model: nn.Module, x: torch.Tensor, budget_bytes: int = 48 * 2**20) -> int:
    """Largest power-of-two chunk whose activations fit the budget (at least 64 samples).

    Measured on CPU (benchmarks/bench_curvature.py): one chunk of 2048 is fastest for the
    MNIST MLP, chunks of 256 for the CNN, whose conv activations otherwise spill the caches
    (a Hessian product on 1024 images: 180 ms in chunks of 256, 200-250 ms in chunks of 512).
    """
    per_sample = activation_bytes_per_sample(model, x)
    chunk = 64
    while chunk * 2 * per_sample <= budget_bytes and chunk < len(x):
        chunk *= 2
    return chunk


class _ModelLoss(nn.Module):
    """loss_fn(model, batch) as a module, so torch.func.functional_call can swap the model's
    parameters for the tensors being differentiated (its parameters are "model.<name>")."""

    def __init__(self, model: nn.Module, loss_fn: ModelLossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class Objective:
    """The mean loss over a probe set as a function of a dict of parameter tensors.

    batches: the probe set as a list (chunked for (x, y) pairs); weights: each batch's share
    n_b / N. `loss(params, batch)` evaluates one batch with `params` (any subset of the
    model's parameters; the rest keep their values) through torch.func.functional_call, so
    the model's own tensors are never touched."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: AnyLossFn,
        data: DataSource,
        *,
        loss_form: LossForm = "auto",
        chunk_size: int | str | None = "auto",
        batch_size: Callable[[Any], int] | None = None,
    ) -> None:
        check_chunk_size(chunk_size)
        self.model, self.loss_fn = model, loss_fn
        batches = as_batches(data, None)
        self.form = resolve_loss_form(loss_fn, loss_form, batches[0])
        if self.form == "output_target":
            bad = next((b for b in batches if not is_tensor_pair(b)), None)
            if bad is not None:
                raise ValueError(
                    f"data: loss_fn(output, target) needs (x, y) tensor pairs "
                    f"(got a {type(bad).__name__}); for other batches pass "
                    "loss_fn(model, batch)"
                )
            if chunk_size == "auto":
                chunk_size = auto_chunk_size(model, batches[0][0])
            batches = as_batches(batches, chunk_size)  # type: ignore[arg-type]
        self.batches = batches
        sizes = [batch_size_of(b, batch_size) for b in batches]
        self.n_samples = sum(sizes)
        self.weights = [s / self.n_samples for s in sizes]
        self._wrapper = (
            _ModelLoss(model, loss_fn)  # type: ignore[arg-type]  # form checked
            if self.form == "model_batch"
            else None
        )

    def outputs(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.form != "output_target":
            raise ValueError(
                "loss_fn: the GGN, the empirical Fisher, the noise scale and "
                "landscapes need loss_fn(output, target) and (x, y) batches"
            )
        return functional_call(self.model, params, (x,))

    def loss(self, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        if self._wrapper is None:
            x, y = batch
            return self.loss_fn(functional_call(self.model, params, (x,)), y)
        return functional_call(
            self._wrapper, {f"model.{n}": v for n, v in params.items()}, (batch,)
        )
