"""The convolution path: which convolution each ``nnx.Conv`` runs, chosen per platform.

``conv_for(model.conv)`` is the one entry point (``lax.conv_general_dilated``'s signature,
passed to ``nnx.Conv``):

- ``"lax"``: ``lax.conv_general_dilated`` and its autodiff.
- ``"canonical"``: :func:`conv_canonical`, the same forward with a custom VJP whose two
  backward passes are themselves canonical convolutions (below).
- ``"im2col"``: :func:`conv2d_im2col` (patches and one matmul; stride 1 only).
- ``"onednn"``: :func:`jaxnets.onednn.conv_onednn` (oneDNN through XLA FFI: float32, one
  group), the canonical path for the rest.
- ``"auto"``: on the CPU oneDNN where it is built and covers the convolution, else
  :func:`conv_canonical` (and canonical throughout for a batch split over several devices:
  :func:`sharded_conv`); ``lax`` elsewhere, decided by
  ``jax.lax.platform_dependent`` when the computation is lowered for its device, not when
  the model is built (a model built while the default backend was a GPU still runs the
  CPU path when its inputs live on the CPU).

Why the canonical VJP. XLA:CPU runs a convolution through Eigen only in canonical form
(NHWC input, HWIO kernel, NHWC output: ``dim_labels=b01f_01io->b01f``, float32/16, no
window reversal); any other convolution falls back to a naive loop nest ("Falling back to
unoptimized convolution" with ``TF_CPP_VMODULE=thunk_emitter=2``). In a per-step ``jit``
XLA rewrites ``lax.conv``'s gradient convolutions (``b01f_01oi->b01f`` and
``f01b_i01o->01bf``) into canonical form, but inside the epoch's ``lax.scan`` body it does
not, and training collapses (SimpleNet 20->20 5x5, batch 100: 154 ms a step against 6.7 ms
written canonically; docs/xla-conv-fallback.md, bench/xla_conv_fallback.py). Writing both
gradients as canonical convolutions of explicitly transposed operands gives the same
numbers as ``lax.conv``'s autodiff (parity_tests/test_conv_path.py checks every bit) and
keeps every convolution of the scanned epoch on Eigen.

Why not im2col for "auto". Measured interleaved in one process (``python
bench/xla_conv_fallback.py --compare``, 2-core x86-64, a shared and so noisy machine: the
ratios are indicative), one training step inside the scan, canonical against im2col:
LeNet's conv2 29 against 37 ms, SimpleNet's conv2 83 against 206, ConvNet's conv2 19 against
22; the forward alone (inference) 3.1 against 7.8, 28 against 229, 7.7 against 8.1 ms. For
one input channel (the first layers) im2col's training step was faster (6.3 against 13.1,
45 against 64, 15 against 26 ms) because of its kernel gradient, so "auto" takes that
layer's kernel gradient as a matmul (:func:`_kernel_gradient_matmul`) and keeps the
canonical forward and input gradient: inference (the forward alone) is ``lax.conv``'s own
forward everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from jaxnets.conv_im2col import conv2d_im2col, conv_general_dilated_im2col
from jaxnets.errors import JaxnetsError

__all__ = ["IMPLEMENTATIONS", "add_bias", "conv2d_im2col", "conv_canonical", "conv_for",
           "max_pool_2x2", "takes_bias"]

IMPLEMENTATIONS = ("auto", "lax", "canonical", "im2col", "onednn")
NHWC = ("NHWC", "HWIO", "NHWC")  # the canonical dimension numbers, the only Eigen takes
Pairs = tuple[tuple[int, int], ...]


def _conv(x, kernel, strides, padding, lhs_dilation=None, rhs_dilation=None, groups=1,
          precision=None):
    """One canonical convolution: x (N, H, W, C), kernel (kh, kw, C/groups, O)."""
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=NHWC, feature_group_count=groups, precision=precision)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def conv_canonical(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                   padding: Pairs, dilation: tuple[int, ...], groups: int,
                   precision: jax.lax.PrecisionLike = None,
                   kernel_gradient: str = "conv") -> jax.Array:
    """``lax.conv_general_dilated`` in NHWC/HWIO with explicit ``padding`` pairs, whose
    gradients are canonical convolutions too. x: (N, H, W, C), kernel: (kh, kw, C/groups, O)
    -> (N, H', W', O). ``kernel_gradient="matmul"``: the kernel gradient as one patches^T @ dy
    matmul instead (:func:`_kernel_gradient_matmul`, for one input channel)."""
    return _conv(x, kernel, strides, padding, rhs_dilation=dilation, groups=groups,
                 precision=precision)


def _canonical_forward(x, kernel, strides, padding, dilation, groups, precision,
                       kernel_gradient):
    y = conv_canonical(x, kernel, strides, padding, dilation, groups, precision,
                       kernel_gradient)
    return y, (x, kernel)


def _input_gradient(dy, kernel, x_shape, strides, padding, dilation, groups, precision):
    """dx (N, H, W, C): dy dilated by the stride, padded by (k-1-p) (k the dilated kernel
    extent, plus the rows the strided windows never reached at the high end), convolved
    with the kernel flipped in space and its in/out features swapped (per group)."""
    kh_kw = kernel.shape[:-2]
    c_group, out = kernel.shape[-2:]
    flipped = jnp.flip(kernel, axis=tuple(range(len(kh_kw))))
    # (kh, kw, C/g, g, O/g) -> (kh, kw, O/g, g, C/g): swap in/out within each group
    flipped = flipped.reshape(*kh_kw, c_group, groups, out // groups)
    flipped = jnp.swapaxes(flipped, -3, -1).reshape(*kh_kw, out // groups, groups * c_group)
    pads = []
    for size, k, s, d, (lo, hi) in zip(x_shape[1:-1], kh_kw, strides, dilation, padding,
                                       strict=True):
        extent = (k - 1) * d + 1
        missed = (size + lo + hi - extent) % s
        pads.append((extent - 1 - lo, extent - 1 - hi + missed))
    return _conv(dy, flipped, (1,) * len(kh_kw), pads, lhs_dilation=strides,
                 rhs_dilation=dilation, groups=groups, precision=precision)


def _read_padding(x, dy, kernel_shape, strides, padding, dilation) -> list[tuple[int, int]]:
    """The padding the forward's windows actually read: the high side trimmed to the rows
    the last strided window reaches."""
    return [(lo, (k - 1) * d + (size_out - 1) * s + 1 - size - lo)
            for size, size_out, k, s, d, (lo, _) in zip(
                x.shape[1:-1], dy.shape[1:-1], kernel_shape[:-2], strides, dilation, padding,
                strict=True)]


def _kernel_gradient(x, dy, kernel_shape, strides, padding, dilation, groups, precision):
    """d kernel (kh, kw, C/g, O): x transposed to (C, H, W, N) as the batch, convolved with
    dy transposed to (H', W', N, O) as the kernel (the stride becomes the kernel's dilation,
    the dilation the window stride), transposed back; one convolution per group."""
    spatial = len(kernel_shape) - 2
    c_group, out = kernel_shape[-2:]
    pads = _read_padding(x, dy, kernel_shape, strides, padding, dilation)
    to_batch = (x.ndim - 1, *range(1, x.ndim - 1), 0)       # (N, H, W, C) -> (C, H, W, N)
    to_kernel = (*range(1, dy.ndim - 1), 0, dy.ndim - 1)    # (N, H', W', O) -> (H', W', N, O)
    back = (*range(1, spatial + 1), 0, spatial + 1)          # (C, kh, kw, O) -> (kh, kw, C, O)
    # One convolution per group: lax's own grouped kernel gradient (batch_group_count) is
    # rewritten by XLA into a 3-D, non-canonical convolution that always falls back.
    o_group = out // groups
    per_group = [
        jnp.transpose(_conv(jnp.transpose(x[..., g * c_group:(g + 1) * c_group], to_batch),
                            jnp.transpose(dy[..., g * o_group:(g + 1) * o_group], to_kernel),
                            dilation, pads, rhs_dilation=strides, precision=precision), back)
        for g in range(groups)]
    return per_group[0] if groups == 1 else jnp.concatenate(per_group, axis=-1)


def _kernel_gradient_matmul(x, dy, kernel_shape, strides, padding, dilation, precision):
    """d kernel (kh, kw, C, O) = patches^T @ dy, the patches (N*H'*W', kh*kw*C) read from x
    padded, at the forward's strides and dilation. For one input channel (a first layer)
    the canonical kernel gradient is a convolution with a batch of 1 and a (H', W') kernel
    that Eigen parallelises poorly: measured in the scanned training step (2-core x86-64,
    interleaved, bench/xla_conv_fallback.py --compare) this matmul took 0.5-0.7x its time
    for LeNet's, SimpleNet's and ConvNet's first convolutions."""
    kh, kw, c, o = kernel_shape
    (s_h, s_w), (d_h, d_w) = strides, dilation
    _, h_out, w_out, _ = dy.shape
    pads = _read_padding(x, dy, kernel_shape, strides, padding, dilation)
    padded = jax.lax.pad(x, jnp.zeros((), x.dtype),
                         [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)])
    patches = jnp.stack([padded[:, i * d_h:i * d_h + (h_out - 1) * s_h + 1:s_h,
                                j * d_w:j * d_w + (w_out - 1) * s_w + 1:s_w, :]
                         for i in range(kh) for j in range(kw)], axis=3)
    dk = jnp.matmul(patches.reshape(-1, kh * kw * c).T, dy.reshape(-1, o),
                    precision=precision)
    return dk.reshape(kernel_shape)


