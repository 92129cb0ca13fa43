"""The linear layers' weight gradient (``jaxnets.layers.linear_dot_general``): where in
features are a multiple of 256 and out features at most 32, the CPU float32 path takes it as a
row-major dot on ``onednn.transposed_copy(x)``, which XLA cannot fold back into a slow
transposed dot; everywhere else it is autodiff's own dot, bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_conv_path import _tiny_trainer, without_onednn  # noqa: F401 (a fixture)
from test_onednn import assert_within_summation_bound, needs_library

from jaxnets import onednn
from jaxnets.config import load_config
from jaxnets.layers import MATMUL, linear_dot_general, uses_transposed_copy

TRANSPOSE = "jaxnets_transpose"


@needs_library
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 4), (33, 70), (100, 512), (37, 256)],
                         ids=str)
def test_the_transposed_copy_is_the_transpose(shape):
    """Exactly x.T, the SSE blocks' edges (sizes not multiples of 4 or of the 32 tile)
    included; its derivative is the transpose's."""
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    assert np.array_equal(np.asarray(jax.jit(onednn.transposed_copy)(x)), x.T)
    weights = np.random.default_rng(4).standard_normal(shape[::-1]).astype(np.float32)
    grad = jax.grad(lambda x: jnp.sum(onednn.transposed_copy(x) * weights))(x)
    assert np.array_equal(np.asarray(grad), weights.T)


def _value_and_grads(dot, x, kernel, cotangent):
    y, vjp = jax.vjp(lambda x, k: dot(x, k, MATMUL), x, kernel)
    return (y, *vjp(cotangent))


def _arrays(batch, fan_in, out, dtype=np.float32):
    rng = np.random.default_rng(batch * 7 + out)
    return (rng.standard_normal((batch, fan_in)).astype(dtype),
            rng.standard_normal((fan_in, out)).astype(dtype),
            rng.standard_normal((batch, out)).astype(dtype))


@needs_library
@pytest.mark.parametrize("batch,fan_in,out", [(100, 512, 10), (7, 256, 1), (33, 768, 32),
                                              (100, 784, 10), (64, 512, 64)], ids=str)
def test_values_and_gradients_within_the_float32_summation_bound(batch, fan_in, out):
    """Each output is a sum of K products, within K * eps * sum|terms| of the float64 sum
    (gamma_K rounded up, as in test_onednn). K: in features for the forward, out features for
    the input gradient, the batch for the weight gradient. The compiled gradient holds the
    transposed copy exactly where ``uses_transposed_copy`` says."""
    x, kernel, cotangent = _arrays(batch, fan_in, out)
    step = jax.jit(lambda x, k, g: _value_and_grads(linear_dot_general, x, k, g))
    ours = step(x, kernel, cotangent)
    assert (TRANSPOSE in step.lower(x, kernel, cotangent).as_text()) == uses_transposed_copy(
        fan_in, out)
    with jax.enable_x64(True):
        exact = _value_and_grads(jax.lax.dot_general,
                                 *(jnp.asarray(a, jnp.float64) for a in (x, kernel, cotangent)))
        magnitude = _value_and_grads(jax.lax.dot_general, *(
            jnp.abs(jnp.asarray(a, jnp.float64)) for a in (x, kernel, cotangent)))
    for name, got, ref, mag, k in zip(("forward", "input gradient", "weight gradient"), ours,
                                      exact, magnitude, (fan_in, out, batch), strict=True):
        assert_within_summation_bound(name, got, ref, mag, k)


@pytest.mark.parametrize("batch,fan_in,out", [(100, 784, 10), (100, 512, 64), (8, 3, 2)],
                         ids=str)
def test_other_shapes_are_autodiffs_own_dots_bit_for_bit(batch, fan_in, out):
    """Outside ``uses_transposed_copy``, the custom VJP's three dots are the ones autodiff
    makes: the same compiled results, bit for bit."""
    assert not uses_transposed_copy(fan_in, out)
    x, kernel, cotangent = _arrays(batch, fan_in, out)
    ours = jax.jit(lambda x, k, g: _value_and_grads(linear_dot_general, x, k, g))(
        x, kernel, cotangent)
    plain = jax.jit(lambda x, k, g: _value_and_grads(jax.lax.dot_general, x, k, g))(
        x, kernel, cotangent)
    for got, want in zip(ours, plain, strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_float64_and_other_products_keep_xlas_dot():
    """float64 (the parity runs' dtype) has no copy; a 3-D input or a preferred element type
    is ``lax.dot_general`` as called."""
    with jax.enable_x64(True):
        x, kernel, cotangent = (jnp.asarray(a, jnp.float64) for a in _arrays(8, 256, 10))
        text = jax.jit(lambda x, k, g: _value_and_grads(linear_dot_general, x, k, g)).lower(
            x, kernel, cotangent).as_text()
        assert TRANSPOSE not in text
    x3 = jnp.ones((2, 8, 256), jnp.float32)
    kernel = jnp.ones((256, 10), jnp.float32)
    dims = (((2,), (0,)), ((), ()))
    assert np.array_equal(linear_dot_general(x3, kernel, dims),
                          jax.lax.dot_general(x3, kernel, dims))
    text = jax.jit(jax.grad(lambda k: linear_dot_general(x3, k, dims).sum())).lower(
        kernel).as_text()
    assert TRANSPOSE not in text


@needs_library
@pytest.mark.parametrize("conv,copies", [("auto", 1), ("canonical", 0), ("lax", 0)])
def test_the_seed_mlps_epoch_takes_the_copy_for_its_last_layer_only(conv, copies):
    """784-512-512-10: only the 512 -> 10 layer's weight gradient takes the copy, and only
    with ``model.conv = "auto"`` (any other setting keeps XLA's dots everywhere)."""
    trainer = _tiny_trainer("mlp_mnist", f'model.conv="{conv}"')
    assert trainer._compiled_epoch((2, 8)).as_text().count(f'"{TRANSPOSE}"') == copies


@pytest.mark.usefixtures("without_onednn")
def test_without_the_library_the_weight_gradient_is_xlas_dot():
    """Where the library is not built, "auto" trains the seed MLP on XLA's dots alone."""
    trainer = _tiny_trainer("mlp_mnist")
    assert TRANSPOSE not in trainer._compiled_epoch((2, 8)).as_text()


@needs_library
def test_a_residuals_linear_projection_takes_the_same_path():
    """A residual block on 256 features whose branch is a linear 256 -> 16: the branch and the
    projection that maps the skip to 16 features are both linear layers of the builder with
    ``linear_dot_general``; their weight gradients share one copy of their common input (XLA
    merges the two identical calls)."""
    from flax import nnx

    from jaxnets.models import build_model

    model_cfg = {**load_config("mlp_mnist")["model"], "name": "Sequential", "layers": [
        {"type": "residual", "layers": [{"type": "linear", "out": 16}]}]}
    model = build_model(model_cfg, seed=0, input_shape=(256,))
    graphdef, state = nnx.split(model)

    def loss(state, x):
        return nnx.merge(graphdef, state)(x).sum()

    text = jax.jit(jax.grad(loss)).lower(state, jnp.ones((8, 256), jnp.float32)).compile(
    ).as_text()
    assert text.count(f'"{TRANSPOSE}"') == 1
    block = model.module("residual_0")
    assert block.projection.dot_general is linear_dot_general
    linears = [m for _, m in nnx.iter_graph(block) if isinstance(m, nnx.Linear)]
    assert len(linears) == 2 and all(m.dot_general is linear_dot_general for m in linears)
