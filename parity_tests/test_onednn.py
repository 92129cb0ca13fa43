"""JAX's CPU convolutions through oneDNN (``jaxnets.onednn``, the float32 path of
``model.conv = "auto"``): built by the project's set-up wherever Debian's libdnnl-dev is;
forward and the gradients within float32's summation bound of a float64 reference for every
kernel, stride, padding and dilation the layer vocabulary allows, with and without a bias;
routed to exactly the convolutions it covers, in training and in inference."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_conv_path import LAYER_CASES, NHWC, SEED_CONVS, _pair, _tiny_trainer

from jaxnets import onednn
from jaxnets.conv import add_bias, conv_for, takes_bias
from jaxnets.errors import JaxnetsError

needs_library = pytest.mark.skipif(
    not onednn.HEADER.exists(), reason="no libdnnl-dev here (make installs it where apt is)")


@needs_library
def test_the_setup_built_the_library():
    """Where the header is, ``make`` (and so ``.ci/run``) built the FFI library."""
    assert onednn.unavailable_reason() is None, onednn.unavailable_reason()


def _geometry(case):
    if len(case) == 6:  # a seed layer
        n, size, c, o, k, pad = case
        return (n, size, size, c, o), (k, k), (1, 1), ((pad, pad),) * 2, (1, 1)
    kernel_size, stride, padding, dilation, _ = case
    return (3, 11, 9, 4, 2), _pair(kernel_size), _pair(stride), padding, _pair(dilation)


def _forward_and_vjp(impl, x, kernel, bias, stride, padding, dilation, cotangent):
    """(y, dx, dkernel, dbias); ``bias`` None: no bias, and dbias None."""
    conv = conv_for(impl)

    def f(x, w, b):
        geometry = dict(rhs_dilation=dilation, dimension_numbers=NHWC)
        if takes_bias(conv):  # "onednn" adds it in its primitive
            return conv(x, w, stride, padding, bias=b, **geometry)
        return add_bias(conv(x, w, stride, padding, **geometry), b)

    y, vjp = jax.vjp(f, x, kernel, bias)
    return (y, *vjp(cotangent))


@needs_library
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("case", SEED_CONVS + [c for c in LAYER_CASES if c[-1] == 1], ids=str)
def test_forward_and_gradients_within_the_float32_summation_bound(case, bias):
    """Each output is a sum of K products; float32 recursive summation is within
    K * eps * sum|terms| of the exact sum (gamma_K = K u / (1 - K u), u = eps / 2, rounded
    up), and the float64 reference's own error is ~1e-9 of that. K: kh*kw*C (+ 1 for the
    bias) for the forward, kh*kw*O for the input gradient, N*H'*W' for the kernel and bias
    gradients."""
    (n, h, w, c, o), (kh, kw), stride, padding, dilation = _geometry(case)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    kernel = rng.standard_normal((kh, kw, c, o)).astype(np.float32)
    b = rng.standard_normal((o,)).astype(np.float32) if bias else None
    y_shape = jax.eval_shape(lambda: conv_for("lax")(
        jnp.asarray(x), jnp.asarray(kernel), stride, padding, rhs_dilation=dilation,
        dimension_numbers=NHWC)).shape
    cotangent = rng.standard_normal(y_shape).astype(np.float32)
    ours = jax.jit(lambda x, k, b, dy: _forward_and_vjp("onednn", x, k, b, stride, padding,
                                                        dilation, dy))(x, kernel, b, cotangent)
    with jax.enable_x64(True):
        x64, k64, dy64 = (jnp.asarray(a, jnp.float64) for a in (x, kernel, cotangent))
        b64 = None if b is None else jnp.asarray(b, jnp.float64)
        exact = _forward_and_vjp("lax", x64, k64, b64, stride, padding, dilation, dy64)
        magnitude = _forward_and_vjp("lax", jnp.abs(x64), jnp.abs(k64),
                                     None if b is None else jnp.abs(b64), stride, padding,
                                     dilation, jnp.abs(dy64))
    assert (ours[3] is None) == (b is None)
    terms = (kh * kw * c + bias, kh * kw * o, n * y_shape[1] * y_shape[2],
             n * y_shape[1] * y_shape[2])
    for name, got, ref, mag, k in zip(("forward", "input gradient", "kernel gradient",
                                       "bias gradient"), ours[:3 + bias], exact, magnitude,
                                      terms, strict=False):
        assert_within_summation_bound(name, got, ref, mag, k)


def assert_within_summation_bound(name, got, exact, magnitude, terms):
    """float32 ``got``, each entry a sum of ``terms`` products, within terms * eps * its
    |terms| sum (``magnitude``) of the float64 ``exact`` (gamma_K rounded up)."""
    assert got.dtype == jnp.float32 and got.shape == exact.shape, name
    error = np.abs(np.asarray(got, np.float64) - np.asarray(exact))
    bound = terms * np.finfo(np.float32).eps * np.asarray(magnitude)
    assert np.all(error <= bound), (name, float((error / np.maximum(bound, 1e-300)).max()))


def _targets(text: str) -> list[str]:
    return re.findall(r"jaxnets_onednn_conv_(\w+)", text)


def _xla_convolutions(text: str) -> int:
    return len(re.findall(r"stablehlo\.convolution|\bconvolution\(", text))


@needs_library
def test_auto_trains_and_infers_through_onednn():
    """SimpleNet (1 -> 20 and 20 -> 20 channels, with biases): the compiled training epoch
    and the evaluation run every convolution through oneDNN, none through XLA, each bias
    added inside oneDNN's forward and its gradient taken with the kernel's."""
    trainer = _tiny_trainer("simplenet_mnist")
    epoch = trainer._compiled_epoch((2, 8)).as_text()
    targets = _targets(epoch)
    # 2 forwards, 2 kernel and bias gradients, conv2's input gradient (conv1's, of the
    # data, is dead)
    assert sorted(targets) == ["BackwardData", "BackwardWeightsBias", "BackwardWeightsBias",
                               "ForwardBias", "ForwardBias"], targets
    assert _xla_convolutions(epoch) == 0
    from flax import nnx

    graphdef, state = nnx.split(trainer.model)
    infer = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(
        state, jnp.zeros((2, 28, 28, 1))).as_text()
    assert _targets(infer) == ["ForwardBias", "ForwardBias"] and _xla_convolutions(infer) == 0


@needs_library
def test_auto_keeps_float64_and_grouped_convolutions_on_the_canonical_path():
    """oneDNN has no float64 convolution, and the FFI kernel takes one group: those stay on
    the canonical path (bit-equal to lax: test_conv_path.py)."""
    def lowered(dtype, groups):
        with jax.enable_x64(dtype == jnp.float64):
            x = jnp.zeros((2, 8, 8, 4), dtype)
            k = jnp.zeros((3, 3, 4 // groups, 4), dtype)
            return jax.jit(jax.grad(lambda x, k: jnp.sum(conv_for("auto")(
                x, k, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=groups)),
                argnums=(0, 1))).lower(x, k).as_text()

    assert _targets(lowered(jnp.float32, 1)) and not _xla_convolutions(lowered(jnp.float32, 1))
    for dtype, groups in ((jnp.float64, 1), (jnp.float32, 2)):
        text = lowered(dtype, groups)
        # both gradients (the forward is dead under the sum's gradient)
        assert not _targets(text) and _xla_convolutions(text) >= 2, (dtype, groups)


def test_asking_for_onednn_without_the_library_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(onednn, "unavailable_reason",
                        lambda: "libjaxnets_onednn.so is not built (needs libdnnl-dev)")
    with pytest.raises(JaxnetsError, match=r"model\.conv 'onednn': .*libdnnl-dev"):
        conv_for("onednn")


@needs_library
def test_the_onednn_version_is_read_from_the_library():
    """What ``bench`` reports beside the framework versions."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", onednn.version() or ""), onednn.version()


