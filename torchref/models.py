"""The network a config's ``[model]`` describes, as a :class:`torchref.layers.Sequential`: the
twin of ``jaxnets.models`` (same layers, same names). Inputs NCHW or (batch, features).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from jaxnets.models import model_settings
from jaxnets.spec import model_layers
from torchref.layers import Sequential


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
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            raise ValueError(f"unknown init scheme {scheme!r}")


def build_model(model_cfg: dict[str, Any], seed: int,
                input_shape: tuple[int, ...] | None = None) -> Sequential:
    """The model ``model_cfg`` describes (see ``jaxnets.models.build_model``), initialised from
    ``seed`` with the config's init scheme. The caller's global torch random stream is left as
    it was: the draws come from a forked generator."""
    layers = model_layers(model_cfg, input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sequential(layers, model_settings(model_cfg, seed))
        apply_init(model, model_cfg["init"], model_cfg["init_std"])
    return model
