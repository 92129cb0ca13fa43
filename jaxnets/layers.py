"""The JAX builders of the layer vocabulary (``jaxnets.spec``): :data:`BUILDERS` maps every
layer type to a function that makes its Flax NNX module (layers with weights or state) or its
pure function, and :class:`Sequential` runs them in order. ``torchref.layers`` is the twin.

Inputs: (batch, features) or (batch, H, W, C), NHWC as Flax expects. Train/eval mode is an
explicit argument: ``model(x, train=True)`` uses batch statistics (and updates the running
ones) and draws dropout masks; ``train=False`` uses the running statistics and no dropout.
Every framework difference the vocabulary meets is one named function with a comment here, in
``jaxnets.spec`` (padding, pool sizes) or ``jaxnets.pooling``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnets.conv import NHWC, conv_for, takes_bias
from jaxnets.init import linear_inits
from jaxnets.pooling import avg_pool, max_pool
from jaxnets.spec import LAYER_KEYS, STATEFUL, Layer, conv_pads, pair, pool_options

M_SQRT1_2 = 0.7071067811865476  # <cmath>'s M_SQRT1_2, 1 / sqrt(2), as torch's GELU uses it


def flax_momentum(torch_momentum: float) -> float:
    # Framework difference: PyTorch's momentum weighs the NEW batch (0.1), Flax's the old (0.9).
    return 1.0 - torch_momentum


def unbiased_variance(biased: jax.Array, count: int) -> jax.Array:
    # Framework difference: PyTorch's running_var tracks the unbiased (n - 1) batch variance,
    # Flax's the biased one; both normalise the batch itself with the biased variance.
    return biased * (count / max(count - 1, 1))


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
    # Framework difference: jax.nn.gelu defaults to the tanh approximation, torch to exact erf.
    if approximate:
        return jax.nn.gelu(x, approximate=True)
    return gelu_erf(x)


def gelu_erf(x: jax.Array) -> jax.Array:
    # Framework difference: torch's exact GELU is x * 0.5 * (1 + erf(x * M_SQRT1_2)),
    # jax.nn.gelu's 0.5 x erfc(-x / sqrt 2), which XLA:CPU runs 1.8-2.9x slower (its erfc is
    # expanded into polynomials: docs/xla-broadcast-exp.md). Measured on a 2-core EPYC,
    # gelu(x + r) on (1000, 28, 28, 8) float32: 1.97 against 3.55 ms (PyTorch eager's add and
    # GELU 4.05); its gradient (64, 28, 28, 8): 0.24-0.29 against 0.26-0.36 ms. Against torch's
    # CPU GELU on 10^6 values of 3 N(0, 1): 54.5 % of outputs bit-equal (jax.nn.gelu 41.4 %),
    # max |diff| 1.4e-6 at x = 3.4, 6 spacings of x (jax.nn.gelu 1.2e-6, 5): there XLA's erf
    # and SLEEF's, torch's, differ near 1.
    return x * 0.5 * (1 + jax.lax.erf(x * M_SQRT1_2))


def ones_like_exactly(x: jax.Array) -> jax.Array:
    # XLA:CPU: a fusion of exp/erf/division with a broadcast constant runs 3-7x slower; x == x
    # gives 1 (0 where x is NaN) with no broadcast (docs/xla-broadcast-exp.md).
    # Measured on a (1000, 14, 14, 8) float32 array, 2-core EPYC: silu 0.67 against
    # jax.nn.silu's 4.22 ms, its gradient 0.79 against 4.46, sigmoid 0.72 against 3.71. Where
    # a layer's bias add fuses in (conv or linear, then the activation) its broadcast slows the
    # fusion again (silu(x + b) 2.71 ms): the zoo's evaluation and training times are unchanged.
    return (x == x).astype(x.dtype)


@jax.custom_jvp
def sigmoid(x: jax.Array) -> jax.Array:
    # Framework difference: torch's sigmoid is 1 / (1 + exp(-x)), jax.nn.sigmoid XLA's logistic.
    one = ones_like_exactly(x)
    return one / (one + jnp.exp(-x))


@sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = sigmoid(x)
    return y, dx * (ones_like_exactly(x) - y) * y  # torch's sigmoid_backward: dy (1 - y) y


@jax.custom_jvp
def silu(x: jax.Array) -> jax.Array:
    # Framework difference: torch's SiLU is x / (1 + exp(-x)), jax.nn.silu x * logistic(x).
    return x / (ones_like_exactly(x) + jnp.exp(-x))


@silu.defjvp
def _silu_jvp(primals, tangents):
    # torch's silu_backward, dy s (1 + x (1 - s)): finite where exp(-x) overflows (x < -88 in
    # float32), whose autodiff through the division is inf / inf
    (x,), (dx,) = primals, tangents
    one = ones_like_exactly(x)
    denominator = one + jnp.exp(-x)  # exp(-x) once for silu(x) and sigmoid(x) alike
    s = one / denominator
    return x / denominator, dx * (s * (one + x * (one - s)))


def layernorm_epsilon(torch_eps: float = 1e-5) -> float:
    # Framework difference: nnx.LayerNorm defaults to eps 1e-6, torch.nn.LayerNorm to 1e-5.
    return torch_eps


def flatten_chw(x: jax.Array) -> jax.Array:
    # Framework difference: torch flattens NCHW channel-major (C, H, W); a plain reshape of
    # NHWC would give (H, W, C), so the first Linear after a conv would see permuted inputs.
    """(batch, H, W, C) -> (batch, C*H*W) in PyTorch's order."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def flatten(x: jax.Array) -> jax.Array:
    """(batch, ...) -> (batch, prod(...)): flatten_chw for images, a reshape otherwise."""
    return flatten_chw(x) if x.ndim == 4 else x.reshape(x.shape[0], -1)


