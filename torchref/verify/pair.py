"""The models one verification runs: the user's PyTorch model as the float32 (or float64)
candidate and as the float64 reference, the Flax port cast to the dtype; modes and losses."""

from __future__ import annotations

import copy
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnets import losses as jax_losses
from jaxnets.convert import (
    activation_channels_first,
    activation_channels_last,
    activation_flax_to_torch,
    activation_torch_to_flax,
)
from jaxnets.errors import JaxnetsError

LOSSES = ("cross_entropy", "mse", "sum")
MODES = ("eval", "train")


def torch_loss(name: str, target) -> Callable:
    import torch.nn.functional as F

    return {"cross_entropy": lambda y: F.cross_entropy(y, target),
            "mse": lambda y: F.mse_loss(y, target.reshape(y.shape)), "sum": lambda y: y.sum()}[name]


def flax_loss(name: str) -> Callable:
    """The same losses in JAX (mean-reduced like PyTorch's defaults)."""
    return {"cross_entropy": jax_losses.cross_entropy, "mse": jax_losses.mse,
            "sum": lambda y, t: jnp.sum(y)}[name]


def set_mode(torch_model, flax_model: nnx.Module | None, mode: str) -> None:
    """eval, or train with every dropout rate at 0 (on the engine's own copies)."""
    from torch import nn

    torch_model.train(mode == "train")
    if flax_model is None:
        flax_model = nnx.Module()
    flax_model.train() if mode == "train" else flax_model.eval()
    if mode == "train":
        for m in torch_model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.p = 0.0
        for _, m in nnx.iter_modules(flax_model):
            if isinstance(m, nnx.Dropout):
                m.rate = 0.0


def cast_flax(model: nnx.Module, dtype: str) -> nnx.Module:
    """A copy of ``model`` with every floating-point variable in ``dtype``."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                         else a, state)
    return nnx.merge(graphdef, state)


def make_targets(loss: str, output: np.ndarray, seed: int) -> np.ndarray | None:
    """Seeded targets: class labels for cross-entropy, normal values for MSE."""
    rng = np.random.default_rng(seed + 1)
    if loss == "cross_entropy":
        if output.ndim != 2:
            raise JaxnetsError(f"--loss cross_entropy needs (batch, classes) outputs, the torch "
                               f"model gives {output.shape} (use --loss mse or sum)")
        return rng.integers(0, output.shape[1], output.shape[0])
    return rng.standard_normal(output.shape) if loss == "mse" else None


class Pair:
    """One dtype's models: the torch candidate, its float64 reference and the Flax port, with
    the weights mapped across."""

    def __init__(self, torch_model, flax_model, dtype: str, layout: str):
        self.dtype, self.layout = dtype, layout
        self.torch = copy.deepcopy(torch_model).to(getattr(__import__("torch"), dtype))
        self.reference = copy.deepcopy(torch_model).double()
        self.flax = cast_flax(flax_model, dtype)

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        """An activation in torch's layout -> the Flax model's layout."""
        return {"nhwc": activation_torch_to_flax, "channels_last": activation_channels_last
                }.get(self.layout, np.asarray)(array)

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        """An activation in the Flax model's layout -> torch's layout."""
        return {"nhwc": activation_flax_to_torch, "channels_last": activation_channels_first
                }.get(self.layout, np.asarray)(array)




def _np(t) -> np.ndarray:
    """A copy (a NumPy view of a torch tensor follows its in-place updates)."""
    return t.detach().cpu().numpy().copy()


def model_input(x: np.ndarray, dtype: str) -> np.ndarray:
    """Floating-point inputs in the run's dtype; integer inputs (token ids for an Embedding)
    as they are."""
    return x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x


def torch_input(x: np.ndarray, dtype: str):
    import torch

    return torch.tensor(model_input(x, dtype))
