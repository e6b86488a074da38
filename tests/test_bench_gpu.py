"""benchmarks/bench_gpu.py, the script a GPU machine runs once, works: its --tiny form runs
every workload on CPU and writes the table."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_gpu.py"),
            "--tiny",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = out.read_text()
    assert table.startswith("# Curvature at scale (`bench_gpu.py --tiny`")
    for workload in (
        "ResNet-18, 4 images | lossgeo Lanczos",
        "lossgeo Hutchinson trace",
        "GPT-2 shape (2 layers",
        "ladder ResNet-18, 4 images | lossgeo hessian_eigen",
        "ladder GPT-2-small | lossgeo hessian_eigen",
        "default-like run: MLP",
    ):
        assert workload in table, workload
    assert "skipped" not in table
