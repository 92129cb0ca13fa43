"""The seed networks as torch.nn modules: twins of ``jaxnets.models`` (same class names, same
layer names, same steps). Inputs: vectors (batch, features) or images (batch, 1, 28, 28), NCHW.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
               "none": lambda x: x}


def max_pool(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pool, stride 2. x: (batch, C, H, W) -> (batch, C, H/2, W/2)."""
    return F.max_pool2d(x, 2, 2)


def flatten(x: torch.Tensor) -> torch.Tensor:
    """(batch, C, H, W) -> (batch, C*H*W), channel-major: nn.Flatten's order."""
    return torch.flatten(x, 1)


class Net(nn.Module):
    """A network as an ordered list of named steps (:meth:`steps`), as in ``jaxnets.models``."""

    def steps(self) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, step in self.steps():
            x = step(x)
        return x

    def forward_layers(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Every step's output, in order: ``[("conv1", (batch, 6, 28, 28)), ...]``."""
        outputs = []
        for name, step in self.steps():
            x = step(x)
            outputs.append((name, x))
        return outputs


class MLP(Net):
    """Fully connected layers ``layers.0 ... layers.k`` with one activation between them."""

    def __init__(self, in_features: int, hidden: list[int], out_features: int,
                 activation: str = "relu"):
        super().__init__()
        sizes = [in_features, *hidden, out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
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
    """Paddle notes 3.3 (see ``jaxnets.models.LeNet``). x: (batch, 1, 28, 28)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def steps(self):
        return [("conv1", self.conv1), ("relu1", torch.relu), ("pool1", max_pool),
                ("conv2", self.conv2), ("relu2", torch.relu), ("pool2", max_pool),
                ("flatten", flatten), ("fc1", self.fc1), ("fc2", self.fc2), ("fc3", self.fc3)]


class SimpleNet(Net):
    """Paddle notes 4 (see ``jaxnets.models.SimpleNet``). x: (batch, 1, 28, 28)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, padding=2)
        self.conv2 = nn.Conv2d(20, 20, 5, padding=2)
        self.fc = nn.Linear(980, 10)

    def steps(self):
        return [("conv1", self.conv1), ("relu1", torch.relu), ("pool1", max_pool),
                ("conv2", self.conv2), ("relu2", torch.relu), ("pool2", max_pool),
                ("flatten", flatten), ("fc", self.fc)]


class ConvNet(Net):
    """PyTorch CNN notes 5 (see ``jaxnets.models.ConvNet``). x: (batch, 1, 28, 28)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.fc = nn.Linear(320, 10)

    def steps(self):
        return [("conv1", self.conv1), ("pool1", max_pool), ("relu1", torch.relu),
                ("conv2", self.conv2), ("pool2", max_pool), ("relu2", torch.relu),
                ("flatten", flatten), ("fc", self.fc)]


MODELS = {"MLP": MLP, "LeNet": LeNet, "SimpleNet": SimpleNet, "ConvNet": ConvNet}


@torch.no_grad()
def apply_init(model: nn.Module, scheme: str, init_std: float = 0.01) -> None:
    """Re-initialise every Linear/Conv2d: ``"torch"`` keeps PyTorch's default; ``"normal"``
    draws weights from N(0, init_std^2) and keeps the default biases (d2l's ``init_weights``);
    ``"flax"`` is Flax's default: lecun_normal (a normal truncated at two standard deviations,
    rescaled to variance 1/fan_in) weights and zero biases."""
    if scheme == "torch":
        return
    for module in model.modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        if scheme == "normal":
            nn.init.normal_(module.weight, 0.0, init_std)
        elif scheme == "flax":
            fan_in = module.weight[0].numel()
            # 0.8796...: the std of a standard normal truncated to [-2, 2] (Flax's constant)
            std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
            nn.init.trunc_normal_(module.weight, 0.0, std, -2 * std, 2 * std)
            nn.init.zeros_(module.bias)
        else:
            raise ValueError(f"unknown init scheme {scheme!r}")


def build_model(model_cfg: dict[str, Any], seed: int) -> Net:
    """The model a config's ``[model]`` table describes, initialised from
    ``torch.manual_seed(seed)`` with the config's init scheme."""
    torch.manual_seed(seed)
    name = model_cfg["name"]
    if name == "MLP":
        model = MLP(model_cfg["in_features"], model_cfg["hidden"], model_cfg["out_features"],
                    model_cfg["activation"])
    elif name in MODELS:
        model = MODELS[name]()
    else:
        raise ValueError(f"unknown model {name!r}")
    apply_init(model, model_cfg["init"], model_cfg["init_std"])
    return model
