"""Experiment configs: one TOML file per experiment in ``configs/``, read by both frameworks.

A config is parsed as data (``tomllib``), merged over :data:`DEFAULTS`, and validated: every
key must exist in :data:`DEFAULTS`, have the same type, and lie in range. Nothing in a config
is ever executed. ``--set section.key=value`` overrides go through the same checks.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any

from jaxnets.errors import ConfigError

# Every valid key, with its default. A key that is not here is an error, with the closest
# valid key suggested.
DEFAULTS: dict[str, Any] = {
    "name": "",
    "description": "",
    "source": "",
    "reported_result": "",
    "seed": 0,
    "data": {
        "dataset": "fashion_mnist",
        # Images held out of the training set as a validation split (Paddle: 50k/10k/10k).
        "valid_size": 0,
        # "scale": pixels / 255 (torchvision's ToTensor); "normalize": (pixels / 255 - mean) / std.
        "preprocess": "scale",
        "mean": 0.0,
        "std": 1.0,
        # True: (N, 784) vectors; False: images, NHWC for Flax and NCHW for PyTorch.
        "flatten": True,
        # Use only the first N training images (0: all of them).
        "train_limit": 0,
        # Directory with the four IDX files ("": JAXNETS_DATA_DIR, TFDS, then Debian's package).
        "data_dir": "",
        # Seed of the generated datasets (spiral, cubic); their evaluation set uses seed + 1.
        "seed": 12345,
    },
    "model": {
        "name": "MLP",
        "in_features": 784,
        "hidden": [512, 512],
        "out_features": 10,
        "activation": "relu",
        "init": "torch",
        # Standard deviation of the "normal" init (d2l: N(0, 0.01^2) weights).
        "init_std": 0.01,
        # JAX convolutions: "auto", "lax", "canonical", "im2col" or "onednn" (jaxnets/conv.py)
        # ("auto": on the CPU oneDNN where it is built (float32), else "canonical", both
        # measured faster than lax there; lax elsewhere).
        "conv": "auto",
        # name = "Sequential": the network as a list of layer tables (jaxnets/spec.py), e.g.
        # [{type = "conv2d", out = 16, kernel = 3}, {type = "relu"}, {type = "flatten"},
        #  {type = "linear", out = 10}]; input sizes are inferred from the data.
        "layers": [],
        # Dropout masks: "shared" (NumPy, the same masks as the PyTorch side: exact
        # comparisons) or "jax" (jax.random on the device: faster, other masks).
        "dropout_masks": "shared",
    },
    "optimizer": {
        "name": "adam",
        "learning_rate": 1e-3,
        "momentum": 0.0,
        "nesterov": False,
        # sgd and adam: coupled weight decay (added to the gradient), as torch.optim.SGD/Adam
        # do; adamw: decoupled, as torch.optim.AdamW (whose own default is 1e-2: set it).
        "weight_decay": 0.0,
    },
    "train": {
        "batch_size": 100,
        "epochs": 10,
        "shuffle": True,
        "loss": "cross_entropy",
        # Print the running loss every N steps (the sources' "loss printed every 100 steps").
        "log_every": 100,
        "eval_batch_size": 1000,
        # Evaluate (and print a table row) every N epochs, and after the last.
        "eval_every": 1,
        # "accuracy": argmax == label; "rounded_accuracy": round(prediction) == label, for a
        # regression of the digit value; "none": regression without classes.
        "metric": "accuracy",
        # Train this many differently seeded models (seed, seed + 1, ...), as an ensemble.
        "ensemble": 1,
        # A NaN or Inf loss: "stop" the run (naming the epoch and step; the last checkpoint is
        # kept), or "skip" that step (no update) and count it in the epoch's skipped_steps.
        "on_nonfinite": "stop",
        # XLA:CPU's library fusions in the compiled training step and evaluation: "default"
        # (YNNPACK for dots, convolutions and reductions) or "none" (XLA's own loops and
        # Eigen), chosen per config by measurement (jaxnets.train.xla_cpu_options); no effect
        # off the CPU.
        "xla_cpu_fusions": "default",
    },
}

CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("mnist", "fashion_mnist", "spiral", "cubic"),
    "data.preprocess": ("scale", "normalize", "none"),
    "model.name": ("MLP", "LeNet", "SimpleNet", "ConvNet", "Sequential"),
    "model.dropout_masks": ("shared", "jax"),
    "model.activation": ("relu", "sigmoid", "tanh", "none"),
    "model.init": ("torch", "flax", "normal"),
    "model.conv": ("auto", "lax", "canonical", "im2col", "onednn"),
    "optimizer.name": ("sgd", "adam", "adamw"),
    "train.loss": ("cross_entropy", "mse"),
    "train.metric": ("accuracy", "rounded_accuracy", "none"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.xla_cpu_fusions": ("default", "none"),
}

# (lower bound, inclusive?) per numeric key.
RANGES: dict[str, tuple[float, bool]] = {
    "seed": (0, True),  # NumPy's generators take no negative seed
    "data.seed": (0, True),
    "optimizer.learning_rate": (0.0, False),
    "optimizer.momentum": (0.0, True),
    "optimizer.weight_decay": (0.0, True),
    "train.batch_size": (1, True),
    "train.epochs": (1, True),
    "train.log_every": (1, True),
    "train.eval_batch_size": (1, True),
    "train.eval_every": (1, True),
    "train.ensemble": (1, True),
    "model.init_std": (0.0, False),
    "data.valid_size": (0, True),
    "data.train_limit": (0, True),
    "data.std": (0.0, False),
    "model.in_features": (1, True),
    "model.out_features": (1, True),
}

_REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def config_dirs() -> list[Path]:
    """Where config names are looked up: $JAXNETS_CONFIG_DIR, ./configs, the repository's."""
    dirs = [Path(d) for d in os.environ.get("JAXNETS_CONFIG_DIR", "").split(os.pathsep) if d]
    return [*dirs, Path.cwd() / "configs", _REPO_CONFIGS]


