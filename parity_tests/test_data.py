"""The data layer: the IDX reader on the real files and on broken ones, the generated
datasets, splits and preprocessing."""

from __future__ import annotations

import gzip
import shutil
import struct

import numpy as np
import pytest

from conftest import FASHION_DIR
from jaxnets.data import (
    load_dataset,
    load_idx_dir,
    load_idx_pair,
    load_images,
    make_cubic,
    make_spiral,
    preprocess,
    read_idx,
)
from jaxnets.errors import DataError


def test_real_fashion_mnist(fashion):
    assert fashion.train_x.shape == (60000, 28, 28) and fashion.train_x.dtype == np.uint8
    assert fashion.test_x.shape == (10000, 28, 28)
    assert fashion.train_y.dtype == np.int64 and fashion.train_y.shape == (60000,)
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
    assert np.bincount(fashion.train_y).tolist() == [6000] * 10
    assert np.bincount(fashion.test_y).tolist() == [1000] * 10
    assert fashion.train_x.max() == 255 and fashion.train_x.min() == 0


def test_debian_directory_is_found_automatically(fashion, tmp_path, monkeypatch):
    monkeypatch.delenv("JAXNETS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty data cache
    ds = load_images("fashion_mnist")
    assert str(FASHION_DIR) in ds.source or "tensorflow-datasets" in ds.source
    np.testing.assert_array_equal(ds.test_y, fashion.test_y)


def test_env_data_dir_is_used(fashion, tmp_path, monkeypatch):
    for f in FASHION_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setenv("JAXNETS_DATA_DIR", str(tmp_path))
    ds = load_images("mnist")  # any name: the directory the user gave is what is read
    assert str(tmp_path) in ds.source
    np.testing.assert_array_equal(ds.train_y, fashion.train_y)


def _write_gz(path, payload: bytes):
    path.write_bytes(gzip.compress(payload))
    return path


def _raw(name: str) -> bytes:
    return gzip.decompress((FASHION_DIR / name).read_bytes())


def test_bad_magic(fashion, tmp_path):
    raw = _raw("t10k-labels-idx1-ubyte.gz")
    bad = _write_gz(tmp_path / "labels.gz", b"\x12\x34" + raw[2:])
    with pytest.raises(DataError, match=r"labels\.gz: wrong magic number 0x1234"):
        read_idx(bad)


def test_truncated_payload(fashion, tmp_path):
    raw = _raw("t10k-images-idx3-ubyte.gz")
    bad = _write_gz(tmp_path / "images.gz", raw[:-100])
    with pytest.raises(DataError, match=r"images\.gz: truncated payload.*\(10000, 28, 28\)"):
        read_idx(bad)


def test_truncated_gzip_stream(fashion, tmp_path):
    data = (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: corrupt or truncated gzip"):
        read_idx(bad)


def test_not_gzip(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(DataError, match="not a gzip file"):
        read_idx(bad)


def test_count_mismatch(fashion):
    with pytest.raises(DataError, match=r"10000 images but .* holds 60000 labels"):
        load_idx_pair(FASHION_DIR / "t10k-images-idx3-ubyte.gz",
                      FASHION_DIR / "train-labels-idx1-ubyte.gz")


def test_wrong_image_size(tmp_path):
    header = struct.pack(">IIII", 0x803, 2, 27, 27)
    images = _write_gz(tmp_path / "img.gz", header + bytes(2 * 27 * 27))
    labels = _write_gz(tmp_path / "lab.gz", struct.pack(">II", 0x801, 2) + bytes(2))
    with pytest.raises(DataError, match="27x27, expected 28x28"):
        load_idx_pair(images, labels)


def test_missing_file_and_directory(fashion, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_idx_dir(tmp_path / "nowhere", "fashion_mnist")
    shutil.copy(FASHION_DIR / "train-images-idx3-ubyte.gz", tmp_path)
    with pytest.raises(DataError, match=r"missing train-labels-idx1-ubyte\.gz"):
        load_idx_dir(tmp_path, "fashion_mnist")


def test_no_source_says_how_to_get_the_data(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXNETS_DATA_DIR", raising=False)
    monkeypatch.setenv("JAXNETS_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty data cache
    # MNIST is not packaged by Debian and is not prepared for TFDS on this machine.
    with pytest.raises(DataError) as info:
        load_images("mnist")
    message = str(info.value)
    assert "tfds.data_source('mnist'" in message and "--data-dir" in message
    assert "jaxnets download mnist" in message
    assert "JAXNETS_DATA_DIR" in message
    assert "\n" not in message  # the CLI prints it as one line


def test_valid_split_and_limit(fashion):
    ds = load_dataset({"dataset": "fashion_mnist", "valid_size": 10000, "train_limit": 0,
                       "data_dir": str(FASHION_DIR)})
    assert len(ds.train_x) == 50000 and len(ds.valid_x) == 10000 and len(ds.test_x) == 10000
    np.testing.assert_array_equal(ds.valid_y, fashion.train_y[50000:])
    ds = load_dataset({"dataset": "fashion_mnist", "valid_size": 0, "train_limit": 2000,
                       "data_dir": str(FASHION_DIR)})
    assert len(ds.train_x) == 2000 and ds.valid_x is None


def test_preprocess_layouts(fashion):
    x = fashion.test_x[:4]
    scale = {"preprocess": "scale", "mean": 0.0, "std": 1.0}
    flat = preprocess(x, scale, "flat")
    assert flat.shape == (4, 784) and flat.dtype == np.float32
    assert flat.min() == 0.0 and flat.max() == 1.0
    nhwc, nchw = preprocess(x, scale, "nhwc"), preprocess(x, scale, "nchw")
    assert nhwc.shape == (4, 28, 28, 1) and nchw.shape == (4, 1, 28, 28)
    np.testing.assert_array_equal(nhwc[..., 0], nchw[:, 0])
    norm = preprocess(x, {"preprocess": "normalize", "mean": 0.1307, "std": 0.3081}, "flat")
    np.testing.assert_allclose(norm, (x.reshape(4, -1) / 255.0 - 0.1307) / 0.3081, atol=1e-6)


def test_spiral():
    x, y = make_spiral(seed=12345)
    assert x.shape == (3000, 2) and x.dtype == np.float32
    assert np.bincount(y).tolist() == [1000, 1000, 1000]
    # every point lies at radius t in [0, 1], t = linspace(0, 1, 1000) within each class
    radius = np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(radius[:1000], np.linspace(0, 1, 1000), atol=1e-6)
    x2, _ = make_spiral(seed=12345)
    np.testing.assert_array_equal(x, x2)
    ds = load_dataset({"dataset": "spiral", "valid_size": 0, "train_limit": 0})
    assert not np.array_equal(ds.train_x, ds.test_x)  # evaluation is a fresh draw


def test_cubic():
    x, y = make_cubic(seed=12345)
    assert x.shape == (100, 1) and y.shape == (100, 1)
    np.testing.assert_allclose(x[:, 0], np.linspace(-1, 1, 100), atol=1e-7)
    noise = y - x**3
    assert noise.min() >= -1e-6 and noise.max() <= 0.3 + 1e-6


def test_loading_leaves_no_tfds_directories_behind(fashion, tmp_path, monkeypatch):
    """TFDS's offline probe makes a ``mkdtemp("tfds")`` it never removes; the loader runs it
    in a private directory, so loading leaves $TMPDIR as it was."""
    import tempfile

    from jaxnets.data import load_images

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("JAXNETS_DATA_DIR", raising=False)
    load_images("fashion_mnist")
    assert [p.name for p in tmp_path.iterdir()] == []
