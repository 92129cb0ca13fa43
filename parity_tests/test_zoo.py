"""Every seed network on both sides: shapes, converted weights give the same outputs, the
conversion round trip is bit-exact, and each config's hyperparameters are SEEDS.md's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_allclose
from jaxnets import convert
from jaxnets.config import available_configs, load_config
from jaxnets.data import load_generated, preprocess
from jaxnets.errors import ConversionError
from jaxnets.layers import flatten_chw
from jaxnets.models import build_model as build_jax
from torchref.models import build_model as build_torch

CONFIGS = sorted(available_configs())


def inputs(cfg, fashion, count: int = 64):
    """Real Fashion-MNIST test images for image configs, generated points for the toys, in
    each framework's layout: (jax_x, torch_x)."""
    data = cfg["data"]
    if data["dataset"] in ("spiral", "cubic"):
        x = load_generated(data["dataset"], data["seed"]).test_x[:count]
        return x, torch.from_numpy(x)
    raw = fashion.test_x[:count]
    if data["flatten"]:
        x = preprocess(raw, data, "flat")
        return x, torch.from_numpy(x)
    return preprocess(raw, data, "nhwc"), torch.from_numpy(preprocess(raw, data, "nchw"))


def torch_weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_all_seed_experiments_have_configs():
    assert set(CONFIGS) >= {
        "mlp_mnist", "mlp_fashion", "d2l_mlp_fashion", "linreg_mnist", "sigmoid_mlp_mnist",
        "lenet_mnist", "simplenet_mnist", "convnet_mnist", "spiral_linear", "spiral_relu",
        "regression_linear", "regression_relu", "regression_tanh"}


@pytest.mark.parametrize("name", CONFIGS)
def test_converted_weights_give_the_same_outputs(name, fashion):
    cfg = load_config(name)
    jax_x, torch_x = inputs(cfg, fashion)
    torch_model = build_torch(cfg["model"], seed=1).eval()  # jax_model(x): eval mode too
    jax_model = build_jax(cfg["model"], seed=2)
    convert.load_flax_params(jax_model, convert.torch_to_flax(torch_weights(torch_model)))
    with torch.no_grad():
        expected = torch_model(torch_x).numpy()
        torch_layers = torch_model.forward_layers(torch_x)
    out_features = cfg["model"]["out_features"] if cfg["model"]["name"] == "MLP" else 10
    assert expected.shape == (len(jax_x), out_features)
    actual = np.asarray(jax_model(jax_x))
    assert_allclose(actual, expected, 1e-5, f"{name} outputs")
    # the same steps, by name, on both sides; equal after bringing NHWC to NCHW
    jax_layers = jax_model.forward_layers(jax_x)
    assert [n for n, _ in jax_layers] == [n for n, _ in torch_layers]
    for (layer, j), (_, t) in zip(jax_layers, torch_layers, strict=True):
        j = np.asarray(j)
        if j.ndim == 4:
            j = j.transpose(0, 3, 1, 2)
        assert_allclose(j, t.numpy(), 1e-5, f"{name} {layer}")


def without_batch_counts(torch_weights):
    """BatchNorm's num_batches_tracked has no Flax counterpart: conversion drops it
    (``convert.drop_num_batches_tracked``); everything else comes back bit for bit."""
    return {k: v for k, v in torch_weights.items() if not k.endswith(".num_batches_tracked")}


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_is_bit_exact(name, tmp_path):
    cfg = load_config(name)
    original = torch_weights(build_torch(cfg["model"], seed=3))
    convert.write_safetensors(convert.torch_to_flax(original), tmp_path / "flax.safetensors")
    jax_model = build_jax(cfg["model"], seed=4)
    convert.load_flax_params(jax_model, convert.read_safetensors(tmp_path / "flax.safetensors"))
    back = convert.flax_to_torch(convert.flax_state(jax_model))
    original = without_batch_counts(original)
    assert back.keys() == original.keys()
    for key, value in original.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_conv_kernel_layout():
    oihw = np.arange(10 * 5 * 3 * 3, dtype=np.float32).reshape(10, 5, 3, 3)
    hwio = convert.torch_to_flax({"conv.weight": oihw})["conv.kernel"]
    assert hwio.shape == (3, 3, 5, 10)
    assert hwio[1, 2, 4, 7] == oihw[7, 4, 1, 2]