def dropout_mask(seed: int, index: int, draw: int, shape: tuple[int, ...], rate: float,
                 dtype: Any = np.float32) -> np.ndarray:
    """The dropout mask both frameworks use in comparisons: kept entries 1 / (1 - rate), dropped
    0, drawn with NumPy from (seed, the layer's depth-first index, the draw number), in
    PyTorch's layout ``shape`` (batch, C, H, W) or (batch, features)."""
    keep = np.random.default_rng([seed, index, int(draw)]).random(shape) >= rate
    return (keep / (1.0 - rate)).astype(dtype)


class DropoutDraws(nnx.Variable):
    """How many masks a dropout layer has drawn: part of its state, checkpointed."""


class BatchNorm(nnx.Module):
    """BatchNorm over the last axis, PyTorch's conventions: ``momentum`` weighs the new batch,
    the running variance is unbiased. x: (batch, features) or (batch, H, W, C)."""

    # the torch layer this one ports: ``jaxnets verify``/``parity`` pair it with torch's
    # BatchNorm as they pair nnx.BatchNorm (torchref.verify.mapping.flax_kind)
    torch_kind = "batchnorm"

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((features,)))
        self.bias = nnx.Param(jnp.zeros((features,)))
        self.mean = nnx.BatchStat(jnp.zeros((features,)))
        self.var = nnx.BatchStat(jnp.ones((features,)))
        self.decay, self.eps = flax_momentum(momentum), eps

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        axes = tuple(range(x.ndim - 1))
        if train:
            mean = x.mean(axes)
            var = jnp.square(x - mean).mean(axes)
            count = int(np.prod([x.shape[a] for a in axes]))
            self.mean[...] = self.decay * self.mean[...] + (1 - self.decay) * mean
            self.var[...] = (self.decay * self.var[...]
                              + (1 - self.decay) * unbiased_variance(var, count))
        else:
            mean, var = self.mean[...], self.var[...]
        return (x - mean) / jnp.sqrt(var + self.eps) * self.scale[...] + self.bias[...]


