"""The catalogue's optimizer and loss set-ups: each a ``torch.optim`` optimizer as a user builds
it, its correct Optax port, and the ports with one classic bug planted (as Optax
transformations, the way a porter would have written them).

The engine steps torch with ``optimizer.zero_grad(); loss.backward(); optimizer.step()``, so a
learning-rate schedule or gradient clipping lives in the torch optimizer's ``step`` here, as it
would in a user's training loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import torch

from jaxnets import optim

LR_ADAM, LR_SGD, MOMENTUM, DECAY, MAX_NORM, HALVING = 1e-2, 0.1, 0.9, 0.1, 0.5, 0.5


class ScheduledSGD(torch.optim.SGD):
    """torch.optim.SGD whose learning rate halves after every step (an ExponentialLR(0.5)
    stepped after each optimizer step): step k (from 0) uses ``lr * 0.5**k``."""

    def __init__(self, params, lr: float):
        super().__init__(params, lr=lr)
        self.base_lr, self.steps_done = lr, 0

    def step(self, closure=None):
        for group in self.param_groups:
            group["lr"] = self.base_lr * HALVING ** self.steps_done
        self.steps_done += 1
        return super().step(closure)


class ClippedSGD(torch.optim.SGD):
    """torch.optim.SGD after ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` (global)."""

    def __init__(self, params, lr: float, max_norm: float):
        super().__init__(params, lr=lr)
        self.max_norm = max_norm

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        return super().step(closure)


# torch optimizer factories (the engine calls them with the model's parameters)
TORCH_OPTIMIZERS: dict[str, Callable] = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=LR_ADAM),
    "adam_l2": lambda ps: torch.optim.Adam(ps, lr=LR_ADAM, weight_decay=DECAY),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=LR_SGD, momentum=MOMENTUM),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=LR_SGD, momentum=MOMENTUM, nesterov=True),
    "sgd_schedule": lambda ps: ScheduledSGD(ps, lr=LR_SGD),
    "sgd_clipped": lambda ps: ClippedSGD(ps, lr=LR_SGD, max_norm=MAX_NORM),
}


def halving_schedule(count):
    """torch's ScheduledSGD learning rate at Optax's update count (0 at the first step)."""
    return LR_SGD * HALVING ** count


def clip_coefficient(norm: jax.Array, max_norm: float) -> jax.Array:
    # Framework difference: torch's clip_grad_norm_ scales by max_norm / (norm + 1e-6) (capped
    # at 1); optax.clip_by_global_norm by max_norm / norm: relatively 1e-6 / norm apart.
    return jnp.minimum(max_norm / (norm + 1e-6), 1.0)


def torch_clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_`` as an Optax transformation (one global norm)."""
    def update(updates, state, params=None):
        coefficient = clip_coefficient(optax.tree.norm(updates), max_norm)
        return jax.tree.map(lambda g: g * coefficient, updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# the correct Optax port of each torch set-up
CORRECT: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adam": lambda: optim.adam(LR_ADAM),
    "adam_l2": lambda: optim.adam(LR_ADAM, DECAY),
    "sgd_momentum": lambda: optim.sgd_momentum(LR_SGD, MOMENTUM),
    "sgd_nesterov": lambda: optim.sgd_nesterov(LR_SGD, MOMENTUM),
    "sgd_schedule": lambda: optax.sgd(halving_schedule),
    "sgd_clipped": lambda: optax.chain(torch_clip_by_global_norm(MAX_NORM), optax.sgd(LR_SGD)),
}


# ------------------------------------------------------------------- the planted bugs
def adam_eps_inside_sqrt() -> optax.GradientTransformation:
    """``sqrt(v_hat + eps)`` instead of torch's ``sqrt(v_hat) + eps``."""
    return optax.adam(LR_ADAM, eps=0.0, eps_root=optim.EPS)


def adam_eps_1e7() -> optax.GradientTransformation:
    """eps 1e-7 (Keras' default) for torch's 1e-8."""
    return optax.adam(LR_ADAM, eps=1e-7)


def adam_b2_099() -> optax.GradientTransformation:
    """b2 0.99 for torch's 0.999."""
    return optax.adam(LR_ADAM, b2=0.99)


def adam_without_bias_correction() -> optax.GradientTransformation:
    """Adam with m and v used as they are, not divided by ``1 - b**t``."""
    b1, b2, eps = optim.BETA1, optim.BETA2, optim.EPS

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update(grads, state, params=None):
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        steps = jax.tree.map(lambda m, v: -LR_ADAM * m / (jnp.sqrt(v) + eps), mu, nu)
        return steps, optax.ScaleByAdamState(state.count + 1, mu, nu)
    return optax.GradientTransformation(init, update)


def adam_decoupled_decay() -> optax.GradientTransformation:
    """AdamW's decoupled decay for torch.optim.Adam's coupled L2 (``weight_decay=0.1``)."""
    return optax.adamw(LR_ADAM, weight_decay=DECAY)


def adam_lr_1pct_high() -> optax.GradientTransformation:
    """A learning rate 1 % high (1.01e-2 for 1e-2)."""
    return optim.adam(LR_ADAM * 1.01)


def sgd_with_dampening() -> optax.GradientTransformation:
    """A damped momentum buffer ``b = m b + (1 - m) g`` (an EMA) for torch's ``b = m b + g``."""
    return optax.chain(optax.ema(MOMENTUM, debias=False), optax.scale(-LR_SGD))


class LookAheadState(NamedTuple):
    trace: optax.Params


def nesterov_look_ahead() -> optax.GradientTransformation:
    """Nesterov transcribed from the look-ahead form, ``p -= lr (g + m b_old)`` with the
    buffer *before* this step's gradient; torch uses the buffer after it."""
    def init(params):
        return LookAheadState(jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        steps = jax.tree.map(lambda g, b: -LR_SGD * (g + MOMENTUM * b), grads, state.trace)
        trace = jax.tree.map(lambda g, b: MOMENTUM * b + g, grads, state.trace)
        return steps, LookAheadState(trace)
    return optax.GradientTransformation(init, update)


def schedule_one_step_late() -> optax.GradientTransformation:
    """The halving schedule read one step late (the first decay at the third step)."""
    return optax.sgd(lambda count: halving_schedule(jnp.maximum(count - 1, 0)))


def clip_per_tensor() -> optax.GradientTransformation:
    """Each gradient tensor clipped to ``max_norm`` on its own, not by the global norm."""
    def update(updates, state, params=None):
        return jax.tree.map(lambda g: g * clip_coefficient(jnp.linalg.norm(g), MAX_NORM),
                            updates), state
    per_tensor = optax.GradientTransformation(lambda params: optax.EmptyState(), update)
    return optax.chain(per_tensor, optax.sgd(LR_SGD))


# ------------------------------------------------------------------- losses
def cross_entropy_summed(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy summed over the batch, torch's CrossEntropyLoss() averages it.
    logits: (batch, classes), labels: (batch,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()


def cross_entropy_label_smoothing(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy with label smoothing 0.1 (a training recipe's, not the torch model's)."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), 0.1)
    return optax.softmax_cross_entropy(logits, targets).mean()
