"""The CPU convolution path (im2col matmuls with a custom VJP) and the fast max-pool equal
``lax.conv`` / ``nnx.max_pool`` in values and gradients, in float32 and float64, for every
kernel, stride and padding the seed networks use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_allclose
from jaxnets.config import load_config
from jaxnets.conv import conv2d_im2col, conv_general_dilated_im2col, max_pool_2x2, use_im2col
from jaxnets.models import build_model

# (batch, size, in, out, kernel, padding): every conv layer of LeNet, SimpleNet and ConvNet
SEED_CONVS = [(8, 28, 1, 6, 3, 1), (8, 14, 6, 16, 5, 0), (8, 28, 1, 20, 5, 2),
              (8, 14, 20, 20, 5, 2), (8, 28, 1, 10, 5, 0), (8, 12, 10, 20, 5, 0)]
TOL = {"float32": 1e-5, "float64": 1e-12}


def lax_conv(x, k, pad):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SEED_CONVS)
def test_im2col_equals_lax_conv(shape, dtype):
    n, size, c, o, k, pad = shape
    rng = np.random.default_rng(sum(shape))
    with jax.enable_x64(dtype == "float64"):
        x = jnp.asarray(rng.standard_normal((n, size, size, c)), dtype)
        kernel = jnp.asarray(rng.standard_normal((k, k, c, o)) / k, dtype)
        cotangent = jnp.asarray(rng.standard_normal(lax_conv(x, kernel, pad).shape), dtype)
        ours = conv2d_im2col(x, kernel, ((pad, pad), (pad, pad)))
        assert ours.dtype == jnp.dtype(dtype)

        def grads(f):
            return jax.grad(lambda x, w: jnp.sum(f(x, w) * cotangent), argnums=(0, 1))(
                x, kernel)

        assert_allclose(ours, lax_conv(x, kernel, pad), TOL[dtype], "forward")
        (dx, dk), (dx_ref, dk_ref) = grads(
            lambda x, w: conv2d_im2col(x, w, ((pad, pad), (pad, pad)))), grads(
            lambda x, w: lax_conv(x, w, pad))
        # gradients sum over the batch and the positions: scale the bound by their magnitude
        scale = max(1.0, float(jnp.abs(dk_ref).max()))
        assert_allclose(dx, dx_ref, TOL[dtype] * max(1.0, float(jnp.abs(dx_ref).max())), "dx")
        assert_allclose(dk, dk_ref, TOL[dtype] * scale, "d kernel")


def test_strided_and_string_padding_fall_back_to_lax():
    x = jnp.ones((1, 5, 5, 1))
    k = jnp.ones((3, 3, 1, 1))
    y = conv_general_dilated_im2col(x, k, (2, 2), [(0, 0), (0, 0)],
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert y.shape == (1, 2, 2, 1) and float(y[0, 0, 0, 0]) == 9.0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(4, 28, 28, 6), (4, 24, 24, 10), (3, 5, 7, 2)])
def test_max_pool_equals_nnx_with_ties(shape, dtype):
    rng = np.random.default_rng(0)
    with jax.enable_x64(dtype == "float64"):
        x = jnp.asarray(rng.integers(0, 3, shape), dtype)  # small integers: ties everywhere
        ref = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        cotangent = jnp.asarray(rng.standard_normal(ref.shape), dtype)
        ours = max_pool_2x2(x)
        np.testing.assert_array_equal(ours, ref)
        g_ours = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * cotangent))(x)
        g_ref = jax.grad(lambda x: jnp.sum(
            nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID") * cotangent))(x)
        np.testing.assert_array_equal(g_ours, g_ref)  # same routing: the first maximum


def test_auto_picks_im2col_on_the_cpu():
    assert jax.default_backend() == "cpu"
    assert use_im2col("auto") and use_im2col("im2col") and not use_im2col("lax")


@pytest.mark.parametrize("name", ["lenet_mnist", "simplenet_mnist", "convnet_mnist"])
def test_models_agree_across_conv_paths(name):
    x = jnp.asarray(np.random.default_rng(1).random((4, 28, 28, 1)), jnp.float32)
    outputs = {}
    for impl in ("lax", "im2col", "auto"):
        model = build_model(load_config(name, [f"model.conv={impl}"])["model"], seed=0)
        outputs[impl] = np.asarray(model(x))
    assert_allclose(outputs["im2col"], outputs["lax"], 1e-5, f"{name} im2col vs lax")
    assert_allclose(outputs["auto"], outputs["lax"], 1e-5, f"{name} auto vs lax")
