"""Checkpoints that survive a crash and that either framework can read.

A checkpoint is a directory ``OUT/checkpoints/epoch-NNNN/`` holding

- ``weights.safetensors``: the model in its framework's names and layouts (``jaxnets convert``
  turns it into the other framework's),
- ``optimizer.safetensors``: the optimizer state, flattened to named arrays,
- ``meta.json``: framework, epochs done, global step, the config, the metric rows so far, and the
  SHA-256 of both files.

Writing is atomic: everything goes into a temporary directory, each file is fsynced, the
directory is renamed into place, and only then is ``OUT/checkpoints/latest`` (the name of the
newest checkpoint) replaced, again through a temporary file, fsync and rename. A crash at any
moment leaves the previous checkpoint and the ``latest`` pointing at it intact. Reading checks
the checksums and refuses a checkpoint whose files changed.

Why not Orbax: its format (TensorStore/OCDBT) is JAX-only, while one format for both frameworks
lets the PyTorch side resume the same way and lets weights cross over with ``jaxnets convert``;
safetensors also cannot carry code, so a checkpoint from someone else is safe to open.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jaxnets.errors import CheckpointError
from jaxnets.report import write_text_atomic

FORMAT = 1
FILES = ("weights.safetensors", "optimizer.safetensors")


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]
    weights: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def save(out: Path, weights: dict[str, np.ndarray], optimizer: dict[str, np.ndarray],
         meta: dict[str, Any]) -> Path:
    """Write ``out/checkpoints/epoch-NNNN`` atomically and point ``latest`` at it."""
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{int(meta['epoch']):04d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for filename, arrays in zip(FILES, (weights, optimizer), strict=True):
            save_file({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in arrays.items()},
                      str(tmp / filename),
                      metadata={"framework": str(meta["framework"]), "format": str(FORMAT)})
            _fsync(tmp / filename)
        meta = {"format": FORMAT, **meta,
                "sha256": {filename: sha256(tmp / filename) for filename in FILES}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _fsync(tmp / "meta.json")
        _fsync(tmp)
        final = root / name
        if final.exists():  # not the one ``latest`` names (see :func:`prepare`): replaced
            old = root / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / "latest", name + "\n")
    return final


def prepare(out: Path, resume: Checkpoint | None) -> str | None:
    """Make ``out/checkpoints`` ready for a run, so that no save ever replaces the checkpoint
    ``latest`` names. A run that does not continue from these very checkpoints (a fresh run, or
    one resumed from elsewhere) moves them aside first (one rename, to
    ``checkpoints.previous-N``); a run resumed from an older one of them first points
    ``latest`` at it. Returns a note for the user, or None."""
    root = checkpoint_dir(out)
    if resume is None or resume.path.parent.resolve() != root.resolve():
        if not root.exists():
            return None
        n = 1
        while root.with_name(f"checkpoints.previous-{n}").exists():
            n += 1
        os.replace(root, root.with_name(f"checkpoints.previous-{n}"))
        return f"the checkpoints already in {out} were moved to {root.name}.previous-{n}"
    latest = root / "latest"
    if not latest.is_file() or latest.read_text(encoding="utf-8").strip() != resume.path.name:
        write_text_atomic(latest, resume.path.name + "\n")
        return f"{latest} now names {resume.path.name}; later checkpoints will be replaced"
    return None


def find(path: str | os.PathLike) -> Path:
    """A run directory (its latest checkpoint), a ``checkpoints/`` directory (or one moved
    aside), or one checkpoint directory -> that checkpoint's directory."""
    path = Path(path)
    if (path / "meta.json").exists():
        return path
    root = path if (path / "latest").is_file() else checkpoint_dir(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory")
    latest = root / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{path}: no checkpoint here (expected {latest}); train with "
                              f"--out {path} to make one")
    name = latest.read_text(encoding="utf-8").strip()
    if not (root / name / "meta.json").is_file():
        raise CheckpointError(f"{latest} names {name!r}, which is not a checkpoint in {root}")
    return root / name


def load(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint (see :func:`find` for what ``path`` may be)."""
    where = find(path)
    try:
        meta = json.loads((where / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where / 'meta.json'}: unreadable checkpoint metadata "
                              f"({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "sha256" not in meta:
        raise CheckpointError(f"{where / 'meta.json'}: not a jaxnets checkpoint (format "
                              f"{FORMAT}) metadata file")
    arrays = []
    for filename in FILES:
        file = where / filename
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        if sha256(file) != meta["sha256"].get(filename):
            raise CheckpointError(f"{file}: checksum mismatch (the file changed or is corrupt "
                                  f"since it was saved); refusing to load it")
        try:
            arrays.append(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
    return Checkpoint(where, meta, arrays[0], arrays[1])
