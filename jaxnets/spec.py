"""The layer vocabulary: framework-neutral layer specs read from a config's ``[model] layers``,
checked and shape-inferred in plain Python before either framework builds anything.

A :class:`Layer` is one entry of the list (``{type = "conv2d", out = 16, kernel = 3}``) with
its defaults filled in, a stable ``name`` and the per-example shapes it maps, in PyTorch's
order: ``(features,)`` for vectors, ``(C, H, W)`` for images. ``jaxnets.layers`` and
``torchref.layers`` each build every type of :data:`LAYER_KEYS`; the seed networks (MLP, LeNet,
SimpleNet, ConvNet) are presets (``jaxnets.presets``) written in the same vocabulary.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from jaxnets.errors import ConfigError
from jaxnets.presets import preset_layers

REQUIRED = object()
PAIR = "an integer or a pair of integers"

# Every layer type with its keys and their defaults (REQUIRED: no default). "name" and "type"
# are accepted everywhere.
LAYER_KEYS: dict[str, dict[str, Any]] = {
    "linear": {"out": REQUIRED, "bias": True},
    "conv2d": {"out": REQUIRED, "kernel": REQUIRED, "stride": 1, "padding": 0, "dilation": 1,
               "groups": 1, "bias": True},
    "flatten": {}, "relu": {}, "tanh": {}, "sigmoid": {}, "silu": {},
    "gelu": {"approximate": False},  # PyTorch's default: the exact erf form
    "leaky_relu": {"slope": 0.01},
    "softmax": {}, "log_softmax": {},
    "maxpool": {"kernel": REQUIRED, "stride": 0, "padding": 0, "ceil_mode": False},
    "avgpool": {"kernel": REQUIRED, "stride": 0, "padding": 0, "ceil_mode": False,
                "count_include_pad": True},
    "global_avgpool": {},
    "batchnorm": {"momentum": 0.1, "eps": 1e-5},  # momentum in PyTorch's convention
    "layernorm": {"eps": 1e-5},  # PyTorch's default eps
    "dropout": {"rate": REQUIRED},
    "residual": {"layers": REQUIRED},
}

# Layers that hold parameters or state, so each side registers a module under their name.
STATEFUL = ("linear", "conv2d", "batchnorm", "layernorm", "dropout", "residual")
_NAME = re.compile(r"^[A-Za-z_]\w*(\.\d+)?$")


@dataclass
class Layer:
    """One layer: its type, name, options (every key of its type) and shapes.
    ``index`` is its position in depth-first order (dropout masks are drawn per index)."""

    type: str
    name: str
    options: dict[str, Any]
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    layers: list[Layer] = field(default_factory=list)  # a residual's branch
    projection: dict[str, Any] | None = None  # a residual's 1x1 projection: {"stride": s} / {}
    index: int = 0
    path: str = ""  # where the config wrote it: "model.layers[4].layers[0]"

    def where(self) -> str:
        return f"layer {self.name!r} ({self.type})"


def pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    """An int or a pair -> a 2-tuple (kernel, stride, dilation, padding)."""
    return (value, value) if isinstance(value, int) else tuple(value)


def _check_value(key: str, value: Any, default: Any, where: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r} must be {expected}")

    is_int = isinstance(value, int) and not isinstance(value, bool)
    if key in ("kernel", "stride", "dilation", "padding"):
        if key == "padding" and value in ("same", "valid"):
            return value
        ok = is_int or (isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value))
        if not ok:
            raise bad(PAIR + (', "same" or "valid"' if key == "padding" else ""))
        low = 0 if key == "padding" else 1
        if min(pair(value)) < low:
            raise bad(f">= {low}")
        return pair(value)
    if key == "layers":
        if not isinstance(value, list) or not value:
            raise bad("a non-empty list of layer tables")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, float) or key in ("rate",):
        if not (is_int or isinstance(value, float)) or not math.isfinite(value):
            raise bad("a number")
        value = float(value)
        if key == "rate" and not 0.0 <= value < 1.0:
            raise bad("in [0, 1)")
        if (key in ("eps",) and value <= 0) or (key == "momentum" and not 0.0 <= value <= 1.0):
            raise bad("> 0" if key == "eps" else "in [0, 1]")
        return value
    if not is_int or value < 1:
        raise bad("an integer >= 1")
    return value


def parse_layers(raw: Any, where: str = "model.layers") -> list[Layer]:
    """The config's list of layer tables as :class:`Layer` s (shapes not yet inferred)."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where} must be a non-empty list of layer tables")
    layers, names = [], set()
    for i, table in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{at} must be a table like {{type = \"relu\"}}, got {table!r}")
        kind = table.get("type")
        if kind not in LAYER_KEYS:
            import difflib
            hint = difflib.get_close_matches(str(kind), LAYER_KEYS, n=1)
            raise ConfigError(f"{at}: unknown layer type {kind!r}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + f"; known: {', '.join(LAYER_KEYS)}")
        name = table.get("name", f"{kind}_{i}")
        if not isinstance(name, str) or not _NAME.match(name) or name in names:
            raise ConfigError(f"{at}: name {name!r} must be unique in its list and look like "
                              f"'conv1' or 'layers.0'")
        names.add(name)
        at = f"{at} {name!r}"
        schema = LAYER_KEYS[kind]
        for key in table:
            if key not in schema and key not in ("type", "name"):
                raise ConfigError(f"{at}: unknown key {key!r} for {kind}; it takes: "
                                  f"{', '.join(schema) or 'no options'}")
        options = {}
        for key, default in schema.items():
            if key not in table:
                if default is REQUIRED:
                    raise ConfigError(f"{at}: {kind} needs {key!r}")
                options[key] = pair(default) if key in ("stride", "dilation", "padding") \
                    else default
            else:
                options[key] = _check_value(key, table[key], default, at)
        layer = Layer(kind, name, options, path=f"{where}[{i}]")
        if kind == "residual":
            layer.layers = parse_layers(options.pop("layers"), f"{where}[{i}].layers")
        layers.append(layer)
    _check_indexed_names(layers, where)
    return layers


def _check_indexed_names(layers: list[Layer], where: str) -> None:
    """Modules named ``prefix.N`` live in a list on both sides: their N counts up from 0."""
    counts: dict[str, int] = {}
    for layer in layers:
        prefix, _, number = layer.name.partition(".")
        if number and layer.type in STATEFUL:
            if int(number) != counts.get(prefix, 0) or prefix in {
                    other.name for other in layers}:
                raise ConfigError(f"{where}: {layer.where()}: indexed names of layers with "
                                  f"weights must count {prefix}.0, {prefix}.1, ... in order")
            counts[prefix] = int(number) + 1


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    # Framework difference: "same" padding puts the odd extra pixel at the END (Flax, TF);
    # PyTorch's padding="same" refuses stride > 1, so both sides get these explicit pads.
    out = -(-size // stride)
    total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    return total // 2, total - total // 2


def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    # Framework difference: ceil_mode (PyTorch) keeps a last partial window, but never one that
    # starts inside the right padding; Flax's pools have no ceil_mode (jaxnets.pooling pads).
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def pool_options(layer: Layer) -> dict[str, Any]:
    """A maxpool/avgpool layer's options as both frameworks' pools take them (``kernel``,
    ``stride``, ``padding``, ``ceil_mode``, and ``count_include_pad`` for avgpool)."""
    keys = ("kernel", "stride", "padding", "ceil_mode", "count_include_pad")
    return {key: layer.options[key] for key in keys if key in layer.options}


def conv_pads(layer: Layer, shape: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Explicit ((top, bottom), (left, right)) padding of a conv2d on a (C, H, W) input."""
    o = layer.options
    if o["padding"] == "valid":
        return (0, 0), (0, 0)
    if o["padding"] == "same":
        return tuple(same_padding(shape[1 + i], o["kernel"][i], o["stride"][i],
                                  o["dilation"][i]) for i in range(2))
    return tuple((p, p) for p in o["padding"])


def _fail(layer: Layer, shape: tuple[int, ...], problem: str) -> ConfigError:
    return ConfigError(f"{layer.path} {layer.where()} on input {shape}: {problem}")


def _out_shape(layer: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-example output shape, or a ConfigError naming the layer and shapes."""
    kind, o = layer.type, layer.options
    image = len(shape) == 3
    if kind in ("linear", "layernorm") and image:
        raise _fail(layer, shape, f"{kind} needs a vector: add {{type = \"flatten\"}} before it")
    if kind in ("conv2d", "maxpool", "avgpool", "global_avgpool") and not image:
        raise _fail(layer, shape, f"{kind} needs an image (C, H, W); the data or an earlier "
                                  f"flatten made vectors (set data.flatten = false?)")
    if kind == "linear":
        return (o["out"],)
    if kind == "flatten":
        return (math.prod(shape),)
    if kind == "global_avgpool":
        return (shape[0],)
    if kind == "conv2d":
        if shape[0] % o["groups"] or o["out"] % o["groups"]:
            raise _fail(layer, shape, f"groups = {o['groups']} must divide the input channels "
                                      f"({shape[0]}) and out ({o['out']})")
        pads = conv_pads(layer, shape)
        size = [(shape[1 + i] + sum(pads[i]) - o["dilation"][i] * (o["kernel"][i] - 1) - 1)
                // o["stride"][i] + 1 for i in range(2)]
        if min(size) < 1:
            raise _fail(layer, shape, f"kernel {o['kernel']} is larger than the padded input")
        return (o["out"], *size)
    if kind in ("maxpool", "avgpool"):
        stride = o["stride"] if min(o["stride"]) else o["kernel"]
        o["stride"] = stride
        if any(2 * p > k for p, k in zip(o["padding"], o["kernel"], strict=True)):
            raise _fail(layer, shape, f"padding {o['padding']} must be at most half the kernel "
                                      f"{o['kernel']}")
        if any(k > shape[1 + i] + 2 * o["padding"][i] for i, k in enumerate(o["kernel"])):
            raise _fail(layer, shape, f"pool kernel {o['kernel']} is larger than its input")
        return (shape[0], *(pool_output_size(shape[1 + i], o["kernel"][i], stride[i],
                                             o["padding"][i], o["ceil_mode"]) for i in range(2)))
    if kind == "residual":
        return _residual_shape(layer, shape)
    return shape  # activations, softmax, batchnorm, dropout


def _residual_shape(layer: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = infer_shapes(layer.layers, shape, layer.index + 1)
    layer.projection = None
    if out == shape:
        return out
    if len(out) == 1 and len(shape) == 1:
        layer.projection = {"kind": "linear"}
        return out
    if len(out) == 3 and len(shape) == 3:
        for stride in range(1, max(shape[1:]) + 1):
            if all((shape[1 + i] - 1) // stride + 1 == out[1 + i] for i in range(2)):
                layer.projection = {"kind": "conv2d", "stride": stride}
                return out
    raise _fail(layer, shape, f"its branch gives {out}, and no 1x1 projection maps {shape} to "
                              f"it: change the branch so its output fits its input")


def infer_shapes(layers: list[Layer], shape: tuple[int, ...], start: int = 0
                 ) -> tuple[int, ...]:
    """Annotate every layer with its per-example in/out shapes and depth-first ``index``;
    returns the last output shape."""
    index = start
    for layer in layers:
        layer.index = index
        layer.in_shape = tuple(shape)
        shape = layer.out_shape = tuple(_out_shape(layer, tuple(shape)))
        index += 1 + count_layers(layer.layers)
    return shape


def count_layers(layers: list[Layer]) -> int:
    return sum(1 + count_layers(layer.layers) for layer in layers)


IMAGE_SHAPE = (1, 28, 28)
GENERATED_FEATURES = {"spiral": 2, "cubic": 1}


def data_input_shape(cfg: dict[str, Any]) -> tuple[int, ...]:
    """One example's shape as the config's data feeds it: (features,) or (C, H, W)."""
    dataset = cfg["data"]["dataset"]
    if dataset in GENERATED_FEATURES:
        return (GENERATED_FEATURES[dataset],)
    return (math.prod(IMAGE_SHAPE),) if cfg["data"]["flatten"] else IMAGE_SHAPE


def default_input_shape(model_cfg: dict[str, Any]) -> tuple[int, ...]:
    """The per-example input a model expects when no data says otherwise: the MLP's
    ``in_features``, else one 28x28 grey image."""
    return (model_cfg["in_features"],) if model_cfg["name"] == "MLP" else IMAGE_SHAPE


def model_layers(model_cfg: dict[str, Any], input_shape: tuple[int, ...] | None = None
                 ) -> list[Layer]:
    """The checked, shape-annotated layers of ``model_cfg`` on ``input_shape`` (per example,
    (features,) or (C, H, W); None: :func:`default_input_shape`)."""
    shape = tuple(input_shape or default_input_shape(model_cfg))
    layers = parse_layers(preset_layers(model_cfg))
    if model_cfg["name"] == "MLP" and math.prod(shape) != model_cfg["in_features"]:
        raise ConfigError(f"model.in_features = {model_cfg['in_features']}, but the data gives "
                          f"{math.prod(shape)} features per example {shape}")
    infer_shapes(layers, shape)
    return layers


def walk(layers: list[Layer]):
    """Every layer, depth-first (a residual, then its branch)."""
    for layer in layers:
        yield layer
        yield from walk(layer.layers)
