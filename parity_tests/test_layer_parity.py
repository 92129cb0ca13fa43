"""Parity for networks written in the layer vocabulary: the three configs beyond the seeds and
layer lists hypothesis makes up, in float32 (here) and float64 (``jaxnets parity`` in its own
process: x64 is a global JAX switch). Trajectories are 10 steps here (longer runs
are in test_parity.py); ``jaxnets parity`` runs them longer (README)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from jaxnets.config import load_config
from jaxnets.errors import ConfigError
from torchref.parity import check_config

LAYER_CONFIGS = ("resnet_gelu_fashion", "stride2_same_mnist", "vgg_bn_fashion")
STEPS = 10
CHECKS = ["forward", "loss", "gradients", "step", f"trajectory_{STEPS}_steps",
          f"trajectory_{STEPS}_steps_weights", f"trajectory_{STEPS}_steps_state"]


def assert_parity(checks):
    assert [c.check for c in checks] == CHECKS
    failed = [f"{c.check}: {c.max_abs_diff:.3g} > {c.tolerance:g} ({c.detail})"
              for c in checks if not c.passed]
    assert not failed, failed


@pytest.mark.parametrize("name", LAYER_CONFIGS)
def test_layer_config_float32_parity(name, fashion):
    cfg = load_config(name, ['data.dataset="fashion_mnist"'])
    assert_parity(check_config(cfg, fashion, "float32", steps=STEPS))


def toml_value(value) -> str:
    """A Python value as TOML (inline tables and arrays included)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


ACTIVATION = st.sampled_from([{"type": t} for t in ("relu", "tanh", "sigmoid", "silu")]
                             + [{"type": "gelu", "approximate": True}, {"type": "gelu"},
                                {"type": "leaky_relu", "slope": 0.2}])
CONV = st.builds(lambda out, kernel, stride, padding: {
    "type": "conv2d", "out": out, "kernel": kernel, "stride": stride, "padding": padding},
    st.integers(2, 4), st.sampled_from([1, 3]), st.sampled_from([1, 2]),
    st.sampled_from([0, 1, "same"]))
POOL = st.builds(lambda kind, kernel, ceil, include: {
    "type": kind, "kernel": kernel, "ceil_mode": ceil,
    **({"count_include_pad": include, "padding": 1} if kind == "avgpool" else {})},
    st.sampled_from(["maxpool", "avgpool"]), st.sampled_from([2, 3]), st.booleans(),
    st.booleans())
IMAGE_LAYER = st.one_of(CONV, POOL, ACTIVATION, st.just({"type": "batchnorm"}),
                        st.just({"type": "dropout", "rate": 0.3}),
                        st.builds(lambda act: {"type": "residual", "layers": [
                            {"type": "conv2d", "out": 3, "kernel": 3, "padding": "same"}, act]},
                            ACTIVATION))
VECTOR_LAYER = st.one_of(ACTIVATION, st.just({"type": "layernorm"}),
                         st.just({"type": "batchnorm"}),
                         st.just({"type": "dropout", "rate": 0.2}),
                         st.builds(lambda out: {"type": "linear", "out": out},
                                   st.integers(3, 12)))
LAYER_LISTS = st.builds(
    lambda image, head, vector: [{"type": "conv2d", "out": 3, "kernel": 3, "stride": 2},
                                 *image, {"type": head}, *vector,
                                 {"type": "linear", "out": 10}],
    st.lists(IMAGE_LAYER, min_size=1, max_size=4),
    st.sampled_from(["flatten", "global_avgpool"]), st.lists(VECTOR_LAYER, max_size=3))


def random_config(layers, tmp_path, index: int):
    text = (f'[data]\ndataset = "fashion_mnist"\nflatten = false\ntrain_limit = 256\n'
            f'[model]\nname = "Sequential"\nlayers = {toml_value(layers)}\n'
            f'[optimizer]\nname = "sgd"\nlearning_rate = 0.05\n'
            f'[train]\nbatch_size = 32\nepochs = 1\n')
    path = tmp_path / f"random_{index}.toml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(str(path))
    except ConfigError:  # a list whose shapes do not chain: rejected, as tested elsewhere
        return None
    return path


RANDOM_LISTS = settings(max_examples=2, deadline=None, derandomize=True, database=None,
                        phases=[Phase.generate],  # no shrinking: minutes per failing example
                        suppress_health_check=[HealthCheck.too_slow,
                                               HealthCheck.function_scoped_fixture])


@RANDOM_LISTS
@given(layers=st.lists(LAYER_LISTS, min_size=1, max_size=1))
def test_random_layer_lists_parity_float64(layers, tmp_path):
    paths = [p for i, spec in enumerate(layers) if (p := random_config(spec, tmp_path, i))]
    if paths:  # float64 in its own process, through the command users run
        out = tmp_path / "f64"
        result = run_cli("parity", "--dtype", "float64", "--steps", str(STEPS), "--out",
                         str(out), *map(str, paths))
        report = json.loads((out / "report.json").read_text())
        assert result.returncode == 0 and report["passed"], (result.stderr, report["checks"])


@RANDOM_LISTS
@given(layers=st.lists(LAYER_LISTS, min_size=1, max_size=1))
def test_random_layer_lists_parity_float32(layers, fashion, tmp_path):
    paths = [p for i, spec in enumerate(layers) if (p := random_config(spec, tmp_path, i))]
    for path in paths:
        assert_parity(check_config(load_config(str(path)), fashion, "float32", steps=STEPS))




def test_layer_configs_float64_parity_cli(tmp_path):
    result = run_cli("parity", "--dtype", "float64", "--steps", str(STEPS), "--out",
                     str(tmp_path), *LAYER_CONFIGS)
    report = json.loads((tmp_path / "report.json").read_text())
    failed = {(c["config"], c["check"]) for c in report["checks"] if not c["passed"]}
    # vgg_bn_fashion's first Adam step passes only through the fed-gradient judgement
    # (torchref.verify.training.fed_step): 4.6e-12 from the reference's own step, bound 1e-12
    assert not failed, (failed, result.stderr)
    assert result.returncode == 0
    assert {c["config"] for c in report["checks"]} == set(LAYER_CONFIGS)
    assert {c["tolerance"] for c in report["checks"] if c["check"] == "forward"} == {1e-12}
