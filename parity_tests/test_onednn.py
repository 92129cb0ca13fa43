"""JAX's CPU convolutions through oneDNN (``jaxnets.onednn``, the float32 path of
``model.conv = "auto"``): built by the project's set-up wherever Debian's libdnnl-dev is;
forward and both gradients within float32's summation bound of a float64 reference for every
kernel, stride, padding and dilation the layer vocabulary allows; routed to exactly the
convolutions it covers, in training and in inference."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_conv_path import LAYER_CASES, NHWC, SEED_CONVS, _pair, _tiny_trainer

from jaxnets import onednn
from jaxnets.conv import conv_for
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


def _forward_and_vjp(impl, x, kernel, stride, padding, dilation, cotangent):
    def f(x, w):
        return conv_for(impl)(x, w, stride, padding, rhs_dilation=dilation,
                              dimension_numbers=NHWC)

    y, vjp = jax.vjp(f, x, kernel)
    return (y, *vjp(cotangent))


@needs_library
@pytest.mark.parametrize("case", SEED_CONVS + [c for c in LAYER_CASES if c[-1] == 1], ids=str)
def test_forward_and_gradients_within_the_float32_summation_bound(case):
    """Each output is a sum of K products; float32 recursive summation is within
    K * eps * sum|terms| of the exact sum (gamma_K = K u / (1 - K u), u = eps / 2, rounded
    up), and the float64 reference's own error is ~1e-9 of that. K: kh*kw*C for the
    forward, kh*kw*O for the input gradient, N*H'*W' for the kernel gradient."""
    (n, h, w, c, o), (kh, kw), stride, padding, dilation = _geometry(case)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    kernel = rng.standard_normal((kh, kw, c, o)).astype(np.float32)
    y_shape = jax.eval_shape(lambda: conv_for("lax")(
        jnp.asarray(x), jnp.asarray(kernel), stride, padding, rhs_dilation=dilation,
        dimension_numbers=NHWC)).shape
    cotangent = rng.standard_normal(y_shape).astype(np.float32)
    ours = jax.jit(lambda x, k, dy: _forward_and_vjp("onednn", x, k, stride, padding,
                                                     dilation, dy))(x, kernel, cotangent)
    with jax.enable_x64(True):
        as64 = [jnp.asarray(a, jnp.float64) for a in (x, kernel, cotangent)]
        exact = _forward_and_vjp("lax", *as64[:2], stride, padding, dilation, as64[2])
        magnitude = _forward_and_vjp("lax", *(jnp.abs(a) for a in as64[:2]), stride, padding,
                                     dilation, jnp.abs(as64[2]))
    terms = (kh * kw * c, kh * kw * o, n * y_shape[1] * y_shape[2])
    eps = np.finfo(np.float32).eps
    for name, got, ref, mag, k in zip(("forward", "input gradient", "kernel gradient"), ours,
                                      exact, magnitude, terms, strict=True):
        assert got.dtype == jnp.float32 and got.shape == ref.shape, name
        error = np.abs(np.asarray(got, np.float64) - np.asarray(ref))
        bound = k * eps * np.asarray(mag)
        assert np.all(error <= bound), (name, float((error / np.maximum(bound, 1e-300)).max()))


def _targets(text: str) -> list[str]:
    return re.findall(r"jaxnets_onednn_conv_(\w+)", text)


def _xla_convolutions(text: str) -> int:
    return len(re.findall(r"stablehlo\.convolution|\bconvolution\(", text))


@needs_library
def test_auto_trains_and_infers_through_onednn():
    """SimpleNet (1 -> 20 and 20 -> 20 channels): the compiled training epoch and the
    evaluation run every convolution through oneDNN, none through XLA."""
    trainer = _tiny_trainer("simplenet_mnist")
    epoch = trainer._compiled_epoch((2, 8)).as_text()
    targets = _targets(epoch)
    # 2 forwards, 2 kernel gradients, conv2's input gradient (conv1's, of the data, is dead)
    assert sorted(set(targets)) == ["BackwardData", "BackwardWeights", "Forward"], targets
    assert _xla_convolutions(epoch) == 0
    from flax import nnx

    graphdef, state = nnx.split(trainer.model)
    infer = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(
        state, jnp.zeros((2, 28, 28, 1))).as_text()
    assert _targets(infer) == ["Forward", "Forward"] and _xla_convolutions(infer) == 0


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