class Dropout(nnx.Module):
    """Dropout whose masks are a function of (seed, layer index, draw number): ``"shared"``
    draws them with NumPy (:func:`dropout_mask`, the masks torchref uses, so comparisons are
    exact), ``"jax"`` with ``jax.random`` on the device (faster, other masks)."""

    def __init__(self, rate: float, seed: int, index: int, masks: str = "shared"):
        self.rate, self.seed, self.index, self.masks = rate, seed, index, masks
        self.draws = DropoutDraws(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        draw = self.draws[...]
        self.draws[...] = draw + 1
        if self.masks == "jax":
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), self.index),
                                     draw)
            keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
            return jnp.where(keep, x / (1.0 - self.rate), 0.0)
        torch_shape = (x.shape[0], x.shape[-1], *x.shape[1:-1])  # NHWC -> NCHW
        to_nhwc = (0, *range(2, x.ndim), 1)

        def host_keep(d):  # a boolean mask: the callback's thread may not share x64 mode
            return dropout_mask(self.seed, self.index, d, torch_shape, self.rate,
                                np.float64).transpose(to_nhwc) > 0

        keep = jax.pure_callback(host_keep, jax.ShapeDtypeStruct(x.shape, jnp.bool_), draw)
        # 1 / (1 - rate) rounded once to x's dtype, as dropout_mask's values are
        return x * jnp.where(keep, jnp.asarray(1.0 / (1.0 - self.rate), x.dtype), 0)


class Residual(nnx.Module):
    """``branch(x) + x``, or ``branch(x) + projection(x)`` (a 1x1 conv / a linear) when the
    branch changes the shape."""

    def __init__(self, layer: Layer, settings: dict[str, Any], rngs: nnx.Rngs):
        self.branch = Sequential(layer.layers, settings, rngs=rngs)
        self.projection = _projection(layer, settings, rngs) if layer.projection else None

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        shortcut = x if self.projection is None else self.projection(x)
        return self.branch(x, train) + shortcut


