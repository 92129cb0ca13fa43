"""The PyTorch optimizer for a config's ``[optimizer]`` table: the twin of
``jaxnets.optim.make_optimizer``, with torch's own defaults for everything the config leaves out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def make_optimizer(opt_cfg: dict[str, Any], params: Iterable[torch.nn.Parameter]
                   ) -> torch.optim.Optimizer:
    """torch.optim.SGD (momentum, nesterov), Adam (coupled weight decay) or AdamW (decoupled).
    momentum and nesterov apply to "sgd" only; torch raises ValueError for nesterov without
    momentum."""
    name, lr, wd = opt_cfg["name"], opt_cfg["learning_rate"], opt_cfg["weight_decay"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=opt_cfg["momentum"],
                               nesterov=opt_cfg["nesterov"], weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}: choose sgd, adam or adamw")
