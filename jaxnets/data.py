"""Datasets as NumPy arrays, framework-neutral: MNIST, Fashion-MNIST and the generated toys.

Where the images come from, in order:

1. an explicit directory of IDX files (``--data-dir`` or ``$JAXNETS_DATA_DIR``);
2. the data cache, ``$XDG_CACHE_HOME/jaxnets/<name>/`` (default ``~/.cache/jaxnets/<name>/``),
   where ``jaxnets download`` puts the files (:mod:`jaxnets.download`);
3. a TFDS copy already prepared on this machine (``tfds.data_source``: no TensorFlow needed);
4. Debian's ``dataset-fashion-mnist`` package, ``/usr/share/datasets/fashion-mnist/``;
5. a TFDS download, when the network answers.

A directory of IDX files may use either naming style (:mod:`jaxnets.idx`), gzipped or not.

Each epoch's batch order is made here, once, with NumPy (:func:`epoch_batches`), and the same
index batches are fed to both frameworks.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from jaxnets.errors import DataError
from jaxnets.idx import (  # read_idx and read_idx_images: re-exported, their old home
    IDX_FILES,
    load_idx_pair,
    read_idx,  # noqa: F401
    read_idx_images,  # noqa: F401
    require_idx,
)

IMAGE_DATASETS = ("mnist", "fashion_mnist")
GENERATED_DATASETS = ("spiral", "cubic")
DEBIAN_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}


@dataclass
class Dataset:
    """Raw arrays. Images: ``x`` uint8 (N, 28, 28), ``y`` int64 (N,). Toys: float32 (N, D)."""

    name: str
    source: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    valid_x: np.ndarray | None = None
    valid_y: np.ndarray | None = None

    @property
    def num_train(self) -> int:
        return len(self.train_x)

    def head(self, train: int, test: int | None = None) -> Dataset:
        """The first ``train`` training and ``test`` test examples (all test ones if None)."""
        return replace(self, train_x=self.train_x[:train], train_y=self.train_y[:train],
                       test_x=self.test_x[:test], test_y=self.test_y[:test])


# ----------------------------------------------------------------------------- IDX directories


def cache_dir(name: str) -> Path:
    """Where ``jaxnets download`` keeps a dataset: ``$XDG_CACHE_HOME/jaxnets/<name>`` (default
    ``~/.cache/jaxnets/<name>``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "jaxnets" / name


def load_idx_dir(directory: str | os.PathLike, name: str) -> Dataset:
    """The four IDX files in ``directory`` (either naming style, gzipped or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"data directory {directory} does not exist")
    arrays = {}
    for split, (images, labels) in IDX_FILES.items():
        arrays[split] = load_idx_pair(require_idx(directory, images),
                                      require_idx(directory, labels))
    return Dataset(name, f"IDX files in {directory}", *arrays["train"], *arrays["test"])


# ----------------------------------------------------------------------------- TFDS


@contextlib.contextmanager
def _private_tempdir() -> Iterator[None]:
    """TFDS's ``DatasetInfo.initialize_from_bucket`` makes a ``tempfile.mkdtemp("tfds")`` it
    never removes (an empty directory in $TMPDIR per load): TFDS runs with ``tempfile`` pointed
    at a private directory that is removed afterwards."""
    saved = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="jaxnets-tfds-") as scratch:
        tempfile.tempdir = scratch
        try:
            yield
        finally:
            tempfile.tempdir = saved


def _tfds_arrays(name: str, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds  # imported lazily: only this path needs it
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # "no dataset_info.json" is our cue, not news

    with _private_tempdir():
        source = tfds.data_source(name, split=split, download=download,
                                  builder_kwargs={"file_format": "array_record"})
        records = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(r["image"], np.uint8).reshape(28, 28) for r in records])
    labels = np.asarray([int(r["label"]) for r in records], np.int64)
    return images, labels


def load_tfds(name: str, download: bool) -> Dataset:
    train, test = (_tfds_arrays(name, split, download) for split in ("train", "test"))
    return Dataset(name, f"tensorflow-datasets '{name}'", *train, *test)


def _network_answers(host: str = "storage.googleapis.com", timeout: float = 3.0) -> bool:
    """TFDS retries a failed download for minutes; ask the network once, quickly, first."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _how_to_get(name: str) -> str:
    debian = ("sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu; used automatically); "
              if name == "fashion_mnist" else "")
    return (
        f"no source of the {name!r} dataset worked; any one of these fixes it: "
        f"jaxnets download {name}; {debian}on a machine with network, python -c \"import "
        f"tensorflow_datasets as tfds; "
        f"tfds.data_source('{name}', builder_kwargs={{'file_format': 'array_record'}})\"; "
        f"or put the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a directory and pass "
        f"--data-dir DIR or set JAXNETS_DATA_DIR=DIR"
    )


def load_images(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load MNIST or Fashion-MNIST from the first source that works (see the module docstring)."""
    if name not in IMAGE_DATASETS:
        raise DataError(f"unknown image dataset {name!r}; choose one of "
                        f"{', '.join(IMAGE_DATASETS)}")
    explicit = data_dir or os.environ.get("JAXNETS_DATA_DIR")
    if explicit:  # the user said where: use it or fail, never silently load something else
        return load_idx_dir(explicit, name)
    cached = cache_dir(name)
    if cached.is_dir():  # `jaxnets download` made it: a broken copy is an error
        return load_idx_dir(cached, name)
    tried = []
    try:
        return load_tfds(name, download=False)
    except DataError:
        raise
    except Exception as exc:  # TFDS raises many types for "not prepared here"
        tried.append(f"TFDS (not prepared here: {type(exc).__name__})")
    debian = DEBIAN_DIRS.get(name)
    if debian is not None and debian.is_dir():
        return load_idx_dir(debian, name)
    if os.environ.get("JAXNETS_OFFLINE") != "1" and _network_answers():
        try:
            return load_tfds(name, download=True)
        except Exception as exc:
            tried.append(f"TFDS download ({type(exc).__name__}: {exc})")
    raise DataError(_how_to_get(name))


# ----------------------------------------------------------------------------- generated data


def make_spiral(points_per_class: int = 1000, classes: int = 3, seed: int = 12345,
                noise: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """The course's spiral: x (classes * N, 2) float32, y (classes * N,) int64.

    For class c: t = linspace(0, 1, N), angle = linspace(2 pi c / C, 2 pi (2 + c) / C, N)
    + noise * standard normal, point = t * (sin(angle), cos(angle)). The course draws the noise
    with torch.randn; here it is NumPy's default generator, so the points differ, the law does not.
    """
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(classes):
        t = np.linspace(0.0, 1.0, points_per_class)
        angle = np.linspace(2 * np.pi * c / classes, 2 * np.pi * (2 + c) / classes,
                            points_per_class) + noise * rng.standard_normal(points_per_class)
        xs.append(np.stack([t * np.sin(angle), t * np.cos(angle)], axis=1))
        ys.append(np.full(points_per_class, c, np.int64))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def make_cubic(points: int = 100, seed: int = 12345) -> tuple[np.ndarray, np.ndarray]:
    """The course's 1-D regression: x = linspace(-1, 1) (N, 1), y = x^3 + 0.3 U(0, 1) (N, 1)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-1.0, 1.0, points)[:, None]
    y = x**3 + 0.3 * rng.random((points, 1))
    return x.astype(np.float32), y.astype(np.float32)


_GENERATORS = {"spiral": make_spiral, "cubic": make_cubic}


def load_generated(name: str, seed: int) -> Dataset:
    """Training set from ``seed``; the evaluation set is a fresh draw with ``seed + 1``."""
    make = _GENERATORS[name]
    return Dataset(name, f"generated ({name}, seeds {seed} and {seed + 1})",
                   *make(seed=seed), *make(seed=seed + 1))


# ----------------------------------------------------------------------------- splits, batches


def load_dataset(data_cfg: dict[str, Any], seed: int = 12345) -> Dataset:
    """The dataset a config's ``[data]`` table names, with its train limit and valid split.

    ``seed``: the generated datasets' seed when ``data_cfg`` has none."""
    name = data_cfg["dataset"]
    if name in GENERATED_DATASETS:
        ds = load_generated(name, data_cfg.get("seed", seed))
    else:
        ds = load_images(name, data_cfg.get("data_dir") or None)
    valid = data_cfg.get("valid_size", 0)
    if valid:
        if valid >= ds.num_train:
            raise DataError(f"data.valid_size = {valid} leaves no training data "
                            f"({ds.num_train} training examples)")
        ds.valid_x, ds.valid_y = ds.train_x[-valid:], ds.train_y[-valid:]
        ds.train_x, ds.train_y = ds.train_x[:-valid], ds.train_y[:-valid]
    limit = data_cfg.get("train_limit", 0)
    if limit:
        ds.train_x, ds.train_y = ds.train_x[:limit], ds.train_y[:limit]
    return ds


def _check_finite(values: np.ndarray, what: str) -> None:
    """NaN or Inf in float data would turn every loss into NaN: a DataError naming ``what``."""
    bad = ~np.isfinite(values)
    if bad.any():
        first = int(np.flatnonzero(bad.reshape(len(values), -1).any(axis=1))[0])
        raise DataError(f"{what} hold {int(bad.sum())} NaN or Inf value(s) (as float32), the "
                        f"first in example {first}")


def preprocess(x: np.ndarray, data_cfg: dict[str, Any], layout: str,
               what: str = "input data") -> np.ndarray:
    """Raw examples -> float32 model inputs.

    ``layout``: ``"flat"`` (N, 784); ``"nhwc"`` (N, 28, 28, 1) for Flax; ``"nchw"`` (N, 1, 28, 28)
    for PyTorch. Generated data is already float and only cast; NaN or Inf in it is a
    :class:`DataError` naming ``what``.
    """
    if x.dtype != np.uint8:
        with np.errstate(over="ignore"):  # a float64 beyond float32 becomes Inf: refused next
            out = x.astype(np.float32)
        _check_finite(out, what)
        return out
    out = x.astype(np.float32)
    if data_cfg["preprocess"] in ("scale", "normalize"):
        out = out / np.float32(255.0)
    if data_cfg["preprocess"] == "normalize":
        out = (out - np.float32(data_cfg["mean"])) / np.float32(data_cfg["std"])
    if layout == "flat":
        return out.reshape(len(out), -1)
    if layout == "nhwc":
        return out[..., None]
    if layout == "nchw":
        return out[:, None]
    raise ValueError(f"unknown layout {layout!r}")


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int,
                  shuffle: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """One epoch's order as index batches: ``full`` (num_full, batch_size) and the remainder.

    Made once with NumPy from ``(seed, epoch)`` and fed to both frameworks. Like PyTorch's
    DataLoader (``drop_last=False``), the last, smaller batch is kept: ``rest`` holds it, or is
    None when ``batch_size`` divides ``num_examples``.
    """
    order = (np.random.default_rng([seed, epoch]).permutation(num_examples) if shuffle
             else np.arange(num_examples))
    num_full = num_examples // batch_size
    full = order[: num_full * batch_size].reshape(num_full, batch_size)
    rest = order[num_full * batch_size:]
    return full, (rest if len(rest) else None)


def input_layout(cfg: dict[str, Any], framework: str) -> str:
    """How a framework's model takes the config's inputs: "flat", "nhwc" (jax) or "nchw"."""
    return "flat" if cfg["data"]["flatten"] else {"jax": "nhwc", "torch": "nchw"}[framework]


def model_arrays(dataset: Dataset, cfg: dict[str, Any], framework: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x, train_y, test_x, test_y)`` as a framework's model takes them: inputs
    preprocessed into its layout (NHWC for ``"jax"``, NCHW for ``"torch"``, or flat vectors),
    targets as the config's loss wants them."""
    data_cfg, loss = cfg["data"], cfg["train"]["loss"]
    layout = input_layout(cfg, framework)

    def what(split: str, part: str) -> str:
        return f"the {split} {part} of {dataset.name!r} ({dataset.source})"

    return (preprocess(dataset.train_x, data_cfg, layout, what("training", "inputs")),
            prepare_targets(dataset.train_y, loss, what("training", "targets")),
            preprocess(dataset.test_x, data_cfg, layout, what("test", "inputs")),
            prepare_targets(dataset.test_y, loss, what("test", "targets")))


def prefetch(items: Iterable, size: int = 2) -> Iterator:
    """Yield ``items`` while a background thread produces the next ``size`` of them (the
    sources' asynchronous loader): gathering and transferring batch k+1 and k+2 overlaps the
    training step on batch k. An exception in the producer is raised in the consumer.

    When the consumer stops early (a ``break``, an exception, ``close()``), the generator's
    exit tells the producer to stop, empties the queue so a producer waiting for room wakes,
    and waits for the thread to end: no thread is left blocked, no buffer kept alive."""
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                buffer.put(item)
                if stop.is_set():  # the consumer has gone: drop the rest
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            buffer.put(_Failure(exc))
            return
        buffer.put(done)

    def drain() -> None:
        while True:
            try:
                buffer.get_nowait()
            except queue.Empty:
                return

    producer = threading.Thread(target=produce, daemon=True, name="jaxnets-prefetch")
    producer.start()
    try:
        while (item := buffer.get()) is not done:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        # After the drain the producer puts at most one more item (there is room for it)
        # before it sees ``stop``, so the join ends once the item in hand is made.
        stop.set()
        drain()
        producer.join()
        drain()


@dataclass
class _Failure:
    error: BaseException


def prepare_targets(y: np.ndarray, loss: str, what: str = "targets") -> np.ndarray:
    """Labels as each loss wants them: integer classes for cross-entropy; float32 values for
    MSE (an integer label becomes the digit's value, the Paddle notes' regression of a digit).
    NaN or Inf in float targets is a :class:`DataError` naming ``what``."""
    if y.dtype.kind == "f":
        with np.errstate(over="ignore"):
            _check_finite(y.astype(np.float32), what)
    if loss == "cross_entropy":
        return y.astype(np.int64)
    out = y.astype(np.float32)
    return out[:, None] if out.ndim == 1 else out