def available_configs() -> dict[str, Path]:
    """Every config name found, mapped to its file (earlier directories win)."""
    found: dict[str, Path] = {}
    for d in reversed(config_dirs()):
        if d.is_dir():
            found.update({p.stem: p for p in sorted(d.glob("*.toml"))})
    return dict(sorted(found.items()))


def resolve_path(name_or_path: str) -> Path:
    """A config name from ``configs/`` or a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or os.sep in name_or_path:
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path!r} does not exist")
        return path
    known = available_configs()
    if name_or_path in known:
        return known[name_or_path]
    hint = difflib.get_close_matches(name_or_path, known, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ConfigError(
        f"unknown config {name_or_path!r}{suggestion}; `jaxnets list` shows the "
        f"{len(known)} available"
    )


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Load, merge over the defaults, apply ``key=value`` overrides and validate."""
    path = resolve_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # TOMLDecodeError, UnicodeDecodeError, an int of 4300+ digits
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({exc.strerror})") from None
    return config_from_dict(raw, overrides, origin=str(path), name=path.stem)


def config_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                     origin: str = "config", name: str = "") -> dict[str, Any]:
    """A config from parsed data (a TOML table, or the copy a checkpoint keeps): merged over
    the defaults, overridden and validated like a file."""
    cfg = copy.deepcopy(DEFAULTS)
    _merge(cfg, raw, DEFAULTS, prefix="", origin=origin)
    if not cfg["name"]:
        cfg["name"] = name
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def data_overrides(dataset: str | None = None, data_dir: str | os.PathLike | None = None
                   ) -> list[str]:
    """``--set`` items pointing ``[data]`` at ``dataset`` and ``data_dir`` (None: unchanged),
    as quoted TOML strings: JSON's escapes are TOML's, so paths with quotes or backslashes
    survive."""
    items = []
    if dataset is not None:
        items.append(f"data.dataset={json.dumps(str(dataset))}")
    if data_dir is not None:
        items.append(f"data.data_dir={json.dumps(str(Path(data_dir).expanduser()))}")
    return items