def _canonical_backward(strides, padding, dilation, groups, precision, kernel_gradient,
                        residuals, dy):
    x, kernel = residuals
    dx = _input_gradient(dy, kernel, x.shape, strides, padding, dilation, groups, precision)
    if kernel_gradient == "matmul":
        dk = _kernel_gradient_matmul(x, dy, kernel.shape, strides, padding, dilation,
                                     precision)
    else:
        dk = _kernel_gradient(x, dy, kernel.shape, strides, padding, dilation, groups,
                              precision)
    return dx, dk


conv_canonical.defvjp(_canonical_forward, _canonical_backward)


def _explicit_padding(padding, x_shape, kernel_shape, strides, dilation) -> Pairs:
    """"SAME"/"VALID"/pairs -> pairs, as ``lax`` resolves them."""
    if isinstance(padding, str):
        extents = [(k - 1) * d + 1 for k, d in zip(kernel_shape[:-2], dilation, strict=True)]
        padding = jax.lax.padtype_to_pads(x_shape[1:-1], extents, strides, padding)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, jax.lax.ConvDimensionNumbers):
        return dimension_numbers == jax.lax.conv_dimension_numbers(
            (1, 1, 1, 1), (1, 1, 1, 1), NHWC)
    return tuple(dimension_numbers) == NHWC


