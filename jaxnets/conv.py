"""A CPU convolution path: the convolution, and both of its gradients, as matmuls.

XLA:CPU runs ``lax.conv``'s forward well but its gradients slowly for the seed networks'
small convolutions (jax issues 23713, 26145). Here a stride-1 convolution builds its patches
from shifted slices (im2col, (N, H, W, kh*kw*C) in the kernel's HWIO order) and multiplies
once; a custom VJP gives the kernel gradient as patches^T @ dy and the input gradient as
dy @ kernel^T scattered back by padded shifts (col2im), so no convolution is differentiated.

Measured on a 2-core x86-64 CPU: one layer's forward + backward (batch 64-100) runs 1.7-2.6x
faster than ``lax.conv`` for 1-10 input channels and 2.5x slower for SimpleNet's 20->20 5x5
when each step is its own jitted call; but inside the epoch's ``lax.scan`` XLA:CPU runs
``lax.conv`` some 10x slower than outside it (SimpleNet training: 318 samples/s in the scan,
3,429 per-step), while this path keeps its speed (2,434 in the scan). Training runs in the
scan, so ``"auto"`` uses this path for every convolution on the CPU. Numerically it equals
``lax.conv`` within float32 rounding (parity tests).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _patches(x_padded: jax.Array, kh: int, kw: int) -> jax.Array:
    """(N, Hp, Wp, C) -> (N, H, W, kh*kw*C), column order (i, j, c) = HWIO's (kh, kw, in)."""
    n, hp, wp, c = x_padded.shape
    h, w = hp - kh + 1, wp - kw + 1
    shifted = [x_padded[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)]
    return jnp.stack(shifted, axis=3).reshape(n, h, w, kh * kw * c)


def _pad(x: jax.Array, padding: tuple[tuple[int, int], ...]) -> jax.Array:
    return jnp.pad(x, ((0, 0), *padding, (0, 0)))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_im2col(x: jax.Array, kernel: jax.Array,
                  padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Stride-1 convolution. x: (N, H, W, C) NHWC, kernel: (kh, kw, C, O) HWIO,
    padding: ((top, bottom), (left, right)) -> (N, H', W', O)."""
    return _forward(x, kernel, padding)[0]


def _forward(x, kernel, padding):
    kh, kw, c, o = kernel.shape
    cols = _patches(_pad(x, padding), kh, kw)
    n, h, w, _ = cols.shape
    y = (cols.reshape(-1, kh * kw * c) @ kernel.reshape(-1, o)).reshape(n, h, w, o)
    return y, (cols, kernel, x.shape)


def _backward(padding, residuals, dy):
    cols, kernel, x_shape = residuals
    kh, kw, c, o = kernel.shape
    n, h, w, _ = dy.shape
    dy2 = dy.reshape(-1, o)
    d_kernel = (cols.reshape(-1, kh * kw * c).T @ dy2).reshape(kernel.shape)
    d_cols = (dy2 @ kernel.reshape(-1, o).T).reshape(n, h, w, kh, kw, c)
    hp, wp = x_shape[1] + sum(padding[0]), x_shape[2] + sum(padding[1])
    # col2im: every kernel offset (i, j) sends its slice of the patch gradient back to the
    # input positions it was read from
    d_padded = sum(jnp.pad(d_cols[:, :, :, i, j, :], ((0, 0), (i, hp - h - i),
                                                      (j, wp - w - j), (0, 0)))
                   for i in range(kh) for j in range(kw))
    (top, _), (left, _) = padding
    return d_padded[:, top:top + x_shape[1], left:left + x_shape[2], :], d_kernel


conv2d_im2col.defvjp(_forward, _backward)


def conv_general_dilated_im2col(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                rhs_dilation=None, dimension_numbers=None,
                                feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated``'s signature (what ``nnx.Conv`` calls), routed through
    :func:`conv2d_im2col` for the cases it covers (2-D, NHWC/HWIO, stride 1, explicit padding,
    no dilation, no groups) and to ``lax`` otherwise."""
    simple = (tuple(window_strides) == (1, 1) and not isinstance(padding, str)
              and all(d in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation))
              and feature_group_count == 1 and lhs.ndim == 4)
    if not simple:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs)
    return conv2d_im2col(lhs, rhs, tuple(tuple(int(v) for v in p) for p in padding))


def use_im2col(impl: str) -> bool:
    """``model.conv``: "lax", "im2col", or "auto" (im2col on the CPU, lax elsewhere)."""
    if impl == "auto":
        return jax.default_backend() == "cpu"
    return impl == "im2col"


def conv_for(impl: str):
    """The function ``nnx.Conv`` gets as ``conv_general_dilated=`` for ``model.conv``."""
    return conv_general_dilated_im2col if use_im2col(impl) else jax.lax.conv_general_dilated


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
