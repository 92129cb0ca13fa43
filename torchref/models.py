"""The seed networks as torch.nn modules: twins of ``jaxnets.models`` (same class and layer
names). Inputs: vectors (batch, features) or images (batch, 1, 28, 28), NCHW."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "none": nn.Identity}


class MLP(nn.Module):
    """Fully connected layers ``layers.0 ... layers.k`` with one activation between them."""

    def __init__(self, in_features: int, hidden: list[int], out_features: int,
                 activation: str = "relu"):
        super().__init__()
        sizes = [in_features, *hidden, out_features]
        self.flatten = nn.Flatten()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


def build_model(model_cfg: dict[str, Any], seed: int) -> nn.Module:
    """The model a config's ``[model]`` table describes, with PyTorch's default init from
    ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    if model_cfg["name"] == "MLP":
        return MLP(model_cfg["in_features"], model_cfg["hidden"], model_cfg["out_features"],
                   model_cfg["activation"])
    raise ValueError(f"unknown model {model_cfg['name']!r}")
