"""The package's layers hold.

Every `lossgeo` import (top-level, lazy inside functions, relative) goes down the order
errors/version < config/losses < data/models < curvature < geometry < figures < run <
analysis < studies < cli, or stays inside its own layer; measurement code imports no MLflow,
Optuna, click or matplotlib; only the run/tracking/ package (and the detached settle helper)
imports MLflow."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lossgeo"
FORBIDDEN_IN_MEASUREMENT = {"mlflow", "optuna", "click", "matplotlib"}
# lowest first; a module may import its own layer and any layer below it
LAYERS = [
    ("errors", "version"),
    ("config", "losses"),
    ("data", "models"),
    ("curvature",),
    ("geometry",),
    ("figures",),
    ("run",),
    ("analysis",),
    ("studies",),
    ("cli", "__main__"),
    ("__init__",),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def layer_of(parts: tuple[str, ...]) -> str:
    """The layer of a module given as its path inside the package: ("run", "tracker") ->
    "run", ("losses",) -> "losses", () (the package root) -> "__init__"."""
    return parts[0] if parts and parts[0] != "__init__" else "__init__"


def is_module(parts: list[str]) -> bool:
    path = PACKAGE.joinpath(*parts) if parts else PACKAGE
    return bool(parts) and (path.with_suffix(".py").is_file() or path.is_dir())


def lossgeo_imports(
    source: str, module: tuple[str, ...], is_package: bool
) -> list[tuple[str, ...]]:
    """Every module of lossgeo that `source` imports, anywhere in it (function bodies
    included), as a path inside the package; `module` is where the source lives."""
    package = module if is_package else module[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, up level - 1
                base = list(package[: len(package) - node.level + 1])
                origin = ["lossgeo", *base, *(node.module.split(".") if node.module else [])]
            else:
                origin = node.module.split(".") if node.module else []
            # `from lossgeo import figures` imports the module lossgeo.figures, not the root
            names = [
                origin + [alias.name] if is_module(origin[1:] + [alias.name]) else origin
                for alias in node.names
            ]
        else:
            continue
        found += [tuple(name[1:]) for name in names if name[0] == "lossgeo"]
    return found


def upward_imports(source: str, module: tuple[str, ...], is_package: bool = False) -> list[str]:
    mine = layer_of(module)
    return [
        f"{'.'.join(module)} -> {'.'.join(target) or 'lossgeo'}"
        for target in lossgeo_imports(source, module, is_package)
        if RANK[layer_of(target)] > RANK[mine]
    ]


def package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        yield path, (parts[:-1] if is_package and len(parts) > 1 else parts), is_package


def test_every_module_belongs_to_a_layer():
    assert {layer_of(parts) for _, parts, _ in package_modules()} <= set(RANK)


def test_no_import_runs_up_a_layer():
    offenders = [
        line
        for path, parts, is_package in package_modules()
        for line in upward_imports(path.read_text(), parts, is_package)
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "source,module",
    [
        ("def f():\n    from lossgeo.analysis import plots\n", ("run", "experiment")),  # lazy
        ("from ..analysis.statistics import cell_summary\n", ("run", "experiment")),  # relative
        ("import lossgeo.studies.study\n", ("analysis", "report")),
        ("from lossgeo import __version__\n", ("run", "experiment")),  # the root reaches up
        ("from lossgeo import cli\n", ("studies", "study")),
        ("from lossgeo.run.tracking import open_store\n", ("curvature", "measure")),
    ],
)
def test_the_checker_sees_an_upward_import(source, module):
    assert upward_imports(source, module) != []


def test_the_checker_allows_imports_down_and_within_a_layer():
    source = (
        "from lossgeo.curvature import hessian_eigen\nfrom .tracking import TrackedRun\n"
        "from lossgeo.version import __version__\nfrom lossgeo import figures\n"
    )
    assert upward_imports(source, ("run", "experiment")) == []


def test_measurement_code_imports_no_tracking_sweeps_cli_or_plots():
    files = sorted((PACKAGE / "curvature").glob("*.py")) + sorted(
        (PACKAGE / "geometry").glob("*.py")
    )
    assert len(files) > 10
    offenders = {f.name: imported_roots(f) & FORBIDDEN_IN_MEASUREMENT for f in files}
    assert {name: bad for name, bad in offenders.items() if bad} == {}


def test_only_the_tracking_module_imports_mlflow():
    importers = {
        str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py") if "mlflow" in imported_roots(f)
    }
    assert {path for path in importers if not path.startswith("run/tracking/")} == {"run/settle.py"}
    assert len(importers) > 3  # the package's modules (store, logging, ...) do import it


def import_graph() -> dict[tuple[str, ...], set[tuple[str, ...]]]:
    """Module -> the modules it imports (lazy imports included; packages' `__init__` left
    out: re-exporting the submodules is what they are for)."""
    graph: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
    for path, parts, is_package in package_modules():
        if is_package:
            continue
        graph[parts] = {
            target
            for target in lossgeo_imports(path.read_text(), parts, is_package)
            if PACKAGE.joinpath(*target).with_suffix(".py").is_file() and target != parts
        }
    return graph


def import_circles(graph: dict[tuple[str, ...], set[tuple[str, ...]]]) -> list[list[str]]:
    """Every module that can reach itself, with the path back (depth-first)."""
    circles = []
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    circles.append([".".join(p) for p in [*path, start]])
                    stack.clear()
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return circles


def test_no_module_imports_one_that_imports_it_back():
    """The operator factories imported the FSDP operators, which import the base class
    back (lazily): a circle inside the curvature layer. Now none, in any layer."""
    assert import_circles(import_graph()) == []


def test_the_circle_checker_sees_a_lazy_circle():
    graph = {("a", "x"): {("a", "y")}, ("a", "y"): {("a", "z")}, ("a", "z"): {("a", "x")}}
    assert import_circles(graph)[0] == ["a.x", "a.y", "a.z", "a.x"]
    assert import_circles({("a", "x"): {("a", "y")}, ("a", "y"): set()}) == []


MAX_PARAMETERS = 8  # the bar for a public function (curvlinops has 5 over it)


def long_signatures(source: str) -> list[str]:
    """Public functions and methods (no leading underscore; `__init__` counts) with more than
    MAX_PARAMETERS parameters, `self`/`cls` and `*args`/`**kwargs` not counted."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if node.name.startswith("_") and node.name != "__init__":
            continue
        args = node.args
        names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        n = len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)
        if n > MAX_PARAMETERS:
            found.append(f"{node.name} ({n})")
    return found


def test_no_public_function_takes_more_than_eight_parameters():
    """Settings objects (Scope, EigenSolver, CurvatureSettings, StepSettings, LoopContext,
    ...) in place of long keyword lists."""
    long = {
        str(path.relative_to(PACKAGE)): found
        for path in PACKAGE.rglob("*.py")
        if (found := long_signatures(path.read_text()))
    }
    assert long == {}


def test_the_signature_checker_counts_parameters_but_not_self_or_private_helpers():
    nine = ", ".join(f"a{i}" for i in range(9))
    source = (
        f"def f({nine}): pass\n"
        f"def _g({nine}): pass\n"
        f"class C:\n    def __init__(self, {nine}): pass\n"
        "def h(self, a, b, c, d, e, f, g, i, *rest, **options): pass\n"
    )
    assert long_signatures(source) == ["f (9)", "__init__ (9)"]
