"""Validated run configuration: one dataclass is the single source of truth for the
MLproject parameters, the CLI options and what gets logged as MLflow params."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from lossgeo.errors import UserInputError

DATASETS = ("mnist", "fashion-mnist", "cifar10")
MODELS = ("mlp", "cnn", "resnet", "vit")
DEVICES = ("auto", "cpu", "cuda")
LOSSES = ("cross_entropy", "mse")
OPTIMIZERS = ("sgd", "adam", "adamw")
ACTIVATIONS = ("relu", "tanh")
LANDSCAPE_DIRECTIONS = ("random", "eigen", "pca")
# torch and numpy seed generators take unsigned 64-bit seeds, and the loop derives seed + 1
MAX_SEED = 2**63 - 1


def _param(
    default: Any,
    help: str,
    check: Callable[[Any], bool] | None = None,
    allowed: str = "",
    choices: tuple[str, ...] | None = None,
) -> Any:
    return field(
        default=default,
        metadata={"help": help, "check": check, "allowed": allowed, "choices": choices},
    )


def _positive(x: float) -> bool:
    return x > 0


def _non_negative(x: float) -> bool:
    return x >= 0


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = _param("mnist", "data set", choices=DATASETS)
    model: str = _param("mlp", "model architecture", choices=MODELS)
    lr: float = _param(0.1, "learning rate", _positive, "> 0")
    batch_size: int = _param(32, "mini-batch size", _positive, ">= 1 and <= training-set size")
    epochs: int = _param(
        3, "training epochs (0 = measure the initialisation only)", _non_negative, ">= 0"
    )
    optimizer: str = _param(
        "sgd", "optimizer (Adam's edge is on the preconditioned Hessian)", choices=OPTIMIZERS
    )
    momentum: float = _param(0.0, "SGD momentum", lambda m: 0 <= m < 1, "in [0, 1)")
    beta1: float = _param(0.9, "Adam/AdamW beta1", lambda b: 0 <= b < 1, "in [0, 1)")
    beta2: float = _param(0.999, "Adam/AdamW beta2", lambda b: 0 <= b < 1, "in [0, 1)")
    adam_eps: float = _param(1e-8, "Adam/AdamW epsilon", _positive, "> 0")
    weight_decay: float = _param(
        0.0, "weight decay (L2 for sgd and adam, decoupled for adamw)", _non_negative, ">= 0"
    )
    seed: int = _param(
        0,
        "random seed (data split, probe set, init, batches)",
        lambda s: 0 <= s <= MAX_SEED,
        f"in [0, {MAX_SEED}]",
    )
    train_subset: int = _param(
        10000, "training samples used (0 = the whole training split)", _non_negative, ">= 0"
    )
    val_size: int = _param(
        5000, "validation samples carved from the training set", _positive, ">= 1"
    )
    label_noise: float = _param(
        0.0,
        "share of training labels replaced by a uniform draw over the classes (seeded; "
        "val and test keep theirs): keeps the loss from collapsing (Zhang et al. 2017)",
        lambda r: 0 <= r < 1,
        "in [0, 1)",
    )
    probe_size: int = _param(
        1024,
        "fixed training subset for curvature/landscape measurements",
        _positive,
        ">= 1 and <= training-set size",
    )
    target_train_loss: float = _param(
        0.0,
        "train to a fit: stop at the first check whose full-train-split loss is <= this "
        "(0 = off; epochs is then the budget)",
        _non_negative,
        ">= 0",
    )
    target_train_acc: float = _param(
        0.0,
        "train to a fit: stop at the first check whose full-train-split accuracy is >= this "
        "(0 = off; with target_train_loss, both must hold)",
        lambda a: 0 <= a <= 1,
        "in [0, 1]",
    )
    target_check_every: int = _param(
        0,
        "steps between in-epoch target checks on the probe set, each confirmed on the full "
        "train split (0 = ten per epoch)",
        _non_negative,
        ">= 0",
    )
    eval_every: int = _param(
        1,
        "evaluate train/val/test every N epochs (the first and last "
        "always; with a target, the train split every epoch)",
        _positive,
        ">= 1",
    )
    measure_every: int = _param(
        1, "measure curvature/sharpness every N epochs (0 and last always)", _positive, ">= 1"
    )
    measure_every_steps: int = _param(
        0,
        "per-step tracking: every N optimizer steps, lambda_max (warm-started), batch "
        "sharpness, gradient alignment and edge ratios on the probe set, logged as "
        "step/<name> at the global step (0 = off)",
        _non_negative,
        ">= 0",
    )
    batch_sharpness_rse: float = _param(
        0.1,
        "per-step batch sharpness: Monte Carlo over mini-batches stops when the standard "
        "error is below this share of the mean",
        _positive,
        "> 0",
    )
    batch_sharpness_max: int = _param(
        16, "per-step batch sharpness: mini-batches at most per measurement", _positive, ">= 1"
    )
    stop_converged: bool = _param(
        False,
        "per-step tracking: stop training once a whole window of measurements reads "
        "converged_below the stability edge with the probe loss at 5% of its first "
        "(tagged stopped_early)",
    )
    data_dir: str = _param("", "data root (default: $LOSSGEO_DATA_DIR, else ./data)")
    device: str = _param("auto", "compute device", choices=DEVICES)
    loss: str = _param("cross_entropy", "training loss", choices=LOSSES)
    activation: str = _param("relu", "MLP activation", choices=ACTIVATIONS)
    hidden: str = _param(
        "512,256",
        "MLP hidden widths, comma-separated",
        lambda s: _parse_widths(s) is not None,
        "comma-separated positive ints",
    )
    init_scale: float = _param(
        1.0,
        "multiply every initial weight and bias by this (Andreyev & Beneventano: 0.2)",
        _positive,
        "> 0",
    )
    curvature: bool = _param(True, "measure Hessian curvature on the probe set")
    curvature_k: int = _param(5, "number of top Hessian eigenvalues (Lanczos)", _positive, ">= 1")
    curvature_tol: float = _param(
        1e-4, "relative eigenvalue accuracy of the Lanczos solver", _positive, "> 0"
    )
    curvature_max_iter: int = _param(100, "maximum Lanczos steps", lambda n: n >= 2, ">= 2")
    trace_samples: int = _param(
        14,
        "Hutchinson vectors for the Hessian trace (deflated by the eigen solve's Krylov "
        "basis: 14 give the standard error 20 gave deflated by the top 5 pairs)",
        lambda n: n >= 2,
        ">= 2",
    )
    density_steps: int = _param(
        100, "Lanczos steps of the final spectral density (SLQ)", lambda n: n >= 2, ">= 2"
    )
    effective_dim_alpha: float = _param(
        1.0, "alpha of N_eff = sum lambda/(lambda+alpha)", _positive, "> 0"
    )
    noise_scale: bool = _param(True, "gradient noise scale B_simple on the probe set")
    sharpness: bool = _param(True, "measure sharpness every measured epoch")
    sharpness_directions: int = _param(
        10, "random directions K for sharp_mean/sharp_max", _positive, ">= 1"
    )
    sharpness_radius: float = _param(
        0.05, "radius rho along filter-normalised directions", _positive, "> 0"
    )
    sharpness_eps: float = _param(
        1e-3, "box size eps of Keskar's epsilon-sharpness", _positive, "> 0"
    )
    adaptive_radius: float = _param(
        0.5, "radius rho of adaptive sharpness ||delta/|w|||_2", _positive, "> 0"
    )
    pac_bayes: bool = _param(
        True,
        "PAC-Bayes flatness 1/sigma^2, plain and magnitude-aware, at the final point "
        "(with sharpness on)",
    )
    pac_bayes_increase: float = _param(
        0.1, "loss increase the PAC-Bayes noise may cause (Jiang et al.'s d)", _positive, "> 0"
    )
    landscape: bool = _param(True, "2D/1D loss slices and trajectory at the final epoch")
    landscape_resolution: int = _param(
        21, "grid points per axis of 2D slices (51 = Li et al.)", lambda n: n >= 3, ">= 3"
    )
    landscape_range: float = _param(
        1.0, "half-width r of the slice grid [-r, r]^2", _positive, "> 0"
    )
    landscape_directions: str = _param(
        "random", "plane of the 2D slice", choices=LANDSCAPE_DIRECTIONS
    )
    landscape_every_epoch: bool = _param(False, "also store 2D slices at every measured epoch")
    landscape_on_test: bool = _param(False, "slices on the test set instead of the probe set")
    experiment: str = _param(
        "",
        "MLflow experiment (default: the launcher's under `mlflow run`, "
        "else $MLFLOW_EXPERIMENT_NAME, else Default)",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = coerce(f.name, type(f.default), getattr(self, f.name))
            object.__setattr__(self, f.name, value)  # frozen: the checked, typed value
            choices = f.metadata["choices"]
            if choices is not None and value not in choices:
                raise UserInputError(
                    f"{f.name}: must be one of {', '.join(choices)} (got {value!r})"
                )
            check = f.metadata["check"]
            if check is not None and not check(value):
                raise UserInputError(f"{f.name}: must be {f.metadata['allowed']} (got {value!r})")
        if self.optimizer != "sgd" and self.momentum > 0:
            raise UserInputError(
                f"momentum: only for optimizer sgd (got {self.momentum} with "
                f"{self.optimizer}; its momentum is beta1)"
            )
        if self.stop_converged and self.measure_every_steps == 0:
            raise UserInputError(
                "stop_converged: needs per-step tracking (set measure_every_steps > 0)"
            )
        if self.noise_scale and self.probe_size < 2:
            raise UserInputError(
                f"probe_size: must be >= 2 for the gradient noise scale (a "
                f"variance over samples; got {self.probe_size}); or set "
                "noise_scale false"
            )

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        return _parse_widths(self.hidden)  # type: ignore[return-value]

    @property
    def noise_temperature(self) -> float:
        return self.lr / self.batch_size

    def check_against_data(self, n_train: int) -> None:
        """Checks that need the size of the training split; run before any MLflow run exists."""
        if self.batch_size > n_train:
            raise UserInputError(
                f"batch_size: must be >= 1 and <= training-set size {n_train} "
                f"(got {self.batch_size})"
            )
        if self.probe_size > n_train:
            raise UserInputError(
                f"probe_size: must be >= 1 and <= training-set size {n_train} "
                f"(got {self.probe_size})"
            )

    def to_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def coerce(name: str, kind: type, value: Any) -> Any:
    """`value` as a `kind` field holds it, or a one-line UserInputError: integral floats
    (32.0, as MLflow passes float parameters) become ints; numbers must be finite; a string
    is never read as a flag or a number here (the CLI and YAML parse those)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserInputError(f"{name}: must be true or false (got {value!r})")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise UserInputError(f"{name}: must be an integer (got {value!r})")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
            raise UserInputError(f"{name}: must be a finite number (got {value!r})")
        raise UserInputError(f"{name}: must be a number (got {value!r})")
    if kind is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # `hidden: 64` in YAML
    if kind is str and not isinstance(value, str):
        raise UserInputError(f"{name}: must be a string (got {value!r})")
    return value


def _parse_widths(text: str) -> tuple[int, ...] | None:
    try:
        widths = tuple(int(w) for w in str(text).split(",") if w.strip())
    except ValueError:
        return None
    return widths if widths and all(w > 0 for w in widths) else None


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))
