import gzip

import numpy as np
import pytest
import torch

from lossgeo import data as data_mod
from lossgeo.data import load_data, read_idx, resolve_data_dir
from lossgeo.errors import DataUnavailableError

from .conftest import write_idx


def test_splits_are_deterministic_disjoint_and_sized(fake_data_dir):
    a = load_data("mnist", fake_data_dir, seed=3, val_size=100, train_subset=300, probe_size=50)
    b = load_data("mnist", fake_data_dir, seed=3, val_size=100, train_subset=300, probe_size=50)
    assert (len(a.train), len(a.val), len(a.test), len(a.probe)) == (300, 100, 200, 50)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.probe.y, b.probe.y)
    # val and train are disjoint rows of the official training set
    train_rows = {tuple(r.flatten()[:40].tolist()) for r in a.train.x}
    assert not any(tuple(r.flatten()[:40].tolist()) in train_rows for r in a.val.x)
    # the probe set is a subset of the training split
    assert all(tuple(r.flatten()[:40].tolist()) in train_rows for r in a.probe.x)
    c = load_data("mnist", fake_data_dir, seed=4, val_size=100, train_subset=300, probe_size=50)
    assert not torch.equal(a.train.x, c.train.x)


def test_normalisation_and_layout(fake_data_dir):
    bundle = load_data("mnist", fake_data_dir, val_size=100, probe_size=10)
    raw_x, _ = data_mod.load_split_raw("mnist", fake_data_dir, train=False, download=False)
    expected = (raw_x.float() / 255 - 0.1307) / 0.3081
    assert bundle.test.x.shape == (200, 1, 28, 28) and bundle.test.x.dtype == torch.float32
    assert torch.allclose(bundle.test.x, expected)
    assert bundle.in_channels == 1 and bundle.image_size == 28


def test_batches_cover_split_once_with_ragged_tail(fake_data_dir):
    split = load_data("mnist", fake_data_dir, val_size=100, probe_size=10).test
    sizes = [len(y) for _, y in split.batches(64)]
    assert sizes == [64, 64, 64, 8]
    gen = torch.Generator().manual_seed(0)
    ys = torch.cat([y for _, y in split.batches(64, shuffle=True, generator=gen)])
    assert sorted(ys.tolist()) == sorted(split.y.tolist())


def test_real_mnist_loads(mnist_dir):
    bundle = load_data("mnist", mnist_dir, val_size=5000, probe_size=2048)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (55000, 5000, 10000)
    assert abs(float(bundle.train.x.mean())) < 0.02 and abs(float(bundle.train.x.std()) - 1) < 0.02
    assert set(bundle.test.y.tolist()) == set(range(10))


def test_missing_files_offline_says_where_it_looked(tmp_path):
    with pytest.raises(DataUnavailableError) as err:
        load_data("mnist", tmp_path, download=False)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message and "LOSSGEO_DATA_DIR" in message


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("LOSSGEO_DATA_DIR", raising=False)
    assert str(resolve_data_dir("")) == "data"
    monkeypatch.setenv("LOSSGEO_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert str(resolve_data_dir("/x")) == "/x"


def test_fashion_mnist_from_debian_layout(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    debian.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 120), ("t10k", 30)):
        for kind, arr in (
            ("images-idx3", rng.integers(0, 256, (n, 28, 28))),
            ("labels-idx1", rng.integers(0, 10, n)),
        ):
            plain = tmp_path / "plain"
            write_idx(plain, arr)
            with gzip.open(debian / f"{prefix}-{kind}-ubyte.gz", "wb") as fh:
                fh.write(plain.read_bytes())
            assert np.array_equal(read_idx(debian / f"{prefix}-{kind}-ubyte.gz"), arr)
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", debian)
    bundle = load_data(
        "fashion-mnist", tmp_path / "nothing-here", val_size=20, probe_size=10, download=False
    )
    assert (len(bundle.train), len(bundle.test)) == (100, 30)


def test_real_fashion_mnist_from_debian_package():
    if not data_mod.DEBIAN_FASHION_MNIST.exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
    bundle = load_data(
        "fashion-mnist", "/nonexistent", val_size=5000, probe_size=16, download=False
    )
    assert (len(bundle.train), len(bundle.test)) == (55000, 10000)
    assert abs(float(bundle.train.x.mean())) < 0.05


def test_a_failed_download_leaves_no_folders_behind(tmp_path, monkeypatch):
    """--data-dir /nonexistent/dd once left /nonexistent behind (torchvision makes every
    missing ancestor)."""
    import torchvision.datasets.mnist as tv_mnist

    from lossgeo.errors import DataUnavailableError

    def offline(*args, **kwargs):  # what the test machines' network does, without the wait
        raise RuntimeError("offline")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(DataUnavailableError, match="download failed"):
        load_data("mnist", tmp_path / "nonexistent" / "dd", val_size=10, probe_size=4)
    assert list(tmp_path.iterdir()) == []


def test_label_noise_replaces_that_share_of_training_labels_only(fake_data_dir):
    kw = dict(seed=2, val_size=100, train_subset=300, probe_size=300)
    clean = load_data("mnist", fake_data_dir, **kw)
    noisy = load_data("mnist", fake_data_dir, label_noise=0.4, **kw)
    again = load_data("mnist", fake_data_dir, label_noise=0.4, **kw)
    assert torch.equal(noisy.train.y, again.train.y)  # seeded
    assert torch.equal(clean.train.x, noisy.train.x)  # the same images, in the same order
    assert torch.equal(clean.val.y, noisy.val.y) and torch.equal(clean.test.y, noisy.test.y)
    changed = int((clean.train.y != noisy.train.y).sum())
    # 120 labels are redrawn over 10 classes: about a tenth of them draw the true one back
    assert 90 <= changed <= 120
    assert noisy.train.y.min() >= 0 and noisy.train.y.max() <= 9
    # the probe set is the training split's, with the same labels
    assert torch.equal(noisy.probe.y.sort().values, noisy.train.y.sort().values)


def test_noisy_labels_redraws_exactly_the_rounded_share():
    labels = torch.full((1000,), 10)  # a class no draw can give back
    noisy = data_mod._noisy_labels(labels, 0.2345, seed=0)
    assert int((noisy != 10).sum()) == 234
    assert torch.equal(data_mod._noisy_labels(labels, 0.0, seed=0), labels)


@pytest.mark.parametrize("share", [-0.1, 1.0])
def test_label_noise_outside_its_range_is_refused(fake_data_dir, share):
    with pytest.raises(DataUnavailableError, match="label_noise: must be in"):
        load_data("mnist", fake_data_dir, val_size=100, label_noise=share)
