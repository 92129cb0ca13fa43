"""The layer vocabulary: both registries build every type, and every framework difference it
meets is a named function for which the naive port differs and the named one agrees with
PyTorch. (Flatten order after a conv: ``test_zoo.py::test_flatten_order_matches_torch``.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from conftest import assert_allclose
from jaxnets import layers as jax_layers
from jaxnets import pooling
from jaxnets.config import load_config
from jaxnets.errors import DataError
from jaxnets.losses import check_label_range
from jaxnets.spec import LAYER_KEYS, pool_output_size, same_padding
from torchref import layers as torch_layers

RNG = np.random.default_rng(0)


def nhwc(x):
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def test_both_registries_build_every_layer_type():
    assert set(jax_layers.BUILDERS) == set(LAYER_KEYS) == set(torch_layers.BUILDERS)


def torch_batchnorm_after_one_batch(x):
    bn = torch.nn.BatchNorm1d(x.shape[1], momentum=0.1).train()
    bn(torch.from_numpy(x))
    return bn.running_mean.numpy(), bn.running_var.numpy()


def test_batchnorm_momentum_convention():
    x = RNG.standard_normal((16, 4)).astype(np.float32) + 3.0
    torch_mean, _ = torch_batchnorm_after_one_batch(x)
    naive = nnx.BatchNorm(4, momentum=0.1, use_running_average=False, rngs=nnx.Rngs(0))
    naive(jnp.asarray(x))
    assert np.abs(np.asarray(naive.mean[...]) - torch_mean).max() > 1.0  # 0.9 * batch mean
    named = nnx.BatchNorm(4, momentum=jax_layers.flax_momentum(0.1), use_running_average=False,
                          rngs=nnx.Rngs(0))
    named(jnp.asarray(x))
    assert_allclose(named.mean[...], torch_mean, 1e-6, "running mean")


def test_batchnorm_running_variance_is_unbiased():
    x = RNG.standard_normal((8, 4)).astype(np.float32) * 2.0
    _, torch_var = torch_batchnorm_after_one_batch(x)
    flax_bn = nnx.BatchNorm(4, momentum=jax_layers.flax_momentum(0.1),
                            use_running_average=False, rngs=nnx.Rngs(0))
    flax_bn(jnp.asarray(x))
    # biased: 7/8 of the unbiased batch variance, a difference of order 0.1 * var / 8
    assert np.abs(np.asarray(flax_bn.var[...]) - torch_var).max() > 1e-2
    ours = jax_layers.BatchNorm(4, momentum=0.1)
    ours(jnp.asarray(x), train=True)
    assert_allclose(ours.var[...], torch_var, 1e-6, "running var")
    assert_allclose(jax_layers.unbiased_variance(jnp.float32(7.0), 8), 8.0, 1e-6)


def test_same_padding_at_stride_2():
    x = RNG.standard_normal((1, 2, 14, 14)).astype(np.float32)
    w = RNG.standard_normal((3, 2, 3, 3)).astype(np.float32)
    flax_same = jax.lax.conv_general_dilated(nhwc(x), jnp.asarray(w.transpose(2, 3, 1, 0)),
                                             (2, 2), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    with pytest.raises(RuntimeError, match="padding='same' is not supported for strided"):
        F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=2, padding="same")
    naive = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=2, padding=1).numpy()
    assert naive.shape == (1, 3, 7, 7)  # the same shape, other pixels
    assert np.abs(naive.transpose(0, 2, 3, 1) - np.asarray(flax_same)).max() > 1e-2
    top, bottom = same_padding(14, 3, 2)
    assert (top, bottom) == (0, 1)  # the extra pixel at the end
    padded = F.pad(torch.from_numpy(x), (top, bottom, top, bottom))
    named = F.conv2d(padded, torch.from_numpy(w), stride=2).numpy()
    assert_allclose(named.transpose(0, 2, 3, 1), flax_same, 1e-5, "same padding")


def test_avgpool_count_include_pad():
    x = RNG.standard_normal((2, 3, 7, 7)).astype(np.float32)
    for include in (True, False):
        expected = F.avg_pool2d(torch.from_numpy(x), 3, 2, 1, count_include_pad=include).numpy()
        got = pooling.avg_pool(nhwc(x), (3, 3), (2, 2), (1, 1), False, include)
        assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, 1e-6, f"{include}")
    naive = nnx.avg_pool(nhwc(x), (3, 3), (2, 2), ((1, 1), (1, 1)), count_include_pad=True)
    excluded = F.avg_pool2d(torch.from_numpy(x), 3, 2, 1, count_include_pad=False).numpy()
    assert np.abs(np.asarray(naive).transpose(0, 3, 1, 2) - excluded).max() > 1e-2


def test_pool_ceil_mode():
    x = RNG.standard_normal((1, 2, 7, 7)).astype(np.float32)
    expected = F.max_pool2d(torch.from_numpy(x), 2, 2, ceil_mode=True).numpy()
    assert expected.shape[-1] == pool_output_size(7, 2, 2, 0, True) == 4
    naive = nnx.max_pool(nhwc(x), (2, 2), (2, 2))  # floor: 3x3
    assert naive.shape[1] == 3 != expected.shape[-1]
    got = pooling.max_pool(nhwc(x), (2, 2), (2, 2), (0, 0), True)
    assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, 0.0, "ceil max")
    expected = F.avg_pool2d(torch.from_numpy(x), 3, 2, 1, ceil_mode=True,
                            count_include_pad=True).numpy()
    got = pooling.avg_pool(nhwc(x), (3, 3), (2, 2), (1, 1), True, True)
    assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, 1e-6, "ceil avg")


def test_gelu_exact_by_default():
    x = np.linspace(-4, 4, 101, dtype=np.float32)
    exact = F.gelu(torch.from_numpy(x)).numpy()
    assert np.abs(np.asarray(jax.nn.gelu(x)) - exact).max() > 1e-4  # tanh approximation
    assert_allclose(jax_layers.gelu(x), exact, 1e-6, "gelu")
    tanh = F.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    assert_allclose(jax_layers.gelu(x, approximate=True), tanh, 1e-6, "gelu tanh")


def _edges_and_normal(shape=(200, 14, 14, 8)) -> np.ndarray:
    x = (RNG.standard_normal(shape) * 3).astype(np.float32)
    x.flat[:6] = [np.inf, -np.inf, np.nan, -100.0, 100.0, 0.0]
    return x


def _torch_value_and_grad(fn, x):
    t = torch.from_numpy(x).requires_grad_()
    y = fn(t)
    y.sum().backward()
    return y.detach().numpy(), t.grad.numpy()


def test_exact_gelu_is_torchs_formula():
    """``gelu_erf`` computes torch's x * 0.5 * (1 + erf(x / sqrt 2)); the naive port,
    ``jax.nn.gelu(approximate=False)``, computes 0.5 x erfc(-x / sqrt 2). Both are close to
    torch's CPU GELU, whose erf is SLEEF's; the named one rounds like it more often. Measured
    on these 10^5 values of 3 N(0, 1): 54.5 % bit-equal against 41.3 %; largest difference
    5.2 spacings of x (at |x| ~ 3.5, where XLA's erf and SLEEF's differ by ~1e-6 near +-1)
    against 4.5 (6.0 and 5.0 on 10^6 values); gradients within 2.4e-7 = 2 eps of torch's."""
    x = (np.random.default_rng(0).standard_normal(100_000) * 3).astype(np.float32)
    expected, expected_grad = _torch_value_and_grad(F.gelu, x)
    ours = np.asarray(jax.jit(jax_layers.gelu_erf)(x))
    naive = np.asarray(jax.nn.gelu(x, approximate=False))
    assert (ours == expected).mean() > (naive == expected).mean() + 0.1
    assert np.all(np.abs(ours - expected) <= 6 * np.spacing(np.abs(x)))
    grad = np.asarray(jax.vmap(jax.grad(jax_layers.gelu_erf))(x))
    assert np.abs(grad - expected_grad).max() <= 2 * np.finfo(np.float32).eps