SHARDED_PROBE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxnets.conv import conv_for, sharded_conv
mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
x = jax.device_put(jnp.ones((64, 28, 28, 3)), NamedSharding(mesh, P("data")))
k = jax.device_put(jnp.ones((5, 5, 3, 10)), NamedSharding(mesh, P()))
for impl in ("auto", sharded_conv("auto", 2)):
    conv = conv_for(impl)
    f = jax.jit(jax.grad(lambda k, x: jnp.sum(conv(x, k, (1, 1), "VALID",
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC")))))
    text = f.lower(k, x).compile().as_text()
    print(impl, text.count("all-gather("), text.count("jaxnets_onednn"))
"""


@needs_library
def test_a_batch_split_over_devices_keeps_convolutions_partitionable():
    """Two CPU devices, the batch split over them: "auto"'s oneDNN calls make XLA all-gather
    the batch (each call runs whole on both devices); ``sharded_conv`` (what the Trainer
    uses on a mesh) takes the canonical path, which XLA partitions without a gather."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SHARDED_PROBE], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout.split("\n")
    counts = {line.split()[0]: tuple(map(int, line.split()[1:])) for line in out if line}
    assert counts["auto"][0] >= 1 and counts["auto"][1] >= 1, counts  # the naive port
    assert counts["auto_sharded"] == (0, 0), counts
    from jaxnets.conv import sharded_conv

    assert sharded_conv("auto", 1) == "auto" and sharded_conv("canonical", 4) == "canonical"


def _fusions_with(text: str, op: str) -> dict[str, str]:
    """The fused computations of optimized HLO text that hold ``op``, by name."""
    bodies = re.findall(r"^(%?fused_computation[\w.\-]*|%?[\w.\-]*fusion[\w.\-]*) .*?\{\n(.*?)^\}",
                        text, flags=re.S | re.M)
    return {name: body for name, body in bodies if f" {op}(" in body}


@needs_library
def test_a_conv_bias_is_added_by_onednn_so_the_silu_fusion_holds_no_broadcast():
    """The stride-2 CNN (conv with bias, then SiLU): ``jaxnets.layers.Conv`` hands the bias to
    oneDNN, so XLA's fusion of the SiLU reads full arrays only (a broadcast in a fusion with
    exp runs several times slower on XLA:CPU: docs/xla-broadcast-exp.md). With the bias added
    by XLA (``nnx.Conv``'s own add, as ``model.conv = "canonical"`` keeps it) the broadcast
    is there: the check can fail."""
    from flax import nnx

    def silu_fusions(impl):
        model = _tiny_trainer("stride2_same_mnist", f"model.conv={impl}").model
        graphdef, state = nnx.split(model)
        text = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(
            state, jnp.zeros((4, 28, 28, 1))).compile().as_text()
        return _fusions_with(text, "exponential")

    ours, xla_bias = silu_fusions("auto"), silu_fusions("canonical")
    assert ours and xla_bias
    assert not any(" broadcast(" in body for body in ours.values()), ours
    assert any(" broadcast(" in body for body in xla_bias.values()), xla_bias


@needs_library
def test_the_conv_layer_with_onednn_bias_equals_nnx_conv_with_its_own_add():
    """``jaxnets.layers.Conv`` is ``nnx.Conv`` with the bias moved into the convolution call:
    same parameters, outputs within one rounding of the add: oneDNN may add the bias to its
    accumulator rather than to the rounded sum, |diff| <= eps * |y| (oneDNN 2.6.3 on AVX-512
    adds it after the sum: bit-equal over 5 seeds)."""
    from flax import nnx

    from jaxnets.layers import Conv

    kwargs = dict(strides=(2, 2), padding=((1, 1), (0, 1)), conv_general_dilated=conv_for("auto"))
    ours = Conv(3, 5, (3, 3), rngs=nnx.Rngs(0), **kwargs)
    plain = nnx.Conv(3, 5, (3, 3), rngs=nnx.Rngs(0), **kwargs)
    plain.bias[...] = ours.bias[...] = jnp.linspace(-1.0, 1.0, 5)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 9, 8, 3)), jnp.float32)
    got, want = np.asarray(ours(x)), np.asarray(plain(x))
    assert got.shape == want.shape == (2, 5, 4, 5)
    assert np.all(np.abs(got - want) <= np.finfo(np.float32).eps * np.abs(want))
    hlo = jax.jit(lambda x: ours(x)).lower(x).as_text()
    assert _targets(hlo) == ["ForwardBias"]
