"""Losses and metrics, mean-reduced over the batch like PyTorch's defaults."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnets.errors import DataError


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits: (batch, classes), labels: (batch,) integers. torch.nn.CrossEntropyLoss()."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def check_label_range(labels: np.ndarray, classes: int, what: str = "labels") -> None:
    # Framework difference: torch's cross-entropy raises on a label outside [0, classes); JAX's
    # gather clamps it silently (a wrong loss, then NaN), so jaxnets checks the labels first.
    """A :class:`DataError` naming ``what`` unless every label lies in [0, classes)."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu" and labels.size and (labels.min() < 0
                                                       or labels.max() >= classes):
        raise DataError(f"{what} range over [{labels.min()}, {labels.max()}], but the model has "
                        f"{classes} outputs: cross_entropy needs labels in [0, {classes - 1}]")


def mse(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """torch.nn.MSELoss(): mean over every element."""
    return jnp.mean((predictions - targets.reshape(predictions.shape)) ** 2)


def mae(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """torch.nn.L1Loss(): mean absolute difference over every element.

    Written as ``d * sign(d)``, not ``abs(d)``: the same values, but the gradient at an exact
    zero difference is torch's ``sign(0) = 0``; ``jnp.abs``'s gradient at 0 is 1.
    """
    diff = predictions - targets.reshape(predictions.shape)
    return jnp.mean(diff * jnp.sign(diff))


def l2_distance(predictions: jax.Array, targets: jax.Array,
                reduction: str = "mean") -> jax.Array:
    """Euclidean norm of the difference, per row: rows are the leading axis, everything
    else is flattened. ``reduction``: ``"none"`` (batch,), ``"mean"`` or ``"sum"`` over rows.

    torch: ``torch.linalg.vector_norm(p - t, dim=1)`` (not ``F.pairwise_distance``, which
    adds ``eps=1e-6`` to the difference). A row with zero difference gets gradient 0, as in
    torch, rather than the NaN that ``jnp.linalg.norm``'s sqrt gives at 0.
    """
    diff = (predictions - targets.reshape(predictions.shape)).reshape(predictions.shape[0], -1)
    squared = jnp.sum(diff * diff, axis=-1)
    nonzero = squared > 0
    norms = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squared, 1)), 0)
    if reduction == "none":
        return norms
    if reduction == "mean":
        return norms.mean()
    if reduction == "sum":
        return norms.sum()
    raise ValueError(f"unknown reduction {reduction!r}")


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
