"""The package's layers hold: measurement code (curvature/, geometry/) imports no MLflow,
Optuna, click or matplotlib, and only run/tracking.py imports MLflow (settle.py, the
detached helper, excepted)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lossgeo"
FORBIDDEN_IN_MEASUREMENT = {"mlflow", "optuna", "click", "matplotlib"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_measurement_code_imports_no_tracking_sweeps_cli_or_plots():
    files = sorted((PACKAGE / "curvature").glob("*.py")) + sorted(
        (PACKAGE / "geometry").glob("*.py"))
    assert len(files) > 10
    offenders = {f.name: imported_roots(f) & FORBIDDEN_IN_MEASUREMENT for f in files}
    assert {name: bad for name, bad in offenders.items() if bad} == {}


def test_only_the_tracking_module_imports_mlflow():
    importers = {str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py")
                 if "mlflow" in imported_roots(f)}
    assert importers == {"run/tracking.py", "run/settle.py"}
