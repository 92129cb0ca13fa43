"""``jaxnets parity``: forward (layer by layer), loss, gradients, one optimizer step and a
K-step trajectory agree for every config, in float32 (bounds measured in the run: PyTorch
float32's own error for one step, an ensemble of one-ulp-moved PyTorch runs for trajectories)
and float64; and when a conversion is wrong, the report names the layer where it went wrong.
Trajectories: 100 steps for the two configs whose float32 drift the README explains (Adam's
``mlp_fashion``, SGD's ``convnet_mnist``), 20 for the others (the same checks, a fifth of the
cost); float64 5 steps, every config (the float64 fact, the same mathematics to 1e-12 per
step, shows from the first step; longer runs: ``jaxnets parity --dtype float64``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from jaxnets import convert
from jaxnets.config import available_configs, load_config
from jaxnets.data import IMAGE_DATASETS, load_generated
from torchref.parity import check_config

# the seed configs; the configs written in the layer vocabulary: test_layer_parity.py
LAYER_CONFIGS = ("resnet_gelu_fashion", "stride2_same_mnist", "vgg_bn_fashion")
CONFIGS = sorted(set(available_configs()) - set(LAYER_CONFIGS))


def config_and_data(name, fashion):
    cfg = load_config(name)
    if cfg["data"]["dataset"] in IMAGE_DATASETS:
        return load_config(name, ['data.dataset="fashion_mnist"']), fashion
    return cfg, load_generated(cfg["data"]["dataset"], cfg["data"]["seed"])


LONG = {"mlp_fashion": 100, "convnet_mnist": 100}


@pytest.mark.parametrize("name", CONFIGS)
def test_float32_parity(name, fashion):
    cfg, data = config_and_data(name, fashion)
    steps = LONG.get(name, 20)
    checks = check_config(cfg, data, "float32", steps=steps)
    k = f"trajectory_{steps}_steps"
    assert [c.check for c in checks] == ["forward", "loss", "gradients", "step", k,
                                         f"{k}_weights", f"{k}_state"]
    failed = [f"{c.check}: {c.max_abs_diff:.3g} > {c.tolerance:g} ({c.detail})"
              for c in checks if not c.passed]
    assert not failed, failed
    assert all(c.max_abs_diff <= c.tolerance for c in checks)


def test_float64_parity_cli(tmp_path):
    """Every config in float64 (its own process: x64 is a global JAX switch)."""
    result = run_cli("parity", "--dtype", "float64", "--steps", "5", "--out", str(tmp_path),
                     *CONFIGS)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dtype"] == "float64" and report["device"] == "cpu"
    failed = [c for c in report["checks"] if not c["passed"]]
    assert result.returncode == 0 and report["passed"] and not failed, (failed, result.stderr)
    assert {c["config"] for c in report["checks"]} == set(CONFIGS)
    for c in report["checks"]:  # fixed, or the engine's tight bounds (relative to max(|ref|, 1))
        expected = {"forward": 1e-12, "loss": 1e-12, "gradients": 1e-10}.get(c["check"])
        assert c["tolerance"] == expected if expected else c["tolerance"] <= 1e-9 * 100, c
    assert (tmp_path / "report.md").read_text().startswith("# jaxnets parity: float64 on cpu")


def swap_conv2_kernel(tensors):
    """A wrong conversion: conv2's kernel with its two spatial axes swapped (the shape of a
    square kernel survives, so only the values can tell)."""
    flax = convert.torch_to_flax(tensors)
    flax["conv2.kernel"] = np.ascontiguousarray(flax["conv2.kernel"].transpose(1, 0, 2, 3))
    return flax


def hwc_fc1(tensors):
    """A wrong conversion: fc1's input rows permuted to HWC order, as a converter would for a
    model that flattens NHWC directly (ours flattens in PyTorch's CHW order)."""
    flax = convert.torch_to_flax(tensors)
    kernel = flax["fc1.kernel"]  # (16 * 5 * 5, 120), rows in (C, H, W) order
    flax["fc1.kernel"] = np.ascontiguousarray(
        kernel.reshape(16, 5, 5, 120).transpose(1, 2, 0, 3).reshape(400, 120))
    return flax


@pytest.mark.parametrize(("converter", "layer"), [(swap_conv2_kernel, "conv2"),
                                                  (hwc_fc1, "fc1")])
def test_wrong_conversion_is_located(fashion, converter, layer):
    cfg, data = config_and_data("lenet_mnist", fashion)
    checks = {c.check: c for c in check_config(cfg, data, "float32", steps=3,
                                               converter=converter)}
    forward = checks["forward"]
    assert not forward.passed and forward.first_divergent_layer == layer, forward
    assert forward.detail.startswith(f"{layer}: max-abs difference")
    assert checks["gradients"].first_divergent_layer is not None
    assert not checks["step"].passed


def test_parity_cli_exit_code_and_report(tmp_path):
    result = run_cli("parity", "spiral_linear", "regression_tanh", "--steps", "5", "--out",
                     str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and report["dtype"] == "float32"
    for check in report["checks"]:
        assert set(check) >= {"config", "check", "max_abs_diff", "max_rel_diff", "tolerance",
                              "passed", "first_divergent_layer"}
