"""Bad input of every kind gives the project's own error, with one readable line naming what is
at fault: the data cases test_data.py does not cover, config values and names, configs that hold
code (never run), and the CLI's exit codes for them. test_fuzz.py fuzzes the same readers."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from jaxnets.config import load_config
from jaxnets.data import (
    Dataset,
    load_dataset,
    load_generated,
    load_idx_pair,
    load_images,
    model_arrays,
    preprocess,
    read_idx,
)
from jaxnets.errors import ConfigError, DataError


def _idx(dims: tuple[int, ...], payload: bytes, type_code: int = 0x08) -> bytes:
    return struct.pack(">HBB", 0, type_code, len(dims)) + struct.pack(f">{len(dims)}I", *dims) \
        + payload


def _write(path: Path, raw: bytes, compress: bool = True) -> Path:
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def _images(n: int) -> bytes:
    return _idx((n, 28, 28), bytes(n * 28 * 28))


# ----------------------------------------------------------------------------- IDX files


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nothing-here\.gz: file not found"):
        read_idx(tmp_path / "nothing-here.gz")


def test_a_directory_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}: cannot be read"):
        read_idx(tmp_path)


def test_corrupt_gzip_body_and_crc(tmp_path):
    packed = bytearray(gzip.compress(_images(2)))
    body = bytearray(packed)
    body[len(body) // 2] ^= 0xFF  # inside the deflate stream
    with pytest.raises(DataError, match=r"body\.gz: corrupt or truncated gzip data"):
        read_idx(_write(tmp_path / "body.gz", bytes(body), compress=False))
    crc = bytearray(packed)
    crc[-8] ^= 0x01  # the CRC-32 in the trailer
    with pytest.raises(DataError, match=r"crc\.gz: corrupt or truncated gzip data"):
        read_idx(_write(tmp_path / "crc.gz", bytes(crc), compress=False))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00\x00", r"too short for an IDX header \(2 bytes\)"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", r"truncated header \(8 bytes, 16 needed\)"),
        (b"\x00\x00\x08\x00", r"wrong magic number 0x00000800"),  # zero dimensions
        (b"\x00\x00\x10\x01", r"wrong magic number 0x00001001"),  # no such type
        (_idx((2,), bytes(5)), r"too long payload: .* shape \(2,\) \(2 bytes\) .* 5 bytes"),
        (_idx((3,), bytes(5), type_code=0x0B),
         r"truncated payload: .*\(3,\) \(6 bytes\) but the file holds 5 bytes"),
    ],
)
def test_bad_headers(tmp_path, raw, message):
    path = _write(tmp_path / "file-idx1-ubyte.gz", raw)
    with pytest.raises(DataError, match=r"file-idx1-ubyte\.gz: " + message):
        read_idx(path)


def test_header_dims_too_large(tmp_path):
    """65536**4 == 2**64 once wrapped to 0 (np.prod in int64), "matching" an empty payload; a
    zero dimension beside huge ones promises 0 bytes but is no shape NumPy can make."""
    wrapped = _write(tmp_path / "wrapped", _idx((65536,) * 4, b""), compress=False)
    with pytest.raises(DataError, match=r"wrapped: truncated payload: .*18446744073709551616"):
        read_idx(wrapped)
    empty = _write(tmp_path / "empty", _idx((0, 2**32 - 1, 2**32 - 1, 2**32 - 1), b""),
                   compress=False)
    with pytest.raises(DataError, match=r"empty: the header's shape .* is not a valid array"):
        read_idx(empty)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (_idx((2,), bytes([3, 10])), r"labels\.gz: label 10 is outside 0-9"),
        (_idx((2,), struct.pack(">bb", 3, -1), type_code=0x09),
         r"labels\.gz: expected unsigned-byte labels of shape \(N,\), got int8 \(2,\)"),
        (_idx((2,), struct.pack(">ff", 1.0, float("nan")), type_code=0x0D),
         r"labels\.gz: expected unsigned-byte labels .* got float32"),
        (_idx((2, 1), bytes(2)), r"labels\.gz: expected unsigned-byte labels .* \(2, 1\)"),
    ],
)
def test_bad_labels(tmp_path, labels, message):
    images = _write(tmp_path / "images.gz", _images(2))
    with pytest.raises(DataError, match=message):
        load_idx_pair(images, _write(tmp_path / "labels.gz", labels))


def test_images_and_labels_swapped(tmp_path):
    images = _write(tmp_path / "images.gz", _images(2))
    labels = _write(tmp_path / "labels.gz", _idx((2,), bytes(2)))
    with pytest.raises(DataError, match=r"labels\.gz: expected unsigned-byte images of shape "
                                        r"\(N, rows, cols\), got uint8 \(2,\)"):
        load_idx_pair(labels, images)


def test_unknown_image_dataset_and_too_large_valid_split():
    with pytest.raises(DataError, match=r"unknown image dataset 'cifar10'; choose one of mnist, "
                                        r"fashion_mnist"):
        load_images("cifar10")
    with pytest.raises(DataError, match=r"data.valid_size = 3000 leaves no training data \(3000 "
                                        r"training examples\)"):
        load_dataset({"dataset": "spiral", "valid_size": 3000, "train_limit": 0})


# ----------------------------------------------------------------------------- NaN and Inf


def _spiral_cfg(*overrides: str) -> dict:
    return load_config("spiral_relu", list(overrides))


def test_nan_in_generated_inputs_names_the_dataset_and_example():
    ds = load_generated("spiral", 12345)
    ds.train_x[5, 1] = np.nan
    with pytest.raises(DataError, match=r"the training inputs of 'spiral' \(generated \(spiral, "
                                        r"seeds 12345 and 12346\)\) hold 1 NaN or Inf value\(s\) "
                                        r"\(as float32\), the first in example 5"):
        model_arrays(ds, _spiral_cfg(), "jax")


def test_inf_in_test_inputs_and_values_beyond_float32():
    ds = load_generated("spiral", 12345)
    ds.test_x[7, 0] = -np.inf
    with pytest.raises(DataError, match=r"the test inputs of 'spiral' .* first in example 7"):
        model_arrays(ds, _spiral_cfg(), "torch")
    big = np.zeros((3, 2), np.float64)
    big[2, 1] = 1e300  # finite in float64, Inf once cast to the models' float32
    with pytest.raises(DataError, match=r"my points hold 1 NaN or Inf .* first in example 2"):
        preprocess(big, {"preprocess": "none"}, "flat", "my points")


def test_nan_in_regression_targets():
    ds = load_generated("cubic", 12345)
    ds.train_y[[3, 9]] = np.nan
    cfg = load_config("regression_relu")
    with pytest.raises(DataError, match=r"the training targets of 'cubic' .* hold 2 NaN or Inf "
                                        r"value\(s\) .* first in example 3"):
        model_arrays(ds, cfg, "jax")


def test_user_supplied_float_arrays():
    """A hand-made Dataset of float images and float labels: NaN or Inf is refused by name."""
    x = np.zeros((4, 28, 28), np.float32)
    y = np.zeros(4, np.float64)
    cfg = load_config("mlp_fashion")
    x[2, 3, 4] = np.inf
    mine = Dataset("mine", "my arrays", x, y, x[:0], y[:0])
    with pytest.raises(DataError, match=r"the training inputs of 'mine' \(my arrays\) hold 1 "):
        model_arrays(mine, cfg, "jax")
    x[2, 3, 4] = 0.0
    y[1] = np.nan
    with pytest.raises(DataError, match=r"the training targets of 'mine' \(my arrays\) hold 1 "):
        model_arrays(mine, cfg, "torch")


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_trainers_refuse_nan_data(framework):
    if framework == "torch":
        pytest.importorskip("torch")
        from torchref.train import Trainer
    else:
        from jaxnets.train import Trainer
    ds = load_generated("spiral", 12345)
    ds.train_x[0, 0] = np.nan
    with pytest.raises(DataError, match=r"training inputs of 'spiral'"):
        Trainer(_spiral_cfg(), ds)


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sed=1", r"unknown config key 'sed'; did you mean 'seed'\?"),
        ("train.epoch=3", r"unknown config key 'train.epoch'; did you mean 'train.epochs'\?"),
        ("train.epochs=0", r"train.epochs = 0 is out of range: it must be >= 1"),
        ("train.epochs=-3", r"train.epochs = -3 is out of range: it must be >= 1"),
        ("optimizer.learning_rate=-0.1",
         r"optimizer.learning_rate = -0.1 is out of range: it must be > 0"),
        ("train.batch_size=-1", r"train.batch_size = -1 is out of range: it must be >= 1"),
        ("optimizer.learning_rate=nan", r"optimizer.learning_rate must be a finite number, "
                                        r"got nan"),
        ("optimizer.learning_rate=inf", r"optimizer.learning_rate must be a finite number, "
                                        r"got inf"),
        ("data.std=-inf", r"data.std must be a finite number, got -inf"),
        ("optimizer.learning_rate=1" + "0" * 400,
         r"optimizer.learning_rate = 10{400} is out of range for a float"),
        ("seed=-1", r"seed = -1 is out of range: it must be >= 0"),
        ("data.seed=-5", r"data.seed = -5 is out of range: it must be >= 0"),
        ("train.batch_size=100000000000000000000",
         r"train.batch_size = 100000000000000000000 is out of range: TOML integers are 64-bit"),
        ("train.epochs=" + "1" * 5000, r"train.epochs must be an integer, got '1111"),
        ("model.hidden=[512, \"a\"]", r"model.hidden must be a list of integers, got \[512, 'a'\]"),
        ("model.hidden=[512, 0]", r"model.hidden\[1\] = 0 is out of range: it must be >= 1"),
        ("model.name=ResNet",
         r"model.name = 'ResNet' is not one of: 'MLP', 'LeNet', 'SimpleNet', 'ConvNet'"),
        ("data.dataset=cifar10",
         r"data.dataset = 'cifar10' is not one of: 'mnist', 'fashion_mnist', 'spiral', 'cubic'"),
        ("model.init=xavier", r"model.init = 'xavier' is not one of: 'torch', 'flax', 'normal'"),
    ],
)
def test_bad_values_name_the_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("mlp_fashion", [override])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[train]\nepochs = "10"\n', r"mine.toml: train.epochs must be an integer, got '10' "
                                     r"\(a string\)"),
        ("data = 3\n", r"mine.toml: data must be a \[data\] table"),
        ("[optimizer]\nlearning_rate = -1.0\n", r"optimizer.learning_rate = -1.0 is out of range"),
        ("[optimizer]\nweight_decay = -0.5\n", r"optimizer.weight_decay = -0.5 is out of range"),
        ("[optimizer]\nlearning_rate = nan\n",
         r"mine.toml: optimizer.learning_rate must be a finite number, got nan"),
        ('[optimizer]\nname = "lbfgs"\n', r"optimizer.name = 'lbfgs' is not one of: 'sgd'"),
        ('[model]\nname = "resnet"\n', r"model.name = 'resnet' is not one of: 'MLP'"),
        ('[model]\ninit = "he"\n', r"model.init = 'he' is not one of: 'torch', 'flax'"),
        ('[data]\ndataset = "imagenet"\n', r"data.dataset = 'imagenet' is not one of: 'mnist'"),
        ("[train]\nbatch_size = 0\n", r"train.batch_size = 0 is out of range: it must be >= 1"),
        ("[train]\nepochs = " + "9" * 5000 + "\n", r"mine.toml' is not valid TOML"),
    ],
)
def test_bad_values_in_a_file(tmp_path, text, message):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_unreadable_config_file(tmp_path, monkeypatch):
    path = tmp_path / "locked.toml"
    path.write_text("seed = 1\n")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(ConfigError, match=r"locked.toml' cannot be read \(Permission denied\)"):
        load_config(str(path))


# ----------------------------------------------------------------------------- no code runs


def _code(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}')"


def test_code_in_a_config_string_is_only_a_string(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "code.toml"
    path.write_text(f'name = "{_code(marker)}"\ndescription = "{_code(marker)}"\n')
    cfg = load_config(str(path))
    assert cfg["name"] == cfg["description"] == _code(marker)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("model.name={code}", r"model.name = \"__import__\('os'\).* is not one of"),
        ("optimizer.learning_rate={code}",
         r"optimizer.learning_rate must be a number, got \"__import__"),
        ("train.epochs=eval(\"{code}\")", r"train.epochs must be an integer, got 'eval\("),
        ("{code}=1", r"unknown config key"),
    ],
)
def test_code_in_an_override_is_rejected_not_run(tmp_path, template, message):
    marker = tmp_path / "ran"
    with pytest.raises(ConfigError, match=message):
        load_config("mlp_fashion", [template.format(code=_code(marker))])
    assert not marker.exists()


def test_bare_code_in_a_config_file_is_invalid_toml(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "code.toml"
    path.write_text(f"[optimizer]\nlearning_rate = {_code(marker)}\n")
    with pytest.raises(ConfigError, match=r"code.toml' is not valid TOML"):
        load_config(str(path))
    assert not marker.exists()


# ----------------------------------------------------------------------------- the CLI


def _one_error_line(result, code: int, pattern: str) -> str:
    import re

    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("jaxnets: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (("--epochs", "0"), r"train.epochs = 0 is out of range"),
        (("--dataset", "cifar10"), r"data.dataset = 'cifar10' is not one of: 'mnist'"),
        (("--set", "optimizer.learning_rate=nan"), r"optimizer.learning_rate must be a finite"),
    ],
)
def test_cli_usage_errors_exit_2(args, pattern):
    _one_error_line(run_cli("train", "mlp_fashion", *args), 2, pattern)


def test_cli_config_with_code_exits_2_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "code.toml"
    path.write_text(f'[model]\nname = "{_code(marker)}"\n')
    _one_error_line(run_cli("summary", str(path)), 2, r"model.name = .*__import__.* is not one of")
    assert not marker.exists()


def test_cli_data_errors_exit_1(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_error_line(run_cli("train", "mlp_fashion", "--data-dir", str(empty)), 1,
                    rf"{empty}: missing train-images-idx3-ubyte\.gz")
    broken = tmp_path / "broken"
    broken.mkdir()
    _write(broken / "train-images-idx3-ubyte.gz", _images(2))
    (broken / "train-labels-idx1-ubyte.gz").write_bytes(b"<html>404 not found</html>")
    _one_error_line(run_cli("train", "mlp_fashion", "--data-dir", str(broken)), 1,
                    r"train-labels-idx1-ubyte\.gz: not a gzip file")
