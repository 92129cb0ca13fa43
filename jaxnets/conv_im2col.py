"""The im2col convolution: a stride-1 convolution and both of its gradients as matmuls.

Patches from shifted slices (im2col, (N, H, W, kh*kw*C) in the kernel's HWIO order) times the
kernel; a custom VJP gives the kernel gradient as patches^T @ dy and the input gradient as
dy @ kernel^T scattered back by padded shifts (col2im). It was the CPU training path before
``jaxnets.conv.conv_canonical``; ``model.conv = "im2col"`` keeps it selectable for comparison.
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
