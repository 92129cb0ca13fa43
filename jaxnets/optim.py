"""PyTorch's optimizers as Optax transformations, one named function per ``torch.optim`` setup.

Each function returns the transformation whose update is, in exact arithmetic, the one
``torch.optim.SGD`` / ``Adam`` / ``AdamW`` makes with torch's defaults (betas 0.9 / 0.999,
eps 1e-8, dampening 0, no amsgrad). Where the two libraries order the floating point
operations differently, the comment says so; ``parity_tests/test_optimizers.py`` holds the two
within 1e-12 in float64 after every one of 20 steps. ``make_optimizer`` picks one from a
config's ``[optimizer]`` table; ``torchref.optim.make_optimizer`` is its PyTorch twin.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

# torch.optim's defaults (Adam and AdamW share them).
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def _coupled_decay(weight_decay: float, tx: optax.GradientTransformation
                   ) -> optax.GradientTransformation:
    """torch's coupled weight decay: ``grad + weight_decay * param`` before the optimizer (the
    same two operations as torch's ``grad.add(param, alpha=weight_decay)``), skipped at 0 as
    torch skips it."""
    return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx


def sgd(lr: float, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """torch.optim.SGD(lr, weight_decay): ``p -= lr * (g + wd * p)``."""
    # Optax's sgd is a -lr scaling that apply_updates adds; torch adds with add_(g, alpha=-lr).
    # FP order: torch's CPU add_(alpha) is one fused multiply-add (as measured on x86); jitted
    # XLA fuses p + (-lr) * g the same way (bitwise equal), eager JAX rounds the product first.
    return _coupled_decay(weight_decay, optax.sgd(lr))


def sgd_momentum(lr: float, momentum: float, weight_decay: float = 0.0
                 ) -> optax.GradientTransformation:
    """torch.optim.SGD(lr, momentum, weight_decay): ``b = momentum * b + g; p -= lr * b``."""
    # torch's buffer starts as a copy of g, optax.trace at zeros: g + momentum * 0 is that g.
    # FP order: torch rounds momentum * b before adding g; jitted XLA fuses it into an FMA.
    return _coupled_decay(weight_decay, optax.sgd(lr, momentum=momentum))


def sgd_nesterov(lr: float, momentum: float, weight_decay: float = 0.0
                 ) -> optax.GradientTransformation:
    """torch.optim.SGD(lr, momentum, nesterov=True): ``p -= lr * (g + momentum * b)``, b the
    buffer just updated."""
    # Both use torch's form, g + momentum * (new buffer), not a look-ahead parameter.
    # FP order: as in sgd_momentum.
    if momentum <= 0:
        raise ValueError("Nesterov momentum requires a momentum > 0 (as torch.optim.SGD)")
    return _coupled_decay(weight_decay, optax.sgd(lr, momentum=momentum, nesterov=True))


def adam_bias_correction(decay: float, count: jax.Array) -> jax.Array:
    """``1 - decay**count`` to the precision of the run's float dtype, as torch.optim.Adam has
    it from Python double. count: a scalar integer array (Optax's step count)."""
    # Framework difference: Optax's 1 - b**t rounds b to float32 (1 - 0.999f is 1.3e-5 off),
    # torch's is Python double; -expm1(t * log1p(-(1 - b))) with 1 - b taken in double is not.
    return -jnp.expm1(count * jnp.log1p(-(1.0 - decay)))


def scale_by_torch_adam(b1: float = BETA1, b2: float = BETA2, eps: float = EPS
                        ) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` (same state, same moment updates and operation order) with the
    bias corrections of :func:`adam_bias_correction` instead of Optax's float32 ones."""
    base = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        c1, c2 = adam_bias_correction(b1, count), adam_bias_correction(b2, count)
        updates = jax.tree.map(lambda m, v: (m / c1.astype(m.dtype))
                               / (jnp.sqrt(v / c2.astype(v.dtype)) + eps), mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(base.init, update_fn)


def adam(lr: float, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """torch.optim.Adam(lr, weight_decay): weight decay is *coupled* L2, ``wd * p`` added to the
    gradient before both moments (not AdamW)."""
    # optax.adam has no weight decay; torch's is added to g first. eps is outside the square
    # root in both (Optax's eps_root stays 0), after the bias correction of v in both.
    # FP order: torch lerps m + (1-b1)(g-m), Optax sums (1-b1) g + b1 m; torch divides
    # sqrt(v) / sqrt(1-b2^t), Optax takes sqrt(v / (1-b2^t)); torch steps by
    # (lr / (1-b1^t)) * m / denom, Optax by -lr * ((m / (1-b1^t)) / denom). The corrections
    # 1 - b^t: adam_bias_correction (optax.adam's own are float32-rounded). The chain has
    # optax.adam's structure and state.
    return _coupled_decay(weight_decay, optax.chain(scale_by_torch_adam(),
                                                    optax.scale_by_learning_rate(lr)))


def adamw(lr: float, weight_decay: float = 0.01) -> optax.GradientTransformation:
    """torch.optim.AdamW(lr, weight_decay): *decoupled* decay ``p -= lr * wd * p`` next to the Adam
    step, on every parameter; the default 1e-2 is torch's (optax.adamw's own is 1e-4)."""
    # optax.adamw's default decay is 1e-4; both decay the old p by lr * wd (the paper: wd alone).
    # FP order: torch multiplies p by (1 - lr*wd) before its Adam step; Optax adds wd * p to
    # the Adam direction and scales the sum by -lr. The Adam part differs as in adam(). The
    # chain is optax.adamw's (scale_by_adam, add_decayed_weights, scale_by_learning_rate).
    return optax.chain(scale_by_torch_adam(), optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(lr))


def make_optimizer(opt_cfg: dict[str, Any]) -> optax.GradientTransformation:
    """The transformation for a config's ``[optimizer]`` table (keys: name, learning_rate,
    momentum, nesterov, weight_decay), as ``torchref.optim.make_optimizer`` builds it in torch.
    momentum and nesterov apply to "sgd" only."""
    name, lr, wd = opt_cfg["name"], opt_cfg["learning_rate"], opt_cfg["weight_decay"]
    momentum, nesterov = opt_cfg["momentum"], opt_cfg["nesterov"]
    if name == "sgd":
        if nesterov:
            return sgd_nesterov(lr, momentum, wd)  # ValueError at momentum 0, as torch
        return sgd_momentum(lr, momentum, wd) if momentum else sgd(lr, wd)
    if name == "adam":
        return adam(lr, wd)
    if name == "adamw":
        return adamw(lr, wd)
    raise ValueError(f"unknown optimizer {name!r}: choose sgd, adam or adamw")
