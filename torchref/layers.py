"""The PyTorch builders of the layer vocabulary: twin of ``jaxnets.layers`` (same registry keys,
same module names, same steps). Inputs: (batch, features) or (batch, C, H, W), NCHW.
Train/eval mode is PyTorch's own (``model.train()`` / ``model.eval()``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxnets.layers import dropout_mask
from jaxnets.spec import LAYER_KEYS, STATEFUL, Layer, conv_pads, pool_options


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` with explicit, possibly uneven padding ((top, bottom), (left, right)):
    "same" at stride 2 pads one more pixel at the end, which ``nn.Conv2d`` cannot express."""

    def __init__(self, c_in: int, c_out: int, pads, **kwargs):
        (top, bottom), (left, right) = pads
        even = top == bottom and left == right
        super().__init__(c_in, c_out, padding=(top, left) if even else 0, **kwargs)
        self.explicit_pads = None if even else (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explicit_pads is not None:
            x = F.pad(x, self.explicit_pads)
        return super().forward(x)


class Dropout(nn.Module):
    """Dropout with the masks of :func:`jaxnets.layers.dropout_mask` (NumPy, from seed, layer
    index and draw number), so both frameworks drop the same entries; ``draws`` is a buffer
    and goes into checkpoints. ``global_rows``: (rows, global batch size) when ``x`` holds only
    ``rows`` of a global batch (a DDP rank, ``torchref.ddp_layers.shard_dropout``): the mask is
    the global batch's, sliced, so N ranks drop what one device drops."""

    def __init__(self, rate: float, seed: int, index: int):
        super().__init__()
        self.rate, self.seed, self.index = rate, seed, index
        self.global_rows: tuple[slice, int] | None = None
        self.register_buffer("draws", torch.zeros((), dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        rows, batch = self.global_rows or (slice(None), len(x))
        # drawn in float64 and rounded once to x's dtype, as the JAX side does
        mask = dropout_mask(self.seed, self.index, int(self.draws), (batch, *x.shape[1:]),
                            self.rate, np.float64)[rows]
        self.draws += 1
        return x * torch.from_numpy(mask).to(device=x.device, dtype=x.dtype)


class Residual(nn.Module):
    """``branch(x) + x``, or ``branch(x) + projection(x)`` when the branch changes the shape."""

    def __init__(self, layer: Layer, settings: dict[str, Any]):
        super().__init__()
        self.branch = Sequential(layer.layers, settings)
        self.projection = None
        if layer.projection:
            c_in, c_out = layer.in_shape[0], layer.out_shape[0]
            if layer.projection["kind"] == "linear":
                self.projection = nn.Linear(c_in, c_out)
            else:
                self.projection = nn.Conv2d(c_in, c_out, 1, stride=layer.projection["stride"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.projection is None else self.projection(x)
        return self.branch(x) + shortcut


def _conv(layer: Layer, settings: dict[str, Any]) -> Conv2d:
    o = layer.options
    return Conv2d(layer.in_shape[0], o["out"], conv_pads(layer, layer.in_shape),
                  kernel_size=o["kernel"], stride=o["stride"], dilation=o["dilation"],
                  groups=o["groups"], bias=o["bias"])


def _batchnorm(layer: Layer, settings: dict[str, Any]) -> nn.Module:
    kind = nn.BatchNorm2d if len(layer.in_shape) == 3 else nn.BatchNorm1d
    return kind(layer.in_shape[0], eps=layer.options["eps"], momentum=layer.options["momentum"])


def _pool(layer: Layer, pool: Callable) -> Callable:
    options = pool_options(layer)
    return partial(pool, kernel_size=options.pop("kernel"), **options)


def flatten(x: torch.Tensor) -> torch.Tensor:
    """(batch, C, H, W) -> (batch, C*H*W), channel-major: nn.Flatten's order."""
    return torch.flatten(x, 1)


def global_avgpool(x: torch.Tensor) -> torch.Tensor:
    """(batch, C, H, W) -> (batch, C)."""
    return x.mean(dim=(2, 3))


BUILDERS: dict[str, Callable[[Layer, dict], Any]] = {
    "linear": lambda layer, s: nn.Linear(layer.in_shape[0], layer.options["out"],
                                         bias=layer.options["bias"]),
    "conv2d": _conv,
    "batchnorm": _batchnorm,
    "layernorm": lambda layer, s: nn.LayerNorm(layer.in_shape[0], eps=layer.options["eps"]),
    "dropout": lambda layer, s: Dropout(layer.options["rate"], s["seed"], layer.index),
    "residual": lambda layer, s: Residual(layer, s),
    "flatten": lambda layer, s: flatten,
    "relu": lambda layer, s: torch.relu,
    "tanh": lambda layer, s: torch.tanh,
    "sigmoid": lambda layer, s: torch.sigmoid,
    "silu": lambda layer, s: F.silu,
    "gelu": lambda layer, s: partial(F.gelu, approximate="tanh" if layer.options["approximate"]
                                     else "none"),
    "leaky_relu": lambda layer, s: partial(F.leaky_relu, negative_slope=layer.options["slope"]),
    "softmax": lambda layer, s: partial(torch.softmax, dim=1),
    "log_softmax": lambda layer, s: partial(torch.log_softmax, dim=1),
    "maxpool": lambda layer, s: _pool(layer, F.max_pool2d),
    "avgpool": lambda layer, s: _pool(layer, F.avg_pool2d),
    "global_avgpool": lambda layer, s: global_avgpool,
}
assert set(BUILDERS) == set(LAYER_KEYS)


class Sequential(nn.Module):
    """The network a list of :class:`jaxnets.spec.Layer` describes; modules registered under
    their layers' names (``layers.0`` in the ModuleList ``layers``), as in ``jaxnets.layers``."""

    def __init__(self, layers: list[Layer], settings: dict[str, Any]):
        super().__init__()
        self.layer_steps = []
        for layer in layers:
            built = BUILDERS[layer.type](layer, settings)
            if layer.type in STATEFUL:
                prefix, _, number = layer.name.partition(".")
                if number:
                    if not hasattr(self, prefix):
                        self.add_module(prefix, nn.ModuleList())
                    getattr(self, prefix).append(built)
                else:
                    self.add_module(prefix, built)
                built = None
            self.layer_steps.append((layer.name, built))

    def module(self, name: str) -> nn.Module:
        prefix, _, number = name.partition(".")
        return getattr(self, prefix)[int(number)] if number else getattr(self, prefix)

    def steps(self) -> list[tuple[str, Callable]]:
        return [(name, self.module(name) if fn is None else fn) for name, fn in self.layer_steps]

    def forward_layers(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Every layer's output, in order: ``[("conv1", (batch, 6, 28, 28)), ...]``."""
        outputs = []
        for name, step in self.steps():
            x = step(x)
            outputs.append((name, x))
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, step in self.steps():
            x = step(x)
        return x