def parse_override(item: str) -> tuple[str, Any]:
    """``"optimizer.learning_rate=0.01"`` -> ``("optimizer.learning_rate", 0.01)``.

    The value is read as a TOML value (numbers, booleans, ``[1, 2]``, quoted strings); anything
    that is not valid TOML is taken as a bare string, so ``data.dataset=mnist`` works.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except ValueError:  # TOMLDecodeError, or an integer of 4300+ digits
        value = text.strip()
    return key, value


def apply_override(cfg: dict[str, Any], item: str) -> None:
    key, value = parse_override(item)
    *sections, leaf = key.split(".")
    node, schema, walked = cfg, DEFAULTS, []
    for section in sections:
        walked.append(section)
        if not isinstance(schema.get(section), dict):
            raise ConfigError(_unknown_key(".".join(walked), schema, ".".join(walked[:-1])))
        node, schema = node[section], schema[section]
    _set_checked(node, schema, leaf, value, prefix=".".join(sections), origin="--set")


def validate(cfg: dict[str, Any]) -> None:
    """Choices and ranges; types were checked as values came in."""
    for dotted, choices in CHOICES.items():
        value = _get(cfg, dotted)
        if value not in choices:
            raise ConfigError(
                f"{dotted} = {value!r} is not one of: {', '.join(map(repr, choices))}"
            )
    for dotted, (low, inclusive) in RANGES.items():
        value = _get(cfg, dotted)
        if value < low or (value == low and not inclusive):
            bound = f">= {low}" if inclusive else f"> {low}"
            raise ConfigError(f"{dotted} = {value!r} is out of range: it must be {bound}")
    opt = cfg["optimizer"]
    if opt["nesterov"] and (opt["name"] != "sgd" or opt["momentum"] == 0):
        raise ConfigError("optimizer.nesterov needs optimizer.name = 'sgd' and "
                          "optimizer.momentum > 0 (as torch.optim.SGD)")
    if opt["momentum"] and opt["name"] != "sgd":
        raise ConfigError(f"optimizer.momentum applies to sgd only; {opt['name']} has its own "
                          f"betas (0.9, 0.999)")
    for i, width in enumerate(cfg["model"]["hidden"]):
        if width < 1:
            raise ConfigError(f"model.hidden[{i}] = {width} is out of range: it must be >= 1")
    check_model(cfg)


# Classes of the classification datasets (labels 0 .. n - 1); cubic is a regression.
DATASET_CLASSES = {"mnist": 10, "fashion_mnist": 10, "spiral": 3}


def check_model(cfg: dict[str, Any]) -> None:
    """The layer list parses, its shapes chain from the data's input shape, and its output
    fits the loss: one output per class for cross-entropy. A ConfigError names the layer."""
    from jaxnets.spec import data_input_shape, model_layers

    model = cfg["model"]
    if model["name"] == "Sequential" and not model["layers"]:
        raise ConfigError("model.name = 'Sequential' needs model.layers, a list of layer "
                          "tables such as [{type = \"flatten\"}, {type = \"linear\", out = 10}]")
    if model["name"] != "Sequential" and model["layers"]:
        raise ConfigError(f"model.layers describes a network of its own: set model.name = "
                          f"'Sequential' (it is {model['name']!r})")
    layers = model_layers(model, data_input_shape(cfg))
    out = layers[-1].out_shape
    classes = DATASET_CLASSES.get(cfg["data"]["dataset"])
    if cfg["train"]["loss"] == "cross_entropy" and classes and out != (classes,):
        raise ConfigError(f"the model's output per example is {out}, but {cfg['data']['dataset']}"
                          f" has {classes} classes: cross_entropy needs an output of ({classes},) "
                          f"(model.out_features or the last layer's out)")


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _merge(cfg: dict, raw: dict, schema: dict, prefix: str, origin: str) -> None:
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(schema.get(key), dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: {dotted} must be a [{dotted}] table")
            _merge(cfg[key], value, schema[key], dotted, origin)
        else:
            _set_checked(cfg, schema, key, value, prefix, origin)


def _set_checked(node: dict, schema: dict, key: str, value: Any, prefix: str, origin: str) -> None:
    dotted = f"{prefix}.{key}" if prefix else key
    if key not in schema:
        raise ConfigError(f"{origin}: " + _unknown_key(dotted, schema, prefix))
    if isinstance(schema[key], dict):
        raise ConfigError(f"{origin}: {dotted} is a section; set one of its keys, e.g. "
                          f"{dotted}.{next(iter(schema[key]))}")
    node[key] = _coerce(dotted, value, schema[key], origin)


def _coerce(dotted: str, value: Any, default: Any, origin: str) -> Any:
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{origin}: {dotted} = {value} is out of range for a float") from None
    if expected is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{origin}: {dotted} must be a finite number, got {value!r}")
    if expected is int and type(value) is int and not -(2**63) <= value < 2**63:
        raise ConfigError(f"{origin}: {dotted} = {value} is out of range: TOML integers are "
                          f"64-bit")
    if expected is list and dotted == "model.layers":
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{origin}: model.layers must be a list of layer tables like "
                              f"{{type = \"relu\"}}, got {value!r}")
        return value
    if expected is list:
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{origin}: {dotted} must be a list of integers, got {value!r}")
        return value
    if type(value) is not expected:
        raise ConfigError(
            f"{origin}: {dotted} must be {_TYPE_NAMES[expected]}, got {value!r} "
            f"({_TYPE_NAMES.get(type(value), type(value).__name__)})"
        )
    return value


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "a list", dict: "a table"}


def _unknown_key(dotted: str, schema: dict, prefix: str) -> str:
    leaf = dotted.rsplit(".", 1)[-1]
    options = [f"{prefix}.{k}" if prefix else k for k in schema]
    hint = difflib.get_close_matches(dotted, options, n=1) or difflib.get_close_matches(
        leaf, list(schema), n=1
    )
    if hint and not hint[0].startswith(prefix):
        hint = [f"{prefix}.{hint[0]}" if prefix else hint[0]]
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"unknown config key {dotted!r}{suggestion}"
