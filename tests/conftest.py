import contextlib
import functools
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX as MNIST ships it: magic (0, 0, 0x08=uint8, ndim), big-endian dims, bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_fake_mnist(root: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """A learnable MNIST stand-in in torchvision's layout: class k lights up row block k."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 * k + 4 : 2 * k + 6, 4:24] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def fake_data_dir(tmp_path_factory) -> Path:
    return make_fake_mnist(tmp_path_factory.mktemp("fake-data"))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Real MNIST: $LOSSGEO_DATA_DIR or ../shared/data (CI sets it)."""
    for candidate in (os.environ.get("LOSSGEO_DATA_DIR"), SHARED_DATA):
        if candidate and (Path(candidate) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return Path(candidate)
    pytest.skip("real MNIST not found: set LOSSGEO_DATA_DIR to a folder holding MNIST/raw")


@functools.cache
def migrated_store() -> Path:
    """An empty MLflow sqlite store with its tables made, once a session: a fresh store's
    migrations cost seconds, a copy of this one milliseconds."""
    from mlflow import MlflowClient

    path = Path(tempfile.mkdtemp(prefix="lossgeo-mlflow-template-")) / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def copy_store(folder: Path) -> str:
    """A copy of the migrated store at folder/mlflow.db, its Default experiment's artifacts
    in folder/mlruns/0 (where a store made in that folder keeps them); returns its URI."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated_store(), folder / "mlflow.db")
    with contextlib.closing(sqlite3.connect(folder / "mlflow.db")) as db, db:
        db.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
            (str(folder / "mlruns" / "0"),),
        )
    return f"sqlite:///{folder}/mlflow.db"


@pytest.fixture
def storeless(tracking) -> Path:
    """`tracking` without a store: for what must never create one."""
    (tracking / "mlflow.db").unlink()
    return tracking


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> Path:
    """An isolated MLflow store (a copy of the migrated template) in a fresh working
    directory."""
    import mlflow

    copy_store(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    # an earlier test's lossgeo call set MLflow's process-wide URI, which beats the variable
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return tmp_path


def tiny_config(data_dir, **overrides):
    from lossgeo.config import TrainConfig

    base = dict(
        model="mlp",
        hidden="16",
        train_subset=200,
        val_size=100,
        probe_size=64,
        batch_size=32,
        epochs=2,
        lr=0.05,
        data_dir=str(data_dir),
        curvature=False,
        # the epoch measurements a test asks for by name: on, they cost a one-epoch run
        # ten times its training
        noise_scale=False,
        sharpness=False,
        pac_bayes=False,
        landscape=False,
    )
    base.update(overrides)
    return TrainConfig(**base)


@contextlib.contextmanager
def float64_default():
    """The one way tests switch to float64 (exact references need it); float32 after."""
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.fixture
def float64():
    """float64 as the default dtype for one test (`pytestmark = usefixtures("float64")` for a
    whole module)."""
    with float64_default():
        yield


@pytest.fixture(autouse=True)
def _float_default():
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(torch.float32)
