"""Study files (YAML in studies/): a grid of named regimes or an Optuna search space,
validated into a frozen spec before anything starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lossgeo.config import TrainConfig
from lossgeo.errors import UserInputError
from lossgeo.studies.yamlload import load_study_yaml

SAMPLERS = ("tpe", "random", "grid", "qmc")
OBJECTIVES = {
    "val_loss": "minimize",
    "gen_gap": "minimize",
    "test_acc": "maximize",
    "test_loss": "minimize",
    "lambda_max": "minimize",
}
PRUNERS = ("median", "none")
SEARCHABLE = ("lr", "batch_size", "momentum", "weight_decay")


@dataclass(frozen=True)
class Parameter:
    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None


@dataclass(frozen=True)
class StudySpec:
    name: str
    kind: str  # "grid" or "sweep"
    base: dict[str, Any]
    models: tuple[str, ...]
    regimes: dict[str, dict[str, Any]] = field(default_factory=dict)
    search_space: tuple[Parameter, ...] = ()
    sampler: str = "tpe"
    objectives: tuple[str, ...] = ("val_loss",)
    pruner: str = "median"
    n_trials: int = 20
    seed: int = 0
    # Training seeds: every grid cell runs once per seed (replicates; the base's seed if none).
    seeds: tuple[int, ...] = ()
    # Settings within whose values a measure is related to a gap (stratified verdicts);
    # empty: `model` when the study has more than one.
    strata: tuple[str, ...] = ()

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    def config(self, **overrides: Any) -> TrainConfig:
        return TrainConfig(**{**self.base, **overrides})


# A grid larger than this is refused unless asked for (`lossgeo grid --max-cells N`): a
# 2e9-cell grid once sat silent for minutes, and 10,000 cells spent hours checking cells
# before the first one ran. A helper's n is capped too (lin_space with n = 1e9 died in numpy
# after trying to allocate 7.45 GiB).
MAX_CELLS = 1000
MAX_LEVELS = 10_000


def _fail(path: Path, field_name: str, message: str) -> UserInputError:
    return UserInputError(f"{path}: {field_name}: {message}")


def _parameter(path: Path, name: str, raw: Any) -> Parameter:
    where = f"search_space.{name}"
    if name not in SEARCHABLE:
        raise _fail(path, where, f"must be one of {', '.join(SEARCHABLE)}")
    if not isinstance(raw, dict):
        raise _fail(path, where, "must be a mapping with low/high[/log] or choices")
    unknown = set(raw) - {"low", "high", "log", "choices"}
    if unknown:
        raise _fail(path, f"{where}.{sorted(unknown)[0]}", "unknown key")
    if "choices" in raw:
        choices = _levels(path, f"{where}.choices", name, raw["choices"])
        return Parameter(name, choices=tuple(choices))
    try:
        low, high = float(raw["low"]), float(raw["high"])
    except (KeyError, TypeError, ValueError):
        raise _fail(path, where, "needs numeric low and high (or choices)") from None
    if not low < high:
        raise _fail(path, where, f"low must be < high (got {low}, {high})")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise _fail(path, f"{where}.log", f"must be true or false (got {log!r})")
    if log and low <= 0:
        raise _fail(path, f"{where}.low", "must be > 0 on a log scale")
    for value in (low, high):
        _check_value(path, where, name, value if name != "batch_size" else round(value))
    return Parameter(name, low=low, high=high, log=log)


def _levels(path: Path, where: str, name: str, raw: Any) -> list:
    """The distinct, validated values of one factor or choice list, typed as the training
    parameter holds them. A helper's batch sizes are rounded to integers; a written list
    must hold integers already (16.5 is an error, not 16)."""
    helper = isinstance(raw, dict)
    values = _value_list(path, where, raw)
    if helper and name == "batch_size":
        values = [int(round(v)) for v in values]
    typed = [_check_value(path, where, name, value) for value in values]
    duplicates = sorted({str(v) for v in typed if typed.count(v) > 1})
    if duplicates:
        raise _fail(path, where, f"duplicate level {duplicates[0]} (levels must differ)")
    return typed


def _value_list(path: Path, where: str, raw: Any) -> list:
    """A list of values as written, or a helper: {log_space: [low, high, n]} (n values
    log-spaced from low to high, both included) or {lin_space: [low, high, n]}; helper values
    are rounded to 6 significant digits so that run names and tables stay readable."""
    import numpy as np

    if isinstance(raw, list) and raw:
        return raw
    if isinstance(raw, dict) and len(raw) == 1 and next(iter(raw)) in ("log_space", "lin_space"):
        kind, spec = next(iter(raw.items()))
        try:
            low, high, n = float(spec[0]), float(spec[1]), int(spec[2])
        except (TypeError, ValueError, IndexError):
            raise _fail(path, f"{where}.{kind}", "must be [low, high, n]") from None
        if n > MAX_LEVELS:
            raise _fail(path, f"{where}.{kind}", f"n must be <= {MAX_LEVELS:,} (got {n:,})")
        if n < 1 or not low <= high or (kind == "log_space" and low <= 0):
            raise _fail(
                path,
                f"{where}.{kind}",
                "needs n >= 1 and 0 < low <= high (low may be <= 0 on lin_space)",
            )
        values = np.geomspace(low, high, n) if kind == "log_space" else np.linspace(low, high, n)
        return [float(f"{v:.6g}") for v in values]
    raise _fail(
        path,
        where,
        "must be a non-empty list of values, {log_space: [low, high, n]} "
        "or {lin_space: [low, high, n]}",
    )


def _check_value(path: Path, where: str, name: str, value: Any) -> Any:
    """`value` as the training parameter `name` holds it (32.0 -> 32), or the file's error."""
    try:
        return getattr(TrainConfig(**{name: value}), name)
    except UserInputError as exc:
        raise _fail(path, where, str(exc)) from None


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["epochs=1 train_subset=2000", "lr=0.05"]` -> {"epochs": 1, ...}: each item holds one
    or more space-separated key=value pairs (as `-P set="..."` passes them); values are read
    as YAML scalars, exactly as in a study file's `base`."""
    import shlex

    overrides: dict[str, Any] = {}
    for item in items:
        try:
            pairs = shlex.split(item or "")
        except ValueError as exc:  # an unbalanced quote
            raise UserInputError(f"set: {item!r}: {exc}") from None
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise UserInputError(f"set: {pair!r} is not key=value (e.g. --set epochs=1)")
            try:
                overrides[key.strip()] = load_study_yaml(value) if value else ""
            except yaml.YAMLError:
                raise UserInputError(f"set: {pair!r}: the value is not a YAML scalar") from None
    return overrides


def check_overrides(overrides: dict[str, Any]) -> None:
    """`--set` values, checked on their own so that a typo is reported as the user's
    `--set`, not as the study file's."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in overrides.items():
        if key not in names:
            raise UserInputError(f"set: {key}: not a training parameter")
        try:
            TrainConfig(**{key: value})
        except UserInputError as exc:
            raise UserInputError(f"set: {exc}") from None


_SHORT = {"batch_size": "B", "weight_decay": "wd", "momentum": "m"}


def _factorial_regimes(
    path: Path, factors: Any, fields: set[str], max_cells: int, per_regime: int = 1
) -> dict[str, dict]:
    """A full-factorial design: every combination of the factors' values, one regime each,
    named like "lr=0.01,B=16"; counted before it is built, and refused when its regimes
    times `per_regime` (models x seeds) come to more than `max_cells`."""
    import itertools
    import math

    if not isinstance(factors, dict) or not factors:
        raise _fail(path, "factors", "must map training parameters to lists of values")
    for name in factors:
        if name not in fields:
            raise _fail(path, f"factors.{name}", "not a training parameter")
    # counted from what is written, before any level is made or checked
    count = math.prod(_written_count(raw) for raw in factors.values())
    if count * per_regime > max_cells:
        raise _too_many(path, count * per_regime, max_cells)
    levels = {name: _levels(path, f"factors.{name}", name, raw) for name, raw in factors.items()}
    regimes: dict[str, dict] = {}
    for combo in itertools.product(*levels.values()):
        point = dict(zip(levels, combo))
        label = ",".join(
            f"{_SHORT.get(k, k)}={v:g}"
            if isinstance(v, (int, float))
            else f"{_SHORT.get(k, k)}={v}"
            for k, v in point.items()
        )
        regimes[label] = point
    return regimes


_FIELDS = (
    "name",
    "kind",
    "base",
    "models",
    "regimes",
    "factors",
    "search_space",
    "sampler",
    "objective",
    "pruner",
    "n_trials",
    "seed",
    "seeds",
    "strata",
)


def _written_count(raw: Any) -> int:
    """How many levels a factor as written has (a helper's n, a list's length); 1 for what
    is malformed, which `_levels` then refuses in its own words."""
    if isinstance(raw, list):
        return max(len(raw), 1)
    if isinstance(raw, dict) and len(raw) == 1:
        spec = next(iter(raw.values()))
        try:
            return max(int(spec[2]), 1)
        except (TypeError, ValueError, IndexError, OverflowError):
            return 1
    return 1


def _too_many(path: Path, cells: int, max_cells: int) -> UserInputError:
    return UserInputError(
        f"{path}: the grid has {cells:,} cells (regimes x models x seeds), over the limit of "
        f"{max_cells:,}; shrink it, or pass --max-cells {cells} if you mean it"
    )


def load_study_file(
    path: str | Path, overrides: dict[str, Any] | None = None, max_cells: int = MAX_CELLS
) -> StudySpec:
    """The validated study; `overrides` replace keys of its `base` (training parameters)
    and are checked exactly as if the file held them. A grid of more than `max_cells` cells
    is refused, counted before any is built."""
    path = Path(path)
    raw = _read_yaml(path)
    kind = raw.get("kind", "sweep")
    if kind not in ("grid", "sweep"):
        raise _fail(path, "kind", f"must be grid or sweep (got {kind!r})")
    base = _base(path, raw.get("base") or {}, overrides or {})
    spec: dict[str, Any] = {
        "name": str(raw.get("name") or path.stem),
        "kind": kind,
        "base": base,
        "models": _models(path, raw, base),
        "seed": _study_seed(path, raw),
        "seeds": _seeds(path, raw, base),
        "strata": _strata(path, raw),
    }
    if kind == "grid":
        per_regime = len(spec["models"]) * len(spec["seeds"])
        spec["regimes"] = _grid_regimes(path, raw, base, max_cells, per_regime)
        if len(spec["regimes"]) * per_regime > max_cells:
            raise _too_many(path, len(spec["regimes"]) * per_regime, max_cells)
        varied: dict[str, str] = {}
        for name, values in spec["regimes"].items():
            for key in values:
                varied.setdefault(key, f"regime {name}")
        if "models" in raw:
            varied["model"] = "its models:"
    else:
        spec.update(_sweep_settings(path, raw))
        varied = {p.name: "the search space" for p in spec["search_space"]}
    if "seeds" in raw:
        varied["seed"] = "its seeds:"
    _check_overrides_reach_runs(path, overrides or {}, varied)
    return StudySpec(**spec)


def _check_overrides_reach_runs(
    path: Path, overrides: dict[str, Any], varied: dict[str, str]
) -> None:
    """An override of a setting that the study sets per run (a regime's value, the search
    space, its `models:` or `seeds:`) never reaches a run: say so instead of running."""
    for key in overrides:
        if key in varied:
            raise UserInputError(
                f"set: {key} is set per run by {path} ({varied[key]}), so --set {key}=... "
                "would change no run; edit the study file (or copy it under a new name)"
            )


def _read_yaml(path: Path) -> dict:
    """The file's mapping, with no field outside `_FIELDS`."""
    if not path.is_file():
        raise UserInputError(f"study: file {path} not found")
    try:
        raw = load_study_yaml(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserInputError(f"study: {path} is not valid YAML{where} ({problem})") from None
    if not isinstance(raw, dict):
        raise UserInputError(f"study: {path} must be a YAML mapping")
    unknown = set(raw) - set(_FIELDS)
    if unknown:
        raise _fail(
            path, sorted(unknown)[0], f"unknown field (allowed: {', '.join(sorted(_FIELDS))})"
        )
    return raw


def _base(path: Path, base: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """The training parameters every run shares, with `overrides` applied; the file's base
    and the overrides are each checked, so that an error names the one that is wrong."""
    if not isinstance(base, dict):
        raise _fail(path, "base", "must be a mapping of training parameters")
    check_overrides(overrides)
    fields = _config_fields()
    for key in base:
        if key not in fields:
            raise _fail(path, f"base.{key}", "not a training parameter")
    try:
        TrainConfig(**base)
    except UserInputError as exc:
        raise _fail(path, "base", str(exc)) from None
    base = {**base, **overrides}
    try:
        TrainConfig(**base)
    except UserInputError as exc:
        raise UserInputError(f"set: {exc} (with the study's base)") from None
    return base


def _config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def _models(path: Path, raw: dict, base: dict) -> tuple[str, ...]:
    if "models" in raw and not raw["models"]:  # it ran the default MLP without a word
        raise _fail(path, "models", f"must list at least one model (got {raw['models']!r})")
    models = raw.get("models") or [base.get("model", "mlp")]
    if isinstance(models, str):
        models = [models]
    for m in models:
        _check_value(path, "models", "model", m)
    return tuple(models)


def _study_seed(path: Path, raw: dict) -> int:
    study_seed = raw.get("seed", 0)
    if not isinstance(study_seed, int) or isinstance(study_seed, bool) or study_seed < 0:
        raise _fail(path, "seed", f"must be an integer >= 0 (got {study_seed!r})")
    return study_seed


def _strata(path: Path, raw: dict) -> tuple[str, ...]:
    strata = raw.get("strata", [])
    if isinstance(strata, str):
        strata = [strata]
    if not isinstance(strata, list):
        raise _fail(path, "strata", f"must be a list of training parameters (got {strata!r})")
    fields = _config_fields()
    for name in strata:
        if name not in fields or name == "seed":
            raise _fail(path, "strata", f"{name!r} is not a training parameter other than seed")
    return tuple(strata)


def _seeds(path: Path, raw: dict, base: dict) -> tuple[int, ...]:
    seeds = raw.get("seeds", [base.get("seed", 0)])
    if (
        not isinstance(seeds, list)
        or not seeds
        or len(set(seeds)) != len(seeds)
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
    ):
        raise _fail(path, "seeds", f"must be a list of distinct integers (got {seeds!r})")
    for seed in seeds:
        _check_value(path, "seeds", "seed", seed)
    return tuple(seeds)


def _grid_regimes(
    path: Path, raw: dict, base: dict, max_cells: int = MAX_CELLS, per_regime: int = 1
) -> dict[str, dict]:
    """Named regimes as written, or the full-factorial design of `factors`; each checked
    against the base."""
    fields = _config_fields()
    regimes = raw.get("regimes")
    if "factors" in raw:
        if regimes:
            raise _fail(path, "factors", "give factors or regimes, not both")
        regimes = _factorial_regimes(path, raw["factors"], fields, max_cells, per_regime)
    if not isinstance(regimes, dict) or not regimes:
        raise _fail(
            path,
            "regimes",
            "a grid needs named regimes, e.g. "
            "{high-noise: {lr: 0.1, batch_size: 32}}, or factors, "
            "e.g. {lr: {log_space: [0.01, 0.2, 4]}, "
            "batch_size: [16, 64]}",
        )
    for regime, values in regimes.items():
        if not isinstance(values, dict):
            raise _fail(path, f"regimes.{regime}", "must be a mapping")
        for key in values:
            if key not in fields:
                raise _fail(path, f"regimes.{regime}.{key}", "not a training parameter")
        try:
            TrainConfig(**{**base, **values})
        except UserInputError as exc:
            raise _fail(path, f"regimes.{regime}", str(exc)) from None
    return {str(k): dict(v) for k, v in regimes.items()}


def _sweep_settings(path: Path, raw: dict) -> dict[str, Any]:
    """search_space, sampler, objectives, pruner and n_trials of a sweep, checked together
    (a grid sampler is never pruned; pruning needs one objective)."""
    space = raw.get("search_space")
    if not isinstance(space, dict) or not space:
        raise _fail(path, "search_space", "a sweep needs a search space (lr, batch_size, ...)")
    search_space = tuple(_parameter(path, k, v) for k, v in space.items())
    sampler = raw.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise _fail(path, "sampler", f"must be one of {', '.join(SAMPLERS)} (got {sampler!r})")
    objectives = raw.get("objective", "val_loss")
    objectives = [objectives] if isinstance(objectives, str) else list(objectives)
    for o in objectives:
        if o not in OBJECTIVES:
            raise _fail(path, "objective", f"must be among {', '.join(OBJECTIVES)} (got {o!r})")
    pruner = raw.get("pruner", "none" if sampler == "grid" else "median")
    if sampler == "grid" and pruner != "none":
        raise _fail(
            path,
            "pruner",
            "a designed grid (sampler: grid) is never pruned: every "
            "point is part of the design; use pruner: none",
        )
    if pruner not in PRUNERS:
        raise _fail(path, "pruner", f"must be one of {', '.join(PRUNERS)} (got {pruner!r})")
    if pruner != "none" and len(objectives) > 1:
        raise _fail(path, "pruner", "pruning needs a single objective; use pruner: none")
    n_trials = raw.get("n_trials", 20)
    if not isinstance(n_trials, int) or n_trials < 1:
        raise _fail(path, "n_trials", f"must be an integer >= 1 (got {n_trials!r})")
    if sampler == "grid" and any(p.choices is None for p in search_space):
        raise _fail(path, "sampler", "grid needs choices for every search_space parameter")
    return {
        "search_space": search_space,
        "sampler": sampler,
        "objectives": tuple(objectives),
        "pruner": pruner,
        "n_trials": n_trials,
    }
