"""A small CNN as a user writes it: PyTorch in nn.Sequential, and a hand-written Flax NNX port
with its own attribute names. ``broken`` plants one porting bug (see ``make_flax``)."""

from __future__ import annotations

import jax
import torch
from flax import nnx
from torch import nn


def make_torch() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(4 * 7 * 7, 16), nn.ReLU(), nn.Linear(16, 10))


class TinyCNN(nnx.Module):
    """x: (batch, 14, 14, 1) NHWC -> logits (batch, 10)."""

    def __init__(self, broken: str = "", *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), padding=1, rngs=rngs)
        # torch's BatchNorm momentum 0.1 is Flax's 0.9; eps 1e-5 in both unless broken
        self.norm = nnx.BatchNorm(4, momentum=0.9, epsilon=1e-3 if broken == "eps" else 1e-5,
                                  rngs=rngs)
        self.dropout = nnx.Dropout(0.25, rngs=rngs)
        self.hidden = nnx.Linear(4 * 7 * 7, 16, rngs=rngs)
        self.logits = nnx.Linear(16, 10, rngs=rngs)
        self.broken = broken

    def __call__(self, x):
        x = nnx.max_pool(jax.nn.relu(self.norm(self.conv(x))), (2, 2), (2, 2))
        if self.broken != "flatten":  # torch flattens channel-major (C, H, W)
            x = x.transpose(0, 3, 1, 2)
        x = self.dropout(x.reshape(x.shape[0], -1))
        return self.logits(jax.nn.relu(self.hidden(x)))


def make_flax(broken: str = "", rngs: nnx.Rngs | None = None) -> TinyCNN:
    return TinyCNN(broken, rngs=rngs or nnx.Rngs(0))


def make_flax_eps(rngs: nnx.Rngs | None = None) -> TinyCNN:
    """The port with BatchNorm's epsilon at 1e-3 (Keras' default) instead of torch's 1e-5."""
    return make_flax("eps", rngs)