def test_silu_is_torchs_formula_with_torchs_gradient():
    x = _edges_and_normal()
    y_torch, g_torch = _torch_value_and_grad(F.silu, x)
    finite = np.isfinite(y_torch)
    named = np.asarray(jax.jit(jax_layers.silu)(x))
    naive = np.asarray(jax.jit(jax.nn.silu)(x))  # x * logistic(x)
    # the same formula rounds as torch's on nearly every entry (measured: 99.6 % bit-equal,
    # x * logistic(x) 76 %); which of XLA's and Sleef's exp is nearer varies per entry
    assert (named == y_torch)[finite].mean() > (naive == y_torch)[finite].mean() + 0.1
    assert np.array_equal(np.isnan(named), np.isnan(y_torch))
    # torch's backward formula: finite at x = -100, where autodiff of x / (1 + exp(-x)) is
    # inf / inf
    grad = np.asarray(jax.jit(jax.grad(lambda v: jax_layers.silu(v).sum()))(x))
    naive_grad = jax.grad(lambda v: (v / (1 + jnp.exp(-v))).sum())(x)
    assert np.isnan(naive_grad[0, 0, 0, 3]) and grad[0, 0, 0, 3] == g_torch[0, 0, 0, 3] == 0
    assert np.array_equal(np.isnan(grad), np.isnan(g_torch))
    assert_allclose(grad[np.isfinite(g_torch)], g_torch[np.isfinite(g_torch)], 1e-6, "silu'")