class Conv(nnx.Conv):
    """``nnx.Conv`` (its parameters, names and defaults) that hands its bias to the
    convolution function where that function adds it itself (``jaxnets.conv.takes_bias``:
    "auto" and "onednn" add it inside oneDNN's primitive, which keeps the channel broadcast
    out of the next activation's XLA fusion; jaxnets.onednn.conv_onednn says why). Any other
    function, any padding given as a string, a mask, input dilation, a stride or dilation of
    None or an output sharding runs ``nnx.Conv`` unchanged."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        conv = self.conv_general_dilated
        explicit = isinstance(self.padding, tuple | list) and all(
            isinstance(p, tuple | list) for p in self.padding)
        given = (self.strides, self.kernel_dilation, self.input_dilation)
        plain = (self.mask is None and None not in given and pair(self.input_dilation) == (1, 1)
                 and self.preferred_element_type is None and out_sharding is None)
        if self.bias is None or inputs.ndim != 4 or not (explicit and plain and takes_bias(conv)):
            return super().__call__(inputs, out_sharding=out_sharding)
        inputs, kernel, bias = self.promote_dtype(
            (inputs, self.kernel[...], self.bias[...]), dtype=self.dtype)
        return conv(inputs, kernel, pair(self.strides), tuple(map(tuple, self.padding)),
                    rhs_dilation=pair(self.kernel_dilation), dimension_numbers=NHWC,
                    feature_group_count=self.feature_group_count, precision=self.precision,
                    bias=bias)


def _projection(layer: Layer, settings: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
    c_in, c_out = layer.in_shape[0], layer.out_shape[0]
    inits = linear_inits(settings["init"], c_in, settings["init_std"])
    if layer.projection["kind"] == "linear":
        return nnx.Linear(c_in, c_out, rngs=rngs, **_native_linear(settings), **inits)
    stride = layer.projection["stride"]
    return Conv(c_in, c_out, (1, 1), strides=(stride, stride), padding=((0, 0), (0, 0)),
                conv_general_dilated=conv_for(settings["conv"]), rngs=rngs, **inits)


MATMUL = (((1,), (0,)), ((), ()))  # (batch, in) x (in, out), nnx.Linear's dimension numbers


def uses_transposed_copy(in_features: int, out_features: int) -> bool:
    """Whether :func:`linear_dot_general` takes a layer's weight gradient through a transposed
    copy of its input: in features a multiple of 256 (the input's rows a multiple of 1 KB
    apart) and at most 32 out features. Measured on a 2-core EPYC (AVX-512), x.T @ g against
    the copy and a row-major dot inside a ``lax.scan``, us: batch 100, in 512, out 10: 153 /
    37 (the seed MLP's last layer); out 1: 114 / 14; out 32: 104 / 45; in 256, out 10: 45 /
    19; in 1024: 376 / 84; batch 256, in 512, out 10: 237 / 157; batch 3000, in 512, out 3:
    2425 / 883; one loss there, in 768, batch 256, out 1: 96 / 114. Elsewhere it won, lost or
    tied by shape: in 784, out 10 97 / 83 and out 32 55 / 93; in 500 (batch 256) 88 / 151;
    batch 3000, in 100 169 / 208; so only these take it."""
    return in_features % 256 == 0 and out_features <= 32


def _plain_weight_gradient(x, g, precision):
    return jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), precision=precision)  # x.T @ g


def _weight_gradient(x, g, precision):
    """x.T @ g, (in, out): XLA's dot with x transposed, or on the CPU for the shapes of
    :func:`uses_transposed_copy` a row-major dot on ``onednn.transposed_copy(x)``. Why: XLA
    folds ``x.T`` into the dot, and XLA:CPU's dot with a transposed operand is several times
    slower when that operand's rows are a multiple of 1 KB apart (the figures above); a
    custom call cannot be folded. Same products, summed in another order."""
    from jaxnets import onednn

    if not (x.dtype == jnp.float32 and uses_transposed_copy(x.shape[1], g.shape[1])
            and onednn.available()):
        return _plain_weight_gradient(x, g, precision)

    def on_cpu(x, g):
        return jax.lax.dot_general(onednn.transposed_copy(x), g, MATMUL, precision=precision)

    return jax.lax.platform_dependent(x, g, cpu=on_cpu,
                                      default=partial(_plain_weight_gradient,
                                                      precision=precision))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear_matmul(x, kernel, precision):
    return jax.lax.dot_general(x, kernel, MATMUL, precision=precision)


def _linear_matmul_forward(x, kernel, precision):
    return _linear_matmul(x, kernel, precision), (x, kernel)


def _linear_matmul_backward(precision, residuals, g):
    x, kernel = residuals
    dx = jax.lax.dot_general(g, kernel, (((1,), (1,)), ((), ())), precision=precision)
    return dx, _weight_gradient(x, g, precision)


_linear_matmul.defvjp(_linear_matmul_forward, _linear_matmul_backward)


def linear_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                       preferred_element_type=None, out_sharding=None) -> jax.Array:
    """``lax.dot_general`` for ``nnx.Linear`` (its ``dot_general=``): the same forward and
    input gradient as autodiff's, the weight gradient by :func:`_weight_gradient`. Anything
    but a plain (batch, in) x (in, out) product is ``lax.dot_general`` unchanged."""
    if (lhs.ndim != 2 or dimension_numbers != MATMUL or preferred_element_type is not None
            or out_sharding is not None):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type,
                                   out_sharding=out_sharding)
    return _linear_matmul(lhs, rhs, precision)


def _native_linear(settings: dict[str, Any]) -> dict[str, Any]:
    """``nnx.Linear``'s keyword for the builder's linear layers (and linear projections):
    ``model.conv = "auto"`` (the default: the native library where it is faster) gives them
    :func:`linear_dot_general`; any other setting, "auto_sharded" (a batch split over
    devices, which XLA cannot partition through an FFI call) included, keeps XLA's dot for
    every pass."""
    return {"dot_general": linear_dot_general} if settings["conv"] == "auto" else {}


def _linear(layer: Layer, settings: dict[str, Any], rngs: nnx.Rngs) -> nnx.Linear:
    fan_in = layer.in_shape[0]
    return nnx.Linear(fan_in, layer.options["out"], use_bias=layer.options["bias"], rngs=rngs,
                      **_native_linear(settings),
                      **linear_inits(settings["init"], fan_in, settings["init_std"]))


def _conv(layer: Layer, settings: dict[str, Any], rngs: nnx.Rngs) -> Conv:
    o, c_in = layer.options, layer.in_shape[0]
    fan_in = c_in // o["groups"] * o["kernel"][0] * o["kernel"][1]
    return Conv(c_in, o["out"], o["kernel"], strides=o["stride"],
                padding=conv_pads(layer, layer.in_shape), kernel_dilation=o["dilation"],
                feature_group_count=o["groups"], use_bias=o["bias"],
                conv_general_dilated=conv_for(settings["conv"]), rngs=rngs,
                **linear_inits(settings["init"], fan_in, settings["init_std"]))


def _pool(pool: Callable, layer: Layer) -> Callable:
    return partial(pool, **pool_options(layer))


def _global_avgpool(x: jax.Array) -> jax.Array:
    """(batch, H, W, C) -> (batch, C)."""
    return x.mean(axis=(1, 2))


# layer type -> (layer, settings, rngs) -> a module (STATEFUL types) or a function of x
BUILDERS: dict[str, Callable[[Layer, dict, nnx.Rngs], Any]] = {
    "linear": _linear,
    "conv2d": _conv,
    "batchnorm": lambda layer, s, rngs: BatchNorm(layer.in_shape[0], **{
        "momentum": layer.options["momentum"], "eps": layer.options["eps"]}),
    "layernorm": lambda layer, s, rngs: nnx.LayerNorm(
        layer.in_shape[0], epsilon=layernorm_epsilon(layer.options["eps"]), rngs=rngs),
    "dropout": lambda layer, s, rngs: Dropout(layer.options["rate"], s["seed"], layer.index,
                                              s["dropout_masks"]),
    "residual": lambda layer, s, rngs: Residual(layer, s, rngs),
    "flatten": lambda layer, s, rngs: flatten,
    "relu": lambda layer, s, rngs: jax.nn.relu,
    "tanh": lambda layer, s, rngs: jnp.tanh,
    "sigmoid": lambda layer, s, rngs: sigmoid,
    "silu": lambda layer, s, rngs: silu,
    "gelu": lambda layer, s, rngs: partial(gelu, approximate=layer.options["approximate"]),
    "leaky_relu": lambda layer, s, rngs: partial(jax.nn.leaky_relu,
                                                 negative_slope=layer.options["slope"]),
    "softmax": lambda layer, s, rngs: partial(jax.nn.softmax, axis=-1),
    "log_softmax": lambda layer, s, rngs: partial(jax.nn.log_softmax, axis=-1),
    "maxpool": lambda layer, s, rngs: _pool(max_pool, layer),
    "avgpool": lambda layer, s, rngs: _pool(avg_pool, layer),
    "global_avgpool": lambda layer, s, rngs: _global_avgpool,
}
TAKES_MODE = ("batchnorm", "dropout", "residual")
assert set(BUILDERS) == set(LAYER_KEYS)


class Sequential(nnx.Module):
    """The network a list of :class:`jaxnets.spec.Layer` describes. Modules are attributes
    named as their layers (``conv1``; ``layers.0`` lives in the list ``layers``), so weights
    convert by name. ``settings``: init, init_std, conv, seed, dropout_masks."""

    def __init__(self, layers: list[Layer], settings: dict[str, Any], *, rngs: nnx.Rngs):
        steps = []
        for layer in layers:
            built = BUILDERS[layer.type](layer, settings, rngs)
            if layer.type in STATEFUL:
                prefix, _, number = layer.name.partition(".")
                if number:
                    if not hasattr(self, prefix):
                        setattr(self, prefix, nnx.List([]))
                    getattr(self, prefix).append(built)
                else:
                    setattr(self, prefix, built)
                built = None
            steps.append((layer.name, layer.type in TAKES_MODE, built))
        self.layer_steps = tuple(steps)

    def module(self, name: str) -> nnx.Module:
        prefix, _, number = name.partition(".")
        return getattr(self, prefix)[int(number)] if number else getattr(self, prefix)

    def steps(self) -> list[tuple[str, Callable]]:
        """(name, module or function) in order."""
        return [(name, self.module(name) if fn is None else fn)
                for name, _, fn in self.layer_steps]

    def forward_layers(self, x: jax.Array, train: bool = False) -> list[tuple[str, jax.Array]]:
        """Every layer's output, in order: ``[("conv1", (batch, 28, 28, 6)), ...]``."""
        outputs = []
        for name, takes_mode, fn in self.layer_steps:
            step = self.module(name) if fn is None else fn
            x = step(x, train) if takes_mode else step(x)
            outputs.append((name, x))
        return outputs

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.forward_layers(x, train)[-1][1]
