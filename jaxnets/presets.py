"""The seed networks (MLP, LeNet, SimpleNet, ConvNet) written in the layer vocabulary
(``jaxnets.spec``), with the layer names they always had (``layers.0``, ``conv1``, ``fc``), so
their weights and checkpoints load as before."""

from __future__ import annotations

from typing import Any

from jaxnets.errors import ConfigError


def preset_layers(model_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The seed networks written in the vocabulary, with today's layer names."""
    name = model_cfg["name"]
    if name == "MLP":
        act, sizes = model_cfg["activation"], [*model_cfg["hidden"], model_cfg["out_features"]]
        layers: list[dict[str, Any]] = [{"type": "flatten", "name": "flatten"}]
        for i, width in enumerate(sizes):
            layers.append({"type": "linear", "out": width, "name": f"layers.{i}"})
            if i < len(sizes) - 1 and act != "none":
                layers.append({"type": act, "name": f"{act}.{i}"})
        return layers
    if name == "Sequential":
        return model_cfg["layers"]

    def conv(n, out, kernel, padding=0):
        return {"type": "conv2d", "name": f"conv{n}", "out": out, "kernel": kernel,
                "padding": padding}

    def relu(n):
        return {"type": "relu", "name": f"relu{n}"}

    def pool(n):
        return {"type": "maxpool", "name": f"pool{n}", "kernel": 2}

    flat = {"type": "flatten", "name": "flatten"}
    if name == "LeNet":
        return [conv(1, 6, 3, 1), relu(1), pool(1), conv(2, 16, 5), relu(2), pool(2), flat,
                *({"type": "linear", "name": f"fc{i}", "out": n}
                  for i, n in ((1, 120), (2, 84), (3, 10)))]
    if name == "SimpleNet":
        return [conv(1, 20, 5, 2), relu(1), pool(1), conv(2, 20, 5, 2), relu(2), pool(2), flat,
                {"type": "linear", "name": "fc", "out": 10}]
    if name == "ConvNet":  # pool before ReLU, as the source
        return [conv(1, 10, 5), pool(1), relu(1), conv(2, 20, 5), pool(2), relu(2), flat,
                {"type": "linear", "name": "fc", "out": 10}]
    raise ConfigError(f"unknown model {name!r}")