def _routable(lhs, dimension_numbers, lhs_dilation, batch_group_count,
              preferred_element_type, out_sharding) -> bool:
    """A 2-D NHWC/HWIO convolution without input dilation or batch groups: what
    ``nnx.Conv`` asks for, and what the canonical and oneDNN paths cover."""
    spatial = lhs.ndim - 2
    return (spatial == 2 and _is_nhwc(dimension_numbers) and batch_group_count == 1
            and all(d == 1 for d in (lhs_dilation or (1,) * spatial))
            and preferred_element_type is None and out_sharding is None)


def _lax(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
         preferred_element_type=None, out_sharding=None, **_) -> jax.Array:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type,
        out_sharding=out_sharding)


def conv_general_dilated_canonical(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                   rhs_dilation=None, dimension_numbers=None,
                                   feature_group_count=1, batch_group_count=1, precision=None,
                                   preferred_element_type=None, out_sharding=None,
                                   kernel_gradient: str = "conv") -> jax.Array:
    """``lax.conv_general_dilated``'s signature routed through :func:`conv_canonical` for
    every 2-D NHWC/HWIO convolution (what ``nnx.Conv`` asks for: any kernel, stride,
    padding, dilation and groups); anything else (input dilation, batch groups, other
    layouts or ranks) goes to ``lax`` unchanged."""
    if not _routable(lhs, dimension_numbers, lhs_dilation, batch_group_count,
                     preferred_element_type, out_sharding):
        return _lax(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count, batch_group_count, precision,
                    preferred_element_type, out_sharding)
    dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
    strides = tuple(int(s) for s in window_strides)
    pads = _explicit_padding(padding, lhs.shape, rhs.shape, strides, dilation)
    return conv_canonical(lhs, rhs, strides, pads, dilation, int(feature_group_count),
                          precision, kernel_gradient)


def _onednn_covers(lhs, rhs, dimension_numbers=None, lhs_dilation=None,
                   feature_group_count=1, batch_group_count=1, precision=None,
                   preferred_element_type=None, out_sharding=None, **_) -> bool:
    """float32, one group, default precision, on top of :func:`_routable` (oneDNN has no
    float64 convolution; float64 stays on the canonical path, bit-equal to lax)."""
    return (lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
            and feature_group_count == 1 and precision is None
            and _routable(lhs, dimension_numbers, lhs_dilation, batch_group_count,
                          preferred_element_type, out_sharding))


def add_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``y + bias`` along the last (channel) axis, as ``nnx.Conv`` adds it; y when None."""
    return y if bias is None else y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)


def conv_general_dilated_onednn(lhs, rhs, window_strides, padding, bias=None,
                                **kwargs) -> jax.Array:
    """``lax.conv_general_dilated``'s signature through :func:`jaxnets.onednn.conv_onednn`
    where oneDNN covers the convolution; the canonical path elsewhere. ``bias``: added inside
    oneDNN's primitive (jaxnets.onednn.conv_onednn says why), by :func:`add_bias` elsewhere."""
    from jaxnets import onednn

    if not _onednn_covers(lhs, rhs, **kwargs):
        return add_bias(conv_general_dilated_canonical(lhs, rhs, window_strides, padding,
                                                       **kwargs), bias)
    dilation = tuple(int(d) for d in (kwargs.get("rhs_dilation") or (1, 1)))
    strides = tuple(int(s) for s in window_strides)
    pads = _explicit_padding(padding, lhs.shape, rhs.shape, strides, dilation)
    return onednn.conv_onednn(lhs, rhs, bias, strides, pads, dilation)


