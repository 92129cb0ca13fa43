"""Max and average pooling with PyTorch's options (kernel, stride, padding, ceil_mode,
count_include_pad) on NHWC arrays, through ``lax.reduce_window``. The 2x2 stride-2 max-pool
goes through ``jaxnets.conv.max_pool_2x2`` (same values and tie routing, a faster gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxnets.conv import max_pool_2x2
from jaxnets.spec import pool_output_size


def ceil_mode_pads(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool
                   ) -> tuple[int, int]:
    # Framework difference: PyTorch's ceil_mode adds windows at the end; Flax has none, so the
    # right side gets the extra padding those windows read (never counted as input).
    out = pool_output_size(size, kernel, stride, padding, ceil_mode)
    extra = max((out - 1) * stride + kernel - (size + 2 * padding), 0)
    return padding, padding + extra


def _window_args(x, kernel, stride, padding, ceil_mode):
    pads = [ceil_mode_pads(x.shape[1 + i], kernel[i], stride[i], padding[i], ceil_mode)
            for i in range(2)]
    return (1, *kernel, 1), (1, *stride, 1), ((0, 0), *pads, (0, 0))


def max_pool(x: jax.Array, kernel: tuple[int, int], stride: tuple[int, int],
             padding: tuple[int, int] = (0, 0), ceil_mode: bool = False) -> jax.Array:
    """x: (N, H, W, C) -> (N, H', W', C), H' from :func:`jaxnets.spec.pool_output_size`."""
    if kernel == (2, 2) and stride == (2, 2) and padding == (0, 0) and not ceil_mode:
        return max_pool_2x2(x)
    window, strides, pads = _window_args(x, kernel, stride, padding, ceil_mode)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, pads)


def avg_pool_divisor(shape: tuple[int, int], kernel, stride, padding, ceil_mode: bool,
                     count_include_pad: bool, dtype=jnp.float32) -> jax.Array:
    # Framework difference: PyTorch divides by the window's cells inside the padded input
    # (count_include_pad=True) or inside the input (False), never by the cells that ceil_mode's
    # extra windows read past the padding; a naive port divides every window by kh * kw.
    (ph, pw), size = padding, shape
    ones = jnp.ones(size, dtype)
    if count_include_pad:
        ones, padding = jnp.pad(ones, ((ph, ph), (pw, pw)), constant_values=1), (0, 0)
        size = ones.shape
    pads = [ceil_mode_pads(shape[i], kernel[i], stride[i], (ph, pw)[i], ceil_mode)
            for i in range(2)]
    if count_include_pad:  # the padding is already in ``ones``: only the extra stays
        pads = [(0, hi - lo) for lo, hi in pads]
    return jax.lax.reduce_window(ones, 0.0, jax.lax.add, kernel, stride, pads)


def avg_pool(x: jax.Array, kernel: tuple[int, int], stride: tuple[int, int],
             padding: tuple[int, int] = (0, 0), ceil_mode: bool = False,
             count_include_pad: bool = True) -> jax.Array:
    """x: (N, H, W, C) -> (N, H', W', C): window sums over :func:`avg_pool_divisor`."""
    window, strides, pads = _window_args(x, kernel, stride, padding, ceil_mode)
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
    divisor = avg_pool_divisor(x.shape[1:3], kernel, stride, padding, ceil_mode,
                               count_include_pad, x.dtype)
    return sums / divisor[None, :, :, None]
