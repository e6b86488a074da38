"""What lossgeo's commands and examples leave in a checkout is ignored by git (a newcomer
found studies/optuna.db.lock, latex/ and hf_trainer_output/ in `git status`)."""

import shutil
import subprocess

import pytest

from .conftest import REPO

LEFT_BEHIND = [
    "mlflow.db",
    "mlruns/0/x",
    "plots/loss_curves.png",
    "latex/main.tex",
    "latex/figures/a.png",
    "studies/optuna.db",
    "studies/optuna.db.lock",
    "hf_trainer_output/checkpoint-1/x",
    "data/MNIST/raw/x",
]


def test_what_commands_leave_behind_is_ignored():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "check-ignore", "--no-index", *LEFT_BEHIND],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert sorted(out.stdout.split()) == sorted(LEFT_BEHIND)