def _conv_auto(*args, bias=None, use_onednn: bool = True, **kwargs) -> jax.Array:
    """On the CPU: oneDNN where it is built and covers the convolution (float32, one
    group) and ``use_onednn``, else the canonical path; ``lax`` on every other platform,
    picked when the computation is lowered for the device it runs on. ``bias`` as in
    :func:`conv_general_dilated_onednn`."""
    from jaxnets import onednn

    def on_cpu(lhs, rhs, bias):
        if use_onednn and onednn.available() and _onednn_covers(lhs, rhs, **kwargs):
            return conv_general_dilated_onednn(lhs, rhs, *args[2:], bias=bias, **kwargs)
        # one input channel: the kernel gradient as a matmul (_kernel_gradient_matmul)
        thin = rhs.shape[-2] == 1 and kwargs.get("feature_group_count", 1) == 1
        return add_bias(conv_general_dilated_canonical(
            lhs, rhs, *args[2:], **kwargs, kernel_gradient="matmul" if thin else "conv"), bias)

    def elsewhere(lhs, rhs, bias):
        return add_bias(jax.lax.conv_general_dilated(lhs, rhs, *args[2:], **kwargs), bias)

    return jax.lax.platform_dependent(args[0], args[1], bias, cpu=on_cpu, default=elsewhere)


def takes_bias(conv: Callable[..., jax.Array]) -> bool:
    """Whether a ``conv_for`` function adds a ``bias=`` itself (:class:`jaxnets.layers.Conv`
    hands it over; the others leave it to ``nnx.Conv``'s own add). A ``functools.partial``
    takes it as the function it wraps does."""
    return getattr(getattr(conv, "func", conv), "takes_bias", False)


conv_general_dilated_onednn.takes_bias = True
_conv_auto.takes_bias = True


_BY_NAME: dict[str, Callable[..., jax.Array]] = {
    "lax": jax.lax.conv_general_dilated,
    "canonical": conv_general_dilated_canonical,
    "im2col": conv_general_dilated_im2col,
    "onednn": conv_general_dilated_onednn,
    "auto": _conv_auto,
    # what "auto" becomes for a batch split over several devices (sharded_conv)
    "auto_sharded": partial(_conv_auto, use_onednn=False),
}


def sharded_conv(impl: str, devices: int) -> str:
    """``model.conv`` for a model whose batch is split over ``devices`` devices. XLA's SPMD
    partitioner cannot split the oneDNN FFI calls: it all-gathers the batch and runs each
    whole on every device (a 2-device mesh: one all-gather per call, against the canonical
    path's one all-reduce of the kernel gradient; parity_tests/test_onednn.py), so "auto"
    keeps the canonical path there. Any other setting is the user's choice and stays."""
    return "auto_sharded" if impl == "auto" and devices > 1 else impl


def conv_for(impl: str) -> Callable[..., jax.Array]:
    """``model.conv`` -> the function ``nnx.Conv`` calls as ``conv_general_dilated``
    (``lax.conv_general_dilated``'s signature): one of IMPLEMENTATIONS."""
    if impl not in _BY_NAME:
        raise ValueError(f"model.conv {impl!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    if impl == "onednn":
        from jaxnets import onednn

        if onednn.unavailable_reason() is not None:
            # a setup problem, not a bad value: exit 1 with the way to build it
            raise JaxnetsError(f"model.conv 'onednn': {onednn.unavailable_reason()}")
    return _BY_NAME[impl]


def _windows(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, H/2, W/2, C, 4): each 2x2 window, in row-major order."""
    n, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :]
    x = x.reshape(n, h // 2, 2, w // 2, 2, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, c, 4)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, NHWC, whose gradient goes to the *first* maximum of each window
    in row-major order, exactly as PyTorch's CPU kernel and ``lax.reduce_window``'s gradient
    route ties (parity_tests/test_ops.py). XLA:CPU's select-and-scatter gradient was the
    slowest piece of the CNN steps (38 ms of SimpleNet's 73 ms); this one is a one-hot mask."""
    return _windows(x).max(axis=-1)


def _pool_forward(x):
    windows = _windows(x)
    return windows.max(axis=-1), (jnp.argmax(windows, axis=-1), x.shape)


def _pool_backward(residuals, dy):
    first_max, (n, h, w, c) = residuals
    routed = jax.nn.one_hot(first_max, 4, dtype=dy.dtype) * dy[..., None]
    dx = routed.reshape(n, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    dx = dx.reshape(n, h - h % 2, w - w % 2, c)
    return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_pool_forward, _pool_backward)
