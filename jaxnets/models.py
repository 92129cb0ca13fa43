"""The seed networks as Flax NNX modules. Each class has a twin of the same name in
``torchref.models``, with the same layer names, so weights convert by name.

Inputs: vectors (batch, features) or images (batch, 28, 28, 1), NHWC, as Flax expects.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnets.init import linear_inits

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "none": lambda x: x,
}


class MLP(nnx.Module):
    """Fully connected layers ``layers.0 ... layers.k`` with one activation between them.

    ``MLP(784, [512, 512], 10)`` is the PyTorch tutorial's network; no softmax at the end (the
    loss takes logits). x: (batch, ...) is flattened to (batch, in_features).
    """

    def __init__(self, in_features: int, hidden: list[int], out_features: int,
                 activation: str = "relu", init: str = "torch", *, rngs: nnx.Rngs):
        sizes = [in_features, *hidden, out_features]
        self.layers = nnx.List([
            nnx.Linear(fan_in, fan_out, rngs=rngs, **linear_inits(init, fan_in))
            for fan_in, fan_out in itertools.pairwise(sizes)
        ])
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        act = ACTIVATIONS[self.activation]
        for layer in self.layers[:-1]:
            x = act(layer(x))
        return self.layers[-1](x)


def build_model(model_cfg: dict[str, Any], seed: int) -> nnx.Module:
    """The model a config's ``[model]`` table describes, initialised from ``seed``."""
    rngs = nnx.Rngs(params=seed)
    if model_cfg["name"] == "MLP":
        return MLP(model_cfg["in_features"], model_cfg["hidden"], model_cfg["out_features"],
                   model_cfg["activation"], model_cfg["init"], rngs=rngs)
    raise ValueError(f"unknown model {model_cfg['name']!r}")
