"""Losses and metrics, mean-reduced over the batch like PyTorch's defaults."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits: (batch, classes), labels: (batch,) integers. torch.nn.CrossEntropyLoss()."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mse(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """torch.nn.MSELoss(): mean over every element."""
    return jnp.mean((predictions - targets.reshape(predictions.shape)) ** 2)


def num_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """How many rows' argmax equals the integer label."""
    return jnp.sum(jnp.argmax(logits, axis=-1) == labels)


def num_rounded_correct(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """How many regressed values round to the target (a digit regressed as a float)."""
    return jnp.sum(jnp.round(predictions.reshape(-1)) == targets.reshape(-1))


def no_metric(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.zeros((), jnp.int32)


LOSSES = {"cross_entropy": cross_entropy, "mse": mse}
METRICS = {"accuracy": num_correct, "rounded_accuracy": num_rounded_correct, "none": no_metric}