def test_sigmoid_is_torchs_formula_with_torchs_gradient():
    x = _edges_and_normal()
    y_torch, g_torch = _torch_value_and_grad(torch.sigmoid, x)
    named = np.asarray(jax.jit(jax_layers.sigmoid)(x))
    assert np.array_equal(np.isnan(named), np.isnan(y_torch))
    assert_allclose(named[~np.isnan(y_torch)], y_torch[~np.isnan(y_torch)], 1e-6, "sigmoid")
    grad = np.asarray(jax.jit(jax.grad(lambda v: jax_layers.sigmoid(v).sum()))(x))
    assert np.array_equal(np.isnan(grad), np.isnan(g_torch))
    assert_allclose(grad[~np.isnan(g_torch)], g_torch[~np.isnan(g_torch)], 1e-6, "sigmoid'")


def test_ones_like_exactly_is_one_without_a_broadcast():
    x = jnp.asarray([0.0, -2.5, np.inf, -np.inf, np.nan], jnp.float32)
    assert np.array_equal(np.asarray(jax_layers.ones_like_exactly(x)), [1, 1, 1, 1, 0])
    hlo = jax.jit(lambda v: v / (jax_layers.ones_like_exactly(v) + jnp.exp(-v))).lower(
        jnp.zeros((8, 8))).compile().as_text()
    naive = jax.jit(lambda v: v / (1 + jnp.exp(-v))).lower(jnp.zeros((8, 8))).compile().as_text()
    assert "broadcast(" in naive and "broadcast(" not in hlo


def test_layernorm_eps_default():
    x = (RNG.standard_normal((4, 8)) * 1e-3).astype(np.float32)  # variance ~ eps
    expected = torch.nn.LayerNorm(8)(torch.from_numpy(x)).detach().numpy()
    naive = nnx.LayerNorm(8, rngs=nnx.Rngs(0))(jnp.asarray(x))
    assert np.abs(np.asarray(naive) - expected).max() > 1e-3
    named = nnx.LayerNorm(8, epsilon=jax_layers.layernorm_epsilon(), rngs=nnx.Rngs(0))
    assert_allclose(named(jnp.asarray(x)), expected, 1e-4, "layernorm")


def test_label_range_is_checked_before_jax_gathers_silently():
    logits, labels = np.zeros((2, 3), np.float32), np.array([0, 5])
    with pytest.raises(IndexError):
        F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
    loss = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), labels)
    assert loss.shape == (2,)  # no error: the out-of-range label is gathered silently
    with pytest.raises(DataError, match=r"range over \[0, 5\].*labels in \[0, 2\]"):
        check_label_range(labels, 3, "training labels")
    check_label_range(np.array([0, 2]), 3)


@pytest.mark.parametrize("shape", [(4, 6), (4, 3, 5, 5)])
def test_dropout_masks_are_shared(shape):
    """jax.random and torch draw other masks; the shared NumPy masks make both sides drop
    the same entries, draw after draw."""
    x = RNG.standard_normal(shape).astype(np.float32)
    torch_drop = torch_layers.Dropout(0.5, seed=3, index=7).train()
    jax_drop = jax_layers.Dropout(0.5, seed=3, index=7)
    jax_x = nhwc(x) if x.ndim == 4 else jnp.asarray(x)
    for _ in range(2):
        expected = torch_drop(torch.from_numpy(x)).numpy()
        got = np.asarray(jax_drop(jax_x, train=True))
        assert_allclose(got.transpose(0, 3, 1, 2) if x.ndim == 4 else got, expected, 0.0, "mask")
    assert int(torch_drop.draws) == int(jax_drop.draws[...]) == 2
    own = jax_layers.Dropout(0.5, seed=3, index=7, masks="jax")(jax_x, train=True)
    assert not np.array_equal(np.asarray(own), np.asarray(jax_drop(jax_x, train=True)))
    assert np.array_equal(np.asarray(jax_drop(jax_x, train=False)), np.asarray(jax_x))


