"""``jaxnets summary``: both frameworks report the same layers, parameter counts and totals."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import REPO, run_cli
from jaxnets.config import load_config
from jaxnets.summary import format_summary, jax_summary
from torchref.summary import torch_summary

EXPECTED_TOTALS = {
    "mlp_mnist": 669_706,
    "mlp_fashion": 669_706,
    "d2l_mlp_fashion": 203_530,
    "linreg_mnist": 785,
    "sigmoid_mlp_mnist": 7_971,
    "lenet_mnist": 61_610,
    "simplenet_mnist": 20_350,
    "convnet_mnist": 8_490,
    "spiral_linear": 603,
    "spiral_relu": 603,
    "regression_linear": 301,
    "regression_relu": 301,
    "regression_tanh": 301,
    # the layer-vocabulary configs, by hand in test_layers.py::test_summary_totals_by_hand
    "vgg_bn_fashion": 27_346,
    "resnet_gelu_fashion": 5_082,
    "stride2_same_mnist": 3_818,
}


@pytest.fixture(scope="module")
def summaries():
    """Every config's summaries, computed once: ``{name: (jax, torch)}``."""
    return {name: (jax_summary(cfg), torch_summary(cfg))
            for name in EXPECTED_TOTALS for cfg in [load_config(name)]}


def test_every_config_has_an_expected_total():
    assert {path.stem for path in (REPO / "configs").glob("*.toml")} == set(EXPECTED_TOTALS)


@pytest.mark.parametrize("name", sorted(EXPECTED_TOTALS))
def test_totals_and_layers_agree(summaries, name):
    jax_side, torch_side = summaries[name]
    assert jax_side["total_params"] == torch_side["total_params"] == EXPECTED_TOTALS[name]
    assert [layer["name"] for layer in jax_side["layers"]] == [
        layer["name"] for layer in torch_side["layers"]]
    assert [layer["params"] for layer in jax_side["layers"]] == [
        layer["params"] for layer in torch_side["layers"]]
    for side in (jax_side, torch_side):
        assert sum(layer["params"] for layer in side["layers"]) == side["total_params"]
        assert all(layer["output_shape"][0] == -1 for layer in side["layers"])
    assert jax_side["layers"][-1]["output_shape"] == torch_side["layers"][-1]["output_shape"]


def _layers(side: dict) -> dict[str, dict]:
    return {layer["name"]: layer for layer in side["layers"]}


def test_lenet_layers(summaries):
    jax_side, torch_side = map(_layers, summaries["lenet_mnist"])
    assert list(jax_side) == ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten",
                              "fc1", "fc2", "fc3"]
    assert jax_side["conv1"]["output_shape"] == [-1, 28, 28, 6]
    assert torch_side["conv1"]["output_shape"] == [-1, 6, 28, 28]
    assert jax_side["pool2"]["output_shape"] == [-1, 5, 5, 16]
    assert torch_side["pool2"]["output_shape"] == [-1, 16, 5, 5]
    for side in (jax_side, torch_side):
        assert side["flatten"]["output_shape"] == [-1, 400]
        assert side["fc3"]["output_shape"] == [-1, 10]
        assert side["conv1"]["params"] == 6 * 9 + 6
        assert side["conv2"]["params"] == 16 * 6 * 25 + 16
        assert side["fc1"]["params"] == 400 * 120 + 120
        assert side["relu1"]["params"] == side["pool1"]["params"] == 0


def test_conv_nets_flatten_to_the_first_linear(summaries):
    for name, width in [("simplenet_mnist", 980), ("convnet_mnist", 320)]:
        for side in map(_layers, summaries[name]):
            assert side["flatten"]["output_shape"] == [-1, width]
            assert side["fc"]["params"] == width * 10 + 10


def test_vector_inputs(summaries):
    jax_side, torch_side = map(_layers, summaries["spiral_relu"])
    for side in (jax_side, torch_side):
        assert side["flatten"]["output_shape"] == [-1, 2]
        assert side["layers.0"]["output_shape"] == [-1, 100]
        assert side["layers.1"]["output_shape"] == [-1, 3]
    names = [layer["name"] for layer in summaries["regression_linear"][0]["layers"]]
    assert names == ["flatten", "layers.0", "layers.1"]
    assert _layers(summaries["mlp_mnist"][0])["flatten"]["output_shape"] == [-1, 784]


@pytest.mark.parametrize("name", ["lenet_mnist", "mlp_mnist", "regression_relu"])
def test_cli_json(summaries, name):
    result = run_cli("summary", name, "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert set(printed) == {"jax", "torch"}
    assert printed["jax"] == summaries[name][0]
    assert printed["torch"] == summaries[name][1]
    assert printed["jax"]["total_params"] == EXPECTED_TOTALS[name]


def test_cli_table():
    result = run_cli("summary", "lenet_mnist")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["Layer", "JAX", "output", "shape", "PyTorch", "output", "shape",
                                "JAX", "params", "PyTorch", "params"]
    conv1 = next(line for line in lines if line.startswith("conv1"))
    assert "(-1, 28, 28, 6)" in conv1 and "(-1, 6, 28, 28)" in conv1
    assert lines[-1].split() == ["Total", "params", "61,610", "61,610"]
    assert "differs" not in result.stdout


def test_cli_without_torch_prints_the_jax_side(tmp_path):
    shadow = tmp_path / "torch"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('torch hidden by the test')\n")
    env = {"PYTHONPATH": str(tmp_path)}
    result = run_cli("summary", "convnet_mnist", "--json", env=env)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert set(printed) == {"jax"} and printed["jax"]["total_params"] == 8_490
    assert "PyTorch is not installed" in result.stderr
    table = run_cli("summary", "convnet_mnist", env=env)
    assert table.returncode == 0, table.stderr
    assert "PyTorch" not in table.stdout.splitlines()[0]
    assert table.stdout.splitlines()[-1].split() == ["Total", "params", "8,490"]


def test_unknown_config_is_one_line():
    result = run_cli("summary", "no_such_config")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "unknown config" in result.stderr


def test_table_marks_differing_rows(summaries):
    jax_side, torch_side = summaries["lenet_mnist"]
    changed = copy.deepcopy(torch_side)
    changed["layers"][0]["params"] += 1
    changed["total_params"] += 1
    lines = format_summary(jax_side, changed).splitlines()
    marked = [line.split()[0] for line in lines if line.endswith("<- differs")]
    assert marked == ["conv1", "Total"]
    assert not any("differs" in line for line in format_summary(jax_side, torch_side).splitlines())
