"""Initialisation schemes, in JAX, selectable per config (``model.init``).

``"flax"``: Flax's default, lecun_normal kernels and zero biases.
``"torch"``: PyTorch's default reimplemented in JAX, so a JAX-only user gets the reference's
distribution without installing torch: ``nn.Linear``/``nn.Conv2d`` draw weights from
kaiming_uniform(a=sqrt(5)), which is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and biases from the
same interval. Same law, not the same numbers: for identical numbers, convert torch's weights.
``"normal"``: d2l's explicit init, weights N(0, init_std^2); d2l's ``init_weights`` leaves the
biases alone, so they keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

INIT_SCHEMES = ("torch", "flax", "normal")


def torch_default_bias(fan_in: int):
    """PyTorch's bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def linear_inits(scheme: str, fan_in: int, init_std: float = 0.01) -> dict:
    """``kernel_init`` and ``bias_init`` for ``nnx.Linear``/``nnx.Conv``; ``fan_in`` is
    in_features for a Linear, in_channels * kh * kw for a Conv."""
    if scheme == "flax":
        return {"kernel_init": nnx.initializers.lecun_normal(), "bias_init": nnx.initializers.zeros}
    if scheme == "torch":
        # kaiming_uniform(a=sqrt(5)): gain^2 = 2 / (1 + 5) = 1/3, bound = sqrt(3 * gain^2 / fan_in)
        # = 1/sqrt(fan_in); variance_scaling(1/3, fan_in, uniform) has exactly that bound.
        return {
            "kernel_init": nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
            "bias_init": torch_default_bias(fan_in),
        }
    if scheme == "normal":
        return {"kernel_init": nnx.initializers.normal(init_std),
                "bias_init": torch_default_bias(fan_in)}
    raise ValueError(f"unknown init scheme {scheme!r}; choose one of {INIT_SCHEMES}")
