"""The convolution path (``jaxnets.conv``): the canonical-VJP convolution equals ``lax.conv``
and its autodiff bit for bit; the compiled training epoch keeps every convolution in the form
XLA:CPU runs through Eigen; ``"auto"`` is resolved where the computation is placed; the im2col
path and the fast max-pool equal ``lax.conv`` / ``nnx.max_pool``."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_allclose
from jaxnets.config import load_config
from jaxnets.conv import conv2d_im2col, conv_for, max_pool_2x2
from jaxnets.data import Dataset
from jaxnets.models import build_model
from jaxnets.train import Trainer

NHWC = ("NHWC", "HWIO", "NHWC")
# (batch, size, in, out, kernel, padding): every conv layer of LeNet, SimpleNet and ConvNet
SEED_CONVS = [(2, 28, 1, 6, 3, 1), (2, 14, 6, 16, 5, 0), (2, 28, 1, 20, 5, 2),
              (2, 14, 20, 20, 5, 2), (2, 28, 1, 10, 5, 0), (2, 12, 10, 20, 5, 0)]
# (kernel, stride, padding, dilation, groups) beyond the seed layers: strided, "SAME"/"VALID",
# uneven pairs, padding wider than the kernel, dilated, grouped, 1x1, non-square sizes
LAYER_CASES = [(3, 2, "SAME", 1, 1), (4, 3, "VALID", 1, 1), (2, 2, "SAME", 1, 1),
               (1, 2, "VALID", 1, 1), (3, 1, ((2, 0), (0, 3)), 1, 1),
               (2, 1, ((3, 3), (3, 3)), 1, 1), (3, 2, "SAME", 2, 1),
               ((3, 5), (1, 2), "SAME", 1, 1), (3, 2, ((1, 0), (0, 2)), 1, 2),
               (5, 1, "SAME", 1, 4)]
TOL = {"float32": 1e-5, "float64": 1e-12}


def lax_conv(x, k, pad):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((pad, pad), (pad, pad)),
                                        dimension_numbers=NHWC)


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _forward_and_vjp(impl, x, kernel, stride, padding, dilation, groups, cotangent):
    conv = conv_for(impl)

    def f(x, w):
        return conv(x, w, _pair(stride), padding, rhs_dilation=_pair(dilation),
                    dimension_numbers=NHWC, feature_group_count=groups)

    @jax.jit
    def run(x, w):
        y, vjp = jax.vjp(f, x, w)
        return (y, *vjp(cotangent))

    return run(x, kernel)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", SEED_CONVS + LAYER_CASES, ids=str)
def test_canonical_vjp_equals_lax_autodiff_bit_for_bit(case, dtype):
    if len(case) == 6:
        n, size, c, o, k, pad = case
        kernel_size, stride, padding, dilation, groups = k, 1, ((pad, pad),) * 2, 1, 1
        height, width = size, size
    else:
        kernel_size, stride, padding, dilation, groups = case
        n, height, width, c, o = 3, 11, 9, 4 * groups, 2 * groups
    kh, kw = _pair(kernel_size)
    rng = np.random.default_rng(7)
    with jax.enable_x64(dtype == "float64"):
        x = jnp.asarray(rng.standard_normal((n, height, width, c)), dtype)
        kernel = jnp.asarray(rng.standard_normal((kh, kw, c // groups, o)), dtype)
        shape = jax.eval_shape(lambda: conv_for("lax")(
            x, kernel, _pair(stride), padding, rhs_dilation=_pair(dilation),
            dimension_numbers=NHWC, feature_group_count=groups)).shape
        cotangent = jnp.asarray(rng.standard_normal(shape), dtype)
        args = (x, kernel, stride, padding, dilation, groups, cotangent)
        y, dx, dk = _forward_and_vjp("canonical", *args)
        y_ref, dx_ref, dk_ref = _forward_and_vjp("lax", *args)
        assert y.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(dx, dx_ref)
        if groups == 1:
            np.testing.assert_array_equal(dk, dk_ref)
        else:
            # XLA rewrites lax's grouped kernel gradient (batch_group_count) into a 3-D
            # convolution run by its naive loop, ours as one canonical convolution per group:
            # the same terms summed in another order
            _assert_within_summation_bound(dk, dk_ref, *args)


def _assert_within_summation_bound(dk, dk_ref, x, kernel, stride, padding, dilation, groups,
                                   cotangent):
    """Two sums of the same terms in different orders agree within |a - b| <= 2 n eps
    sum|terms| (n terms per kernel-gradient entry, one rounding bound for each side)."""
    _, _, magnitude = _forward_and_vjp("lax", jnp.abs(x), jnp.abs(kernel), stride, padding,
                                       dilation, groups, jnp.abs(cotangent))
    terms = x.shape[0] * cotangent.shape[1] * cotangent.shape[2]
    slack = 2 * terms * np.finfo(x.dtype).eps * np.asarray(magnitude)
    assert np.all(np.abs(np.asarray(dk) - np.asarray(dk_ref)) <= slack)


@pytest.fixture
def without_onednn(monkeypatch):
    """"auto" as it runs where jaxnets.onednn is not built: the canonical path on the CPU."""
    from jaxnets import onednn

    monkeypatch.setattr(onednn, "available", lambda: False)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", [(5, 1, ((2, 2), (2, 2)), 1), (3, 2, "VALID", 2)], ids=str)
def test_auto_one_input_channel_kernel_gradient_as_matmul(case, dtype, without_onednn):
    """"auto" on the CPU without oneDNN takes a one-input-channel layer's kernel gradient as
    a matmul: forward and input gradient still bit-identical, the kernel gradient within
    the summation bound."""
    kernel_size, stride, padding, dilation = case
    rng = np.random.default_rng(3)
    with jax.enable_x64(dtype == "float64"):
        x = jnp.asarray(rng.standard_normal((4, 13, 12, 1)), dtype)
        kernel = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, 1, 6)), dtype)
        shape = jax.eval_shape(lambda: conv_for("lax")(
            x, kernel, (stride, stride), padding, rhs_dilation=(dilation, dilation),
            dimension_numbers=NHWC)).shape
        cotangent = jnp.asarray(rng.standard_normal(shape), dtype)
        args = (x, kernel, stride, padding, dilation, 1, cotangent)
        (y, dx, dk), (y_ref, dx_ref, dk_ref) = (_forward_and_vjp("auto", *args),
                                                _forward_and_vjp("lax", *args))
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(dx, dx_ref)
        _assert_within_summation_bound(dk, dk_ref, *args)


def _convolutions(hlo_text: str) -> list[str]:
    return [line for line in hlo_text.splitlines() if " convolution(" in line]


def _eigen_ready(line: str) -> bool:
    """What XLA:CPU needs to run a convolution through Eigen (its
    PotentiallyImplementedAsEigenConvolution): float32, NHWC input, HWIO kernel, NHWC output,
    no window reversal."""
    return ("dim_labels=b01f_01io->b01f" in line and re.search(r"= f32\[", line) is not None
            and "rhs_reversal" not in line)


def _tiny_trainer(name: str, *overrides: str) -> Trainer:
    rng = np.random.default_rng(0)
    images = Dataset("tiny", "generated", rng.integers(0, 255, (16, 28, 28), np.uint8),
                     rng.integers(0, 10, 16), rng.integers(0, 255, (8, 28, 28), np.uint8),
                     rng.integers(0, 10, 8))
    return Trainer(load_config(name, ["train.batch_size=8", *overrides]), images)


def _compiled_epoch_convolutions(name: str, impl: str) -> list[str]:
    trainer = _tiny_trainer(name, f"model.conv={impl}")
    return _convolutions(trainer._compiled_epoch((2, 8)).as_text())


def test_no_convolution_of_the_scanned_training_epoch_falls_back(without_onednn):
    """The epoch's ``lax.scan`` compiled for the CPU: with the canonical VJP ("auto" without
    oneDNN) every convolution, forwards and gradients, is in Eigen's form; with ``lax``
    some are not (the fallback this path exists to avoid), so the check can fail.
    (With oneDNN no XLA convolution is left: test_onednn.py.)"""
    # SimpleNet has both kinds of layer (1 -> 20 and 20 -> 20 channels); the three CNNs
    # pass alike (checked once, left out to keep the suite short)
    ours = _compiled_epoch_convolutions("simplenet_mnist", "auto")
    # 2 forwards, conv2's kernel and input gradients (conv1's kernel gradient is a matmul)
    assert len(ours) == 4, ours
    assert all(_eigen_ready(line) for line in ours), ours
    assert not all(_eigen_ready(line)
                   for line in _compiled_epoch_convolutions("convnet_mnist", "lax"))


def test_auto_is_resolved_where_the_computation_is_placed(without_onednn):
    """A model built while another backend is the default still runs the CPU path when it
    is lowered for the CPU: the choice is made at lowering, not at construction."""
    model = build_model(load_config("simplenet_mnist")["model"], seed=0)
    x = jnp.zeros((2, 28, 28, 1))

    def lowered_for(platform):
        graphdef, params = nnx.split(model)

        def loss(params, x):
            return jnp.sum(nnx.merge(graphdef, params)(x))

        return jax.jit(jax.grad(loss)).trace(params, x).lower(
            lowering_platforms=(platform,)).as_text()

    def dimension_numbers(text):
        return [labels.replace(" ", "") for labels in re.findall(
            r"stablehlo.convolution.*? dim_numbers = (\[.*?\]x\[.*?\]->\[.*?\])", text)]

    # the canonical VJP on the CPU: 2 forwards, conv2's input and kernel gradients (conv1's
    # kernel gradient is a matmul), all NHWC/HWIO; lax's autodiff for a GPU: 5, in its own
    # transposed layouts
    assert dimension_numbers(lowered_for("cpu")) == ["[b,0,1,f]x[0,1,i,o]->[b,0,1,f]"] * 4
    cuda = dimension_numbers(lowered_for("cuda"))
    assert len(cuda) == 5 and set(cuda) != {"[b,0,1,f]x[0,1,i,o]->[b,0,1,f]"}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SEED_CONVS[:2] + SEED_CONVS[3:4])  # 1, 6 and 20 channels in
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
    y = conv_for("im2col")(x, k, (2, 2), [(0, 0), (0, 0)], dimension_numbers=NHWC)
    assert y.shape == (1, 2, 2, 1) and float(y[0, 0, 0, 0]) == 9.0


def test_unknown_conv_implementation_is_named():
    with pytest.raises(ValueError, match=r"model\.conv 'fast'"):
        conv_for("fast")


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


@pytest.mark.parametrize("name", ["simplenet_mnist"])  # 1 -> 20 and 20 -> 20 channels
def test_models_agree_across_conv_paths(name):
    x = jnp.asarray(np.random.default_rng(1).random((4, 28, 28, 1)), jnp.float32)
    outputs = {}
    for impl in ("lax", "canonical", "im2col", "auto"):
        model = build_model(load_config(name, [f"model.conv={impl}"])["model"], seed=0)
        outputs[impl] = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
    assert_allclose(outputs["im2col"], outputs["lax"], 1e-5, f"{name} im2col vs lax")
    np.testing.assert_array_equal(outputs["canonical"], outputs["lax"])
    from jaxnets import onednn

    if onednn.available():  # oneDNN sums in its own order: its bound is test_onednn.py's
        assert_allclose(outputs["auto"], outputs["lax"], 1e-5, f"{name} auto vs lax")
    else:  # the canonical path
        np.testing.assert_array_equal(outputs["auto"], outputs["lax"])


def test_xla_cpu_fusions_none_leaves_the_library_fusions_out():
    """``train.xla_cpu_fusions = "none"`` (ConvNet's setting, measured faster there): the
    compiled training epoch and evaluation hold no YNNPACK fusion, the default ones do; the
    two training runs agree within float32 rounding."""
    default = _tiny_trainer("convnet_mnist", 'train.xla_cpu_fusions="default"',
                            "train.eval_batch_size=4")
    none = _tiny_trainer("convnet_mnist", 'train.xla_cpu_fusions="none"',
                         "train.eval_batch_size=4")
    assert "__ynn_fusion" in default._compiled_epoch((2, 8)).as_text()
    assert "__ynn_fusion" not in none._compiled_epoch((2, 8)).as_text()
    for trainer, expected in ((default, True), (none, False)):
        x, y = trainer.test_x, trainer.test_y
        evaluation = trainer._eval_batches.lower(trainer.params, trainer.other, x, y)
        assert ("__ynn_fusion" in evaluation.compile().as_text()) is expected
    for trainer in (default, none):
        trainer.train_epochs(range(1), progress=False, scan=True)
    for a, b in zip(jax.tree.leaves(default.params), jax.tree.leaves(none.params), strict=True):
        assert_allclose(np.asarray(b), np.asarray(a), 1e-5, "params after one epoch")