def test_summary_totals_by_hand():
    from jaxnets.summary import jax_summary
    from torchref.summary import torch_summary

    # resnet_gelu_fashion: stem 1*9*8+8; block1 two 8->8 3x3 convs (8*9*8+8 each); block2
    # 8->16 3x3 (8*9*16+16), 16->16 3x3 (16*9*16+16) and the 1x1 projection 8*16+16;
    # LayerNorm 2*16; Linear 16*10+10
    resnet = 80 + 2 * 584 + 1168 + 2320 + 144 + 32 + 170
    # vgg_bn_fashion: convs without bias 1*9*8, 8*9*8, 8*9*16; BatchNorm 2*(8+8+16+32);
    # fc1 784*32 without bias; fc2 32*10+10
    vgg = 72 + 576 + 1152 + 2 * 64 + 784 * 32 + 330
    for name, total in (("resnet_gelu_fashion", resnet), ("vgg_bn_fashion", vgg),
                        ("stride2_same_mnist", 80 + 1168 + 256 * 10 + 10)):
        cfg = load_config(name)
        jax_side, torch_side = jax_summary(cfg), torch_summary(cfg)
        assert jax_side["total_params"] == torch_side["total_params"] == total, name
        assert [layer["name"] for layer in jax_side["layers"]] == [
            layer["name"] for layer in torch_side["layers"]]


def test_build_model_leaves_the_callers_torch_stream_alone():
    from torchref.models import build_model

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(load_config("lenet_mnist")["model"], seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(("layers", "message"), [
    ([{"type": "conv2d", "out": 4, "kernel": 3}, {"type": "linear", "out": 10}],
     r"model.layers\[1\] layer 'linear_1' \(linear\) on input \(4, 26, 26\): linear needs a "
     r"vector"),
    ([{"type": "maxpool", "kernel": 30}], r"model.layers\[0\].*\(1, 28, 28\): pool kernel "
                                          r"\(30, 30\) is larger than its input"),
    ([{"type": "residual", "name": "block", "layers": [
        {"type": "conv2d", "out": 4, "kernel": 3}, {"type": "flatten"}]},
      {"type": "linear", "out": 10}],
     r"model.layers\[0\] layer 'block' \(residual\) on input \(1, 28, 28\): its branch gives "
     r"\(2704,\), and no 1x1 projection"),
    ([{"type": "residual", "layers": [{"type": "conv2d", "out": 4, "kernel": 3,
                                       "padding": "full"}]}],
     r"model.layers\[0\].layers\[0\] 'conv2d_0': padding = 'full' must be"),
    ([{"type": "conv", "out": 4}], r"unknown layer type 'conv' \(did you mean 'conv2d'\?\)"),
    ([{"type": "linear", "out": 10, "size": 3}], r"unknown key 'size' for linear"),
    ([{"type": "dropout", "rate": 1.0}], r"rate = 1.0 must be in \[0, 1\)"),
    ([{"type": "flatten"}, {"type": "linear", "out": 3}],
     r"output per example is \(3,\), but fashion_mnist has 10 classes"),
])
def test_bad_layer_lists_name_the_layer(layers, message):
    from jaxnets.config import config_from_dict
    from jaxnets.errors import ConfigError

    raw = {"data": {"flatten": False}, "model": {"name": "Sequential", "layers": layers}}
    with pytest.raises(ConfigError, match=message) as error:
        config_from_dict(raw)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("config", "override", "message"), [
    ("mlp_fashion", "model.in_features=100", "model.in_features = 100, but the data gives 784"),
    ("convnet_mnist", "data.flatten=true", "conv2d needs an image"),
    ("mlp_fashion", "model.out_features=3", "has 10 classes"),
])
def test_zoo_mistakes_are_one_line_errors(config, override, message):
    from conftest import run_cli

    result = run_cli("train", config, "--dataset", "fashion_mnist", "--set", override)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_conversion_rules_for_norms_both_ways():
    from jaxnets import convert

    torch_side = {"bn.weight": np.ones(3, np.float32), "bn.bias": np.zeros(3, np.float32),
                  "bn.running_mean": np.arange(3, dtype=np.float32),
                  "bn.running_var": np.full(3, 2.0, np.float32),
                  "bn.num_batches_tracked": np.array(5), "ln.weight": np.ones(4, np.float32),
                  "fc.weight": np.zeros((2, 4), np.float32)}
    flax = convert.torch_to_flax(torch_side)
    assert sorted(flax) == ["bn.bias", "bn.mean", "bn.scale", "bn.var", "fc.kernel",
                            "ln.scale"]
    assert flax["fc.kernel"].shape == (4, 2) and np.array_equal(flax["bn.var"], [2, 2, 2])
    back = convert.flax_to_torch(flax)
    assert sorted(back) == sorted(k for k in torch_side if "num_batches" not in k)
    assert {r.torch_leaf for r in convert.RULES} >= {"weight", "running_mean", "running_var",
                                                     "num_batches_tracked"}
