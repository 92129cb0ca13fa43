"""The PyTorch half of ``jaxnets summary``: the same dict as ``jaxnets.summary.jax_summary``
for the twin model (shapes NCHW, batch dimension shown as -1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from jaxnets.spec import data_input_shape
from jaxnets.summary import input_shape
from torchref.models import build_model


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def torch_summary(cfg: dict[str, Any]) -> dict[str, Any]:
    """The summary of the torch model ``cfg["model"]`` describes: a zeros batch of one goes
    through every step."""
    model = build_model(cfg["model"], cfg["seed"], data_input_shape(cfg)).eval()
    outputs = model.forward_layers(torch.zeros(input_shape(cfg, "nchw")))
    layers = [{"name": name,
               "output_shape": [-1, *out.shape[1:]],
               "params": _num_params(step) if isinstance(step, nn.Module) else 0}
              for (name, step), (_, out) in zip(model.steps(), outputs, strict=True)]
    return {"total_params": _num_params(model), "layers": layers}
