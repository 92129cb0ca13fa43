"""Weight-loading bugs on the catalogue's convnet: a user's converter with one classic mistake.

Each plant is a ``load(torch_model, flax_model)`` as :func:`torchref.verify.verify` takes it:
the correct conversion (the convnet's mapping with jaxnets' named layout rules), then one
tensor set the wrong way.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from torchref.verify.mapping import Mapping, load_into_flax, set_flax_variables

# the convnet's correct mapping: torch tensor -> (flax variable, layout rule)
CONVNET = Mapping(
    layers=[("0", "conv"), ("1", "norm"), ("6", "hidden"), ("8", "square"), ("10", "logits")],
    params={"0.weight": ("conv.kernel", "conv_torch_to_flax"), "0.bias": ("conv.bias", "same"),
            "1.weight": ("norm.scale", "same"), "1.bias": ("norm.bias", "same"),
            "1.running_mean": ("norm.mean", "same"), "1.running_var": ("norm.var", "same"),
            "6.weight": ("hidden.kernel", "linear_torch_to_flax"),
            "6.bias": ("hidden.bias", "same"),
            "8.weight": ("square.kernel", "linear_torch_to_flax"),
            "8.bias": ("square.bias", "same"),
            "10.weight": ("logits.kernel", "linear_torch_to_flax"),
            "10.bias": ("logits.bias", "same")})


def _tensor(torch_model, name: str) -> np.ndarray:
    return dict(torch_model.named_parameters())[name].detach().cpu().numpy().copy()


def _planted(replace: Callable[[object], dict[str, np.ndarray]]) -> Callable:
    def load(torch_model, flax_model) -> None:
        load_into_flax(CONVNET, torch_model, flax_model)
        set_flax_variables(flax_model, replace(torch_model))
    return load


def square_linear_untransposed(torch_model) -> dict[str, np.ndarray]:
    """The square (16, 16) Linear's weight copied as it is: torch stores (out, in), Flax's
    kernel is (in, out); the shapes cannot tell."""
    return {"square.kernel": _tensor(torch_model, "8.weight")}


def conv_kernel_spatial_swap(torch_model) -> dict[str, np.ndarray]:
    """OIHW -> WHIO (``transpose(3, 2, 1, 0)``) for HWIO (``(2, 3, 1, 0)``): the spatial axes
    swapped; a square 3x3 kernel keeps its shape."""
    return {"conv.kernel": _tensor(torch_model, "0.weight").transpose(3, 2, 1, 0)}


def conv_kernel_flipped(torch_model) -> dict[str, np.ndarray]:
    """The kernel flipped in both spatial axes (convolution vs torch's cross-correlation)."""
    kernel = _tensor(torch_model, "0.weight").transpose(2, 3, 1, 0)
    return {"conv.kernel": kernel[::-1, ::-1].copy()}


def dropped_bias(torch_model) -> dict[str, np.ndarray]:
    """The hidden Linear's bias not converted: it keeps Flax's initial zeros."""
    return {"hidden.bias": np.zeros_like(_tensor(torch_model, "6.bias"))}


def plain_conversion(torch_model, flax_model) -> None:
    """Every Linear converted with the plain transpose: right for a port that flattens in
    torch's (C, H, W) order, wrong for one that flattens its NHWC map as it is."""
    load_into_flax(CONVNET, torch_model, flax_model)


LOADERS: dict[str, Callable] = {f.__name__: _planted(f) for f in (
    square_linear_untransposed, conv_kernel_spatial_swap, conv_kernel_flipped, dropped_bias)}
LOADERS["plain_conversion"] = plain_conversion
