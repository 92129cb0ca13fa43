"""Fuzzing the IDX reader, the image/label pair check and the ``--set`` parser with hypothesis:
whatever the bytes or text, the answer is a valid array (or config) or the project's own error,
never another exception. Derandomized and without a database, so CI runs the same examples
every time."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxnets.config import DEFAULTS, load_config
from jaxnets.data import load_idx_pair, read_idx
from jaxnets.errors import ConfigError, DataError

pytestmark = pytest.mark.filterwarnings("error")  # a cast warning would be a bug here too

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TYPE_CODES = {"u1": 0x08, "i1": 0x09, ">i2": 0x0B, ">i4": 0x0C, ">f4": 0x0D, ">f8": 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` as an IDX file: magic (00 00, type, ndim), big-endian dims, big-endian data."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    code = TYPE_CODES[dtype.str.replace("|", "")]
    return (struct.pack(">HBB", 0, code, array.ndim)
            + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(dtype).tobytes())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _read(workdir, data: bytes, name: str):
    """read_idx on ``data`` written to ``name``: the array, or None for a DataError."""
    path = workdir / name
    path.write_bytes(data)
    try:
        array = read_idx(path)
    except DataError as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"
        assert "\n" not in str(exc)
        return None
    assert isinstance(array, np.ndarray) and 1 <= array.ndim <= 4
    assert array.dtype.isnative
    return array


def _check_consistent(raw: bytes, array: np.ndarray | None) -> None:
    """An accepted IDX payload holds exactly the header, the dims and the values."""
    if array is not None:
        assert len(raw) == 4 + 4 * array.ndim + array.nbytes
        assert struct.unpack(f">{array.ndim}I", raw[4:4 + 4 * array.ndim]) == array.shape


dtypes = st.sampled_from(["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
idx_arrays = dtypes.flatmap(lambda dt: hnp.arrays(
    dt, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)))


@FUZZ
@given(array=idx_arrays, compress=st.booleans())
def test_valid_idx_round_trips(workdir, array, compress):
    raw = idx_bytes(array)
    data, name = (gzip.compress(raw), "ok.gz") if compress else (raw, "ok")
    out = _read(workdir, data, name)
    assert out is not None
    np.testing.assert_array_equal(out, array)  # NaNs compare equal here
    assert out.dtype == array.dtype.newbyteorder("=")


@FUZZ
@given(data=st.binary(max_size=300))
# 65536**4 == 2**64 wrapped to 0 in np.prod(int64), "matching" an empty payload
@example(data=struct.pack(">HBB4I", 0, 0x08, 4, 65536, 65536, 65536, 65536))
# a zero dimension beside dims too large for NumPy: 0 bytes expected, reshape refused
@example(data=struct.pack(">HBB4I", 0, 0x08, 4, 0, 2**32 - 1, 2**32 - 1, 2**32 - 1))
@example(data=b"")
@example(data=b"\x1f\x8b")
def test_arbitrary_bytes_raw(workdir, data):
    _check_consistent(data, _read(workdir, data, "raw-idx"))


@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_gzip_wrapped(workdir, data):
    _check_consistent(data, _read(workdir, gzip.compress(data), "wrapped.gz"))


@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_named_gz(workdir, data):
    """Bytes that are not gzip under a ``.gz`` name: refused (or, by luck, valid gzip)."""
    array = _read(workdir, data, "named.gz")
    if not data.startswith(b"\x1f\x8b"):
        assert array is None


@FUZZ
@given(type_code=st.sampled_from([*TYPE_CODES.values(), 0x00, 0x07, 0x0A, 0x0F, 0xFF]),
       ndim=st.integers(0, 6),
       dims=st.lists(st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1)),
                     min_size=0, max_size=6),
       payload=st.binary(max_size=200), compress=st.booleans())
def test_plausible_headers(workdir, type_code, ndim, dims, payload, compress):
    """Mostly well-formed headers with any dims (huge ones too) and any payload."""
    raw = struct.pack(">HBB", 0, type_code, ndim) + b"".join(struct.pack(">I", d) for d in dims)
    raw += payload
    data, name = (gzip.compress(raw), "hdr.gz") if compress else (raw, "hdr")
    _check_consistent(raw, _read(workdir, data, name))


def _mutate(base: bytes, draw) -> bytes:
    """Flip, overwrite, insert, delete or truncate some bytes of ``base``."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


SMALL_IDX = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
SMALL_F32 = idx_bytes(np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3))


