"""The network a config's ``[model]`` describes, as a Flax NNX :class:`~jaxnets.layers.Sequential`.

``model.name = "Sequential"`` builds ``model.layers``; the seed networks ``MLP``, ``LeNet``,
``SimpleNet`` and ``ConvNet`` are presets of the same vocabulary (``jaxnets.spec.preset_layers``)
with their historical layer names (``layers.0``, ``conv1``, ``fc``), so their weights and
checkpoints load as before. ``torchref.models.build_model`` builds the PyTorch twin.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from jaxnets.layers import Sequential
from jaxnets.spec import model_layers

PRESETS = ("MLP", "LeNet", "SimpleNet", "ConvNet")


def model_settings(model_cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """What every builder needs besides its layer: init scheme, conv path, dropout masks."""
    return {"init": model_cfg["init"], "init_std": model_cfg["init_std"],
            "conv": model_cfg["conv"], "seed": seed,
            "dropout_masks": model_cfg.get("dropout_masks", "shared")}


def build_model(model_cfg: dict[str, Any], seed: int,
                input_shape: tuple[int, ...] | None = None) -> Sequential:
    """The model ``model_cfg`` describes for per-example inputs of ``input_shape`` ((features,)
    or (C, H, W); None: the preset's own), initialised from ``seed``."""
    layers = model_layers(model_cfg, input_shape)
    return Sequential(layers, model_settings(model_cfg, seed), rngs=nnx.Rngs(params=seed))
