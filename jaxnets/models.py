"""The seed networks as Flax NNX modules. Each class has a twin of the same name in
``torchref.models`` with the same layer names, so weights convert by name and activations
compare layer by layer.

Inputs: vectors (batch, features) or images (batch, 28, 28, 1), NHWC, as Flax expects.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnets.conv import conv_for, max_pool_2x2
from jaxnets.init import linear_inits

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "none": lambda x: x,
}


def max_pool(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, no padding. x: (batch, H, W, C) -> (batch, H/2, W/2, C).
    Values and tie routing of ``nnx.max_pool`` and PyTorch, a faster gradient on the CPU."""
    return max_pool_2x2(x)


def flatten_chw(x: jax.Array) -> jax.Array:
    """(batch, H, W, C) -> (batch, C*H*W) in PyTorch's order.

    The one place the project reconciles flatten order: torch flattens NCHW activations
    channel-major (C, H, W); a plain reshape of NHWC would give (H, W, C). Transposing here
    keeps the first Linear after a conv stack identical on both sides, so the converter only
    ever transposes kernels and needs no knowledge of the model.
    """
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


class Net(nnx.Module):
    """A network as an ordered list of named steps (:meth:`steps`), shared by the forward
    pass, the layer-by-layer activations (:meth:`forward_layers`) and the summary."""

    def steps(self) -> list[tuple[str, Callable[[jax.Array], jax.Array]]]:
        raise NotImplementedError

    def __call__(self, x: jax.Array) -> jax.Array:
        for _, step in self.steps():
            x = step(x)
        return x

    def forward_layers(self, x: jax.Array) -> list[tuple[str, jax.Array]]:
        """Every step's output, in order: ``[("conv1", (batch, 28, 28, 6)), ...]``."""
        outputs = []
        for name, step in self.steps():
            x = step(x)
            outputs.append((name, x))
        return outputs


def _linear(fan_in: int, fan_out: int, init: str, init_std: float, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(fan_in, fan_out, rngs=rngs, **linear_inits(init, fan_in, init_std))


def _conv(c_in: int, c_out: int, kernel: int, padding: int, init: str, init_std: float,
          rngs: nnx.Rngs, impl: str = "lax") -> nnx.Conv:
    """``impl``: ``model.conv`` ("auto", "lax", "canonical", "im2col"; ``jaxnets.conv``)."""
    return nnx.Conv(c_in, c_out, (kernel, kernel), padding=((padding, padding),) * 2, rngs=rngs,
                    **linear_inits(init, c_in * kernel * kernel, init_std),
                    conv_general_dilated=conv_for(impl))


class MLP(Net):
    """Fully connected layers ``layers.0 ... layers.k`` with one activation between them.

    ``MLP(784, [512, 512], 10)`` is the PyTorch tutorial's network; no softmax at the end (the
    loss takes logits). x: (batch, ...) is flattened to (batch, in_features).
    """

    def __init__(self, in_features: int, hidden: list[int], out_features: int,
                 activation: str = "relu", init: str = "torch", init_std: float = 0.01, *,
                 rngs: nnx.Rngs):
        sizes = [in_features, *hidden, out_features]
        self.layers = nnx.List([_linear(a, b, init, init_std, rngs)
                                for a, b in itertools.pairwise(sizes)])
        self.activation = activation

    def steps(self):
        steps = [("flatten", flatten)]
        act = ACTIVATIONS[self.activation]
        for i, layer in enumerate(self.layers):
            steps.append((f"layers.{i}", layer))
            if i < len(self.layers) - 1 and self.activation != "none":
                steps.append((f"{self.activation}.{i}", act))
        return steps


class LeNet(Net):
    """Paddle notes 3.3: conv 1->6 3x3 pad 1, ReLU, pool, conv 6->16 5x5, ReLU, pool,
    flatten (400), Linear 400-120, 120-84, 84-10, no activation between the Linears.
    x: (batch, 28, 28, 1) -> logits (batch, 10)."""

    def __init__(self, init: str = "torch", init_std: float = 0.01, conv: str = "auto", *,
                 rngs: nnx.Rngs):
        self.conv1 = _conv(1, 6, 3, 1, init, init_std, rngs, conv)
        self.conv2 = _conv(6, 16, 5, 0, init, init_std, rngs, conv)
        self.fc1 = _linear(400, 120, init, init_std, rngs)
        self.fc2 = _linear(120, 84, init, init_std, rngs)
        self.fc3 = _linear(84, 10, init, init_std, rngs)

    def steps(self):
        return [("conv1", self.conv1), ("relu1", jax.nn.relu), ("pool1", max_pool),
                ("conv2", self.conv2), ("relu2", jax.nn.relu), ("pool2", max_pool),
                ("flatten", flatten_chw), ("fc1", self.fc1), ("fc2", self.fc2),
                ("fc3", self.fc3)]


class SimpleNet(Net):
    """Paddle notes 4: conv 1->20 5x5 pad 2, ReLU, pool, conv 20->20 5x5 pad 2, ReLU, pool,
    flatten (980), Linear 980-10. x: (batch, 28, 28, 1) -> logits (batch, 10)."""

    def __init__(self, init: str = "torch", init_std: float = 0.01, conv: str = "auto", *,
                 rngs: nnx.Rngs):
        self.conv1 = _conv(1, 20, 5, 2, init, init_std, rngs, conv)
        self.conv2 = _conv(20, 20, 5, 2, init, init_std, rngs, conv)
        self.fc = _linear(980, 10, init, init_std, rngs)

    def steps(self):
        return [("conv1", self.conv1), ("relu1", jax.nn.relu), ("pool1", max_pool),
                ("conv2", self.conv2), ("relu2", jax.nn.relu), ("pool2", max_pool),
                ("flatten", flatten_chw), ("fc", self.fc)]


class ConvNet(Net):
    """PyTorch CNN notes 5: conv 1->10 5x5, pool, ReLU, conv 10->20 5x5, pool, ReLU,
    flatten (320), Linear 320-10 (pool before ReLU, as the source).
    x: (batch, 28, 28, 1) -> logits (batch, 10)."""

    def __init__(self, init: str = "torch", init_std: float = 0.01, conv: str = "auto", *,
                 rngs: nnx.Rngs):
        self.conv1 = _conv(1, 10, 5, 0, init, init_std, rngs, conv)
        self.conv2 = _conv(10, 20, 5, 0, init, init_std, rngs, conv)
        self.fc = _linear(320, 10, init, init_std, rngs)

    def steps(self):
        return [("conv1", self.conv1), ("pool1", max_pool), ("relu1", jax.nn.relu),
                ("conv2", self.conv2), ("pool2", max_pool), ("relu2", jax.nn.relu),
                ("flatten", flatten_chw), ("fc", self.fc)]


MODELS = {"MLP": MLP, "LeNet": LeNet, "SimpleNet": SimpleNet, "ConvNet": ConvNet}


def build_model(model_cfg: dict[str, Any], seed: int) -> Net:
    """The model a config's ``[model]`` table describes, initialised from ``seed``."""
    rngs = nnx.Rngs(params=seed)
    name, init, std = model_cfg["name"], model_cfg["init"], model_cfg["init_std"]
    if name == "MLP":
        return MLP(model_cfg["in_features"], model_cfg["hidden"], model_cfg["out_features"],
                   model_cfg["activation"], init, std, rngs=rngs)
    if name in MODELS:
        return MODELS[name](init, std, model_cfg["conv"], rngs=rngs)
    raise ValueError(f"unknown model {name!r}")