@FUZZ
@given(data=st.data(), base=st.sampled_from([SMALL_IDX, SMALL_F32]), compress=st.booleans())
def test_mutated_valid_file(workdir, data, base, compress):
    raw = _mutate(base, data.draw)
    blob, name = (gzip.compress(raw), "mut.gz") if compress else (raw, "mut")
    _check_consistent(raw, _read(workdir, blob, name))


@FUZZ
@given(data=st.data(), base=st.sampled_from([SMALL_IDX, SMALL_F32]))
def test_mutated_gzip_stream(workdir, data, base):
    """A damaged gzip stream (header, deflate data, CRC or length trailer)."""
    _read(workdir, _mutate(gzip.compress(base), data.draw), "damaged.gz")


label_arrays = st.one_of(
    hnp.arrays(np.uint8, st.integers(0, 4), elements=st.integers(0, 9)),  # valid labels
    dtypes.flatmap(lambda dt: hnp.arrays(
        dt, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4))),
)
image_arrays = st.one_of(
    st.integers(0, 3).map(lambda n: np.zeros((n, 28, 28), np.uint8)),  # valid images
    hnp.arrays(np.uint8, st.tuples(st.integers(0, 3), st.sampled_from([27, 28]),
                                   st.sampled_from([28, 29]))),
    dtypes.flatmap(lambda dt: hnp.arrays(
        dt, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=3))),
)


@FUZZ
@given(data=st.data(), images=image_arrays, labels=label_arrays,
       mutate=st.sampled_from(["none", "images", "labels"]), compress=st.booleans())
def test_image_label_pairs(workdir, data, images, labels, mutate, compress):
    """load_idx_pair: a valid (images, labels) pair or a DataError, whatever the two files."""
    blobs = {"images": idx_bytes(images), "labels": idx_bytes(labels)}
    if mutate != "none":
        blobs[mutate] = _mutate(blobs[mutate], data.draw)
    paths = {}
    for part, raw in blobs.items():
        paths[part] = workdir / (f"{part}.gz" if compress else part)
        paths[part].write_bytes(gzip.compress(raw) if compress else raw)
    try:
        x, y = load_idx_pair(paths["images"], paths["labels"])
    except DataError as exc:
        assert "\n" not in str(exc)
        return
    assert x.dtype == np.uint8 and x.ndim == 3 and x.shape[1:] == (28, 28)
    assert y.dtype == np.int64 and y.shape == (len(x),)
    assert ((y >= 0) & (y <= 9)).all()


KEYS = [*(k for k, v in DEFAULTS.items() if not isinstance(v, dict)),
        *(f"{s}.{k}" for s, table in DEFAULTS.items() if isinstance(table, dict) for k in table)]


def _leaves(cfg: dict, prefix: str = ""):
    for key, value in cfg.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _load_or_config_error(overrides: list[str]) -> None:
    """load_config: a ConfigError, or a config whose every number is finite and usable."""
    try:
        cfg = load_config("mlp_fashion", overrides)
    except ConfigError as exc:
        assert str(exc)
        return
    for key, value in _leaves(cfg):
        assert type(value) is type(_DEFAULT_LEAVES[key]), key
        if isinstance(value, float):
            assert np.isfinite(value), key
        if isinstance(value, int) and not isinstance(value, bool):
            assert -(2**63) <= value < 2**63, key
    assert cfg["seed"] >= 0 and cfg["data"]["seed"] >= 0
    assert cfg["optimizer"]["learning_rate"] > 0 and cfg["train"]["epochs"] >= 1


_DEFAULT_LEAVES = dict(_leaves(DEFAULTS))
NUMERIC_KEYS = sorted(k for k, v in _DEFAULT_LEAVES.items()
                      if isinstance(v, int | float) and not isinstance(v, bool))


@FUZZ
@given(key=st.one_of(st.sampled_from(KEYS), st.text(max_size=20)),
       value=st.one_of(st.text(max_size=30), st.integers().map(str),
                       st.floats().map(repr), st.sampled_from(["nan", "-inf", "[1, 2]", "true",
                                                               "'x'", '"a\\u0000"', "{a=1}"])))
def test_any_override_is_a_config_or_a_config_error(key, value):
    _load_or_config_error([f"{key}={value}"])


@FUZZ
@given(key=st.sampled_from(NUMERIC_KEYS),
       value=st.one_of(st.floats(), st.integers(), st.integers(-(2**70), 2**70),
                       st.sampled_from([0, -1, 2**63, 10**400, -(10**400)])))
def test_numeric_overrides(key, value):
    """NaN, Inf, negative and huge numbers in every numeric key: refused or in range."""
    text = {float("inf"): "inf", float("-inf"): "-inf"}.get(value, repr(value))
    _load_or_config_error([f"{key}={'nan' if value != value else text}"])