def test_flatten_order_matches_torch():
    # (batch, H, W, C) flattened by the Flax models equals torch's flatten of (batch, C, H, W)
    nchw = np.random.default_rng(0).standard_normal((2, 16, 5, 5)).astype(np.float32)
    flat_jax = np.asarray(flatten_chw(nchw.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(flat_jax, torch.flatten(torch.from_numpy(nchw), 1).numpy())
    # a plain reshape of NHWC is a different order: the rule is needed
    assert not np.array_equal(nchw.transpose(0, 2, 3, 1).reshape(2, -1), flat_jax)


def test_flax_weights_are_refused_as_torch_weights():
    with pytest.raises(ConversionError, match="are the weights from the other framework"):
        convert.torch_to_flax({"fc.kernel": np.zeros((3, 2), np.float32)})


EXPECTED = {  # SEEDS.md: model, optimizer, learning rate, batch, epochs, loss
    "mlp_mnist": ("MLP", "adam", 1e-3, 100, 10, "cross_entropy"),
    "d2l_mlp_fashion": ("MLP", "sgd", 0.1, 256, 10, "cross_entropy"),
    "linreg_mnist": ("MLP", "sgd", 1e-3, 100, 10, "mse"),
    "sigmoid_mlp_mnist": ("MLP", "sgd", 1e-3, 100, 10, "mse"),
    "lenet_mnist": ("LeNet", "adam", 1e-3, 64, 5, "cross_entropy"),
    "simplenet_mnist": ("SimpleNet", "sgd", 0.01, 100, 10, "cross_entropy"),
    "convnet_mnist": ("ConvNet", "sgd", 0.01, 64, 10, "cross_entropy"),
    "spiral_linear": ("MLP", "sgd", 1e-3, 3000, 1000, "cross_entropy"),
    "spiral_relu": ("MLP", "adam", 1e-3, 3000, 1000, "cross_entropy"),
    "regression_linear": ("MLP", "sgd", 1e-3, 100, 1000, "mse"),
    "regression_relu": ("MLP", "adam", 1e-3, 100, 1000, "mse"),
    "regression_tanh": ("MLP", "adam", 1e-3, 100, 1000, "mse"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_follows_the_source(name):
    cfg = load_config(name)
    got = (cfg["model"]["name"], cfg["optimizer"]["name"], cfg["optimizer"]["learning_rate"],
           cfg["train"]["batch_size"], cfg["train"]["epochs"], cfg["train"]["loss"])
    assert got == EXPECTED[name]
    toy = cfg["data"]["dataset"] in ("spiral", "cubic")
    assert cfg["optimizer"]["weight_decay"] == (1e-5 if toy else 0.0)
    assert cfg["train"]["ensemble"] == (10 if name in ("regression_relu", "regression_tanh")
                                        else 1)
    if name == "convnet_mnist":
        assert cfg["optimizer"]["momentum"] == 0.5
        assert (cfg["data"]["mean"], cfg["data"]["std"]) == (0.1307, 0.3081)
    if name in ("linreg_mnist", "sigmoid_mlp_mnist", "simplenet_mnist"):
        assert cfg["data"]["valid_size"] == 10000  # Paddle's 50k/10k/10k


@pytest.mark.parametrize("name", CONFIGS)
def test_short_compare_runs_for_every_config(name, fashion, tmp_path):
    from torchref.compare import compare

    toy = load_config(name)["data"]["dataset"] in ("spiral", "cubic")
    overrides = (["train.epochs=20", "train.eval_every=10", "train.ensemble=2"] if toy else
                 ["train.epochs=1", "data.train_limit=300", 'data.dataset="fashion_mnist"'])
    cfg = load_config(name, overrides)
    printed = []
    report = compare(cfg, tmp_path, progress=False, echo=printed.append)
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report.md").is_file()
    # the source's figure is printed beside the result, and no empty line for a config without
    source_lines = [line for line in printed if line.startswith("source's reported result")]
    assert len(source_lines) == (1 if cfg["reported_result"] else 0), source_lines
    assert report["initial_weights_max_abs_diff"] == 0.0
    first = report["first_step_loss"]
    assert abs(first["jax"] - first["torch"]) <= 1e-5, first
    assert len(report["epochs"]) == cfg["train"]["epochs"]
    for epoch in report["epochs"]:  # every step of every epoch, not only the last
        assert epoch["step_loss_max_abs_diff"] < 1e-3, epoch
    if cfg["train"]["metric"] == "none":
        assert report["final"]["jax_test_accuracy"] is None
    else:
        assert abs(report["final"]["accuracy_diff_pp"]) < 2.0
    if toy and cfg["train"]["loss"] == "mse":
        assert len(report["ensemble"]["members"]) == 2


@pytest.mark.parametrize("name", CONFIGS)
def test_convert_command_round_trips(name, tmp_path):
    from jaxnets.convert import convert_file

    original = torch_weights(build_torch(load_config(name)["model"], seed=5))
    torch.save({k: torch.from_numpy(v) for k, v in original.items()}, tmp_path / "model.pt")
    flax = convert_file("torch", "jax", tmp_path / "model.pt", tmp_path / "flax.safetensors")
    jax_model = build_jax(load_config(name)["model"], seed=6)
    convert.load_flax_params(jax_model, flax)  # names and shapes fit the Flax model
    convert_file("jax", "torch", tmp_path / "flax.safetensors", tmp_path / "back.safetensors")
    back = convert.read_safetensors(tmp_path / "back.safetensors")
    original = without_batch_counts(original)
    assert back.keys() == original.keys()
    assert all(np.array_equal(back[k], v) for k, v in original.items())


def test_convert_cli(tmp_path):
    from conftest import run_cli

    weights = torch_weights(build_torch(load_config("convnet_mnist")["model"], seed=0))
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, tmp_path / "m.pth")
    result = run_cli("convert", "--from", "torch", "--to", "jax", str(tmp_path / "m.pth"),
                     str(tmp_path / "m.safetensors"))
    assert result.returncode == 0, result.stderr
    assert "6 tensors, 8,490 values" in result.stdout
    flax = convert.read_safetensors(tmp_path / "m.safetensors")
    assert flax["conv1.kernel"].shape == (5, 5, 1, 10) and flax["fc.kernel"].shape == (320, 10)
    result = run_cli("convert", "--from", "torch", "--to", "jax", str(tmp_path / "m.safetensors"),
                     str(tmp_path / "again.safetensors"))
    assert result.returncode == 1 and "are the weights from the other framework" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
