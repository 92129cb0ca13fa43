"""``jaxnets verify``'s front end: the user's factories, inputs and optimizers from the command
line, then the engine. Factories are imported only from the paths the user names:
``package.module:factory`` or ``path/to/file.py:factory``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxnets.errors import ConfigError, JaxnetsError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def load_factory(spec: str, option: str) -> Callable:
    """``"a/b.py:make"`` or ``"pkg.mod:make"`` -> the callable ``make``."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ConfigError(f"{option} {spec}: expected MODULE:FACTORY or FILE.py:FACTORY")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"{option} {spec}: no file {where}")
        module_name = f"_jaxnets_verify_{option.strip('-')}_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # the user's own module failed to import
            raise JaxnetsError(f"{option} {spec}: importing {where} failed: "
                               f"{_first_line(exc)}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            if exc.name and where.startswith(exc.name):
                raise ConfigError(f"{option} {spec}: no module {where}") from None
            raise JaxnetsError(f"{option} {spec}: importing {where} failed: "
                               f"{_first_line(exc)}") from None
        except Exception as exc:
            raise JaxnetsError(f"{option} {spec}: importing {where} failed: "
                               f"{_first_line(exc)}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"{option} {spec}: {where} has no callable {name}")
    return factory


def _built(factory: Callable, spec: str, option: str, expected: type, kind: str, **kwargs):
    """The model ``factory`` (named ``spec``) returns when called with ``kwargs``, checked to be
    ``expected``; a factory that raises or returns something else is one line."""
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise JaxnetsError(f"{option} {spec}: the factory raised {_first_line(exc)}") from None
    if not isinstance(model, expected):
        raise ConfigError(f"{option} {spec}: returned {type(model).__name__}, not a {kind}")
    return model


def build_torch(spec: str):
    from torch import nn

    return _built(load_factory(spec, "--torch"), spec, "--torch", nn.Module, "torch.nn.Module")


def build_flax(spec: str, seed: int):
    """The Flax factory may take ``rngs`` (an ``nnx.Rngs(seed)`` is passed)."""
    from flax import nnx

    factory = load_factory(spec, "--flax")
    try:
        takes_rngs = "rngs" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_rngs = False
    return _built(factory, spec, "--flax", nnx.Module, "flax.nnx Module",
                  **({"rngs": nnx.Rngs(seed)} if takes_rngs else {}))


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise ConfigError(f"--input-shape {text}: expected positive integers separated by "
                          f"commas, e.g. 8,1,28,28")
    return shape


def read_inputs(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """An ``.npz`` with ``inputs`` (or its first array) and optionally ``targets``."""
    try:
        with np.load(path) as data:
            names = list(data.files)
            if not names:
                raise ConfigError(f"--inputs {path}: holds no arrays")
            inputs = data["inputs" if "inputs" in names else names[0]]
            targets = data["targets"] if "targets" in names else None
    except FileNotFoundError:
        raise ConfigError(f"--inputs {path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--inputs {path}: not a readable .npz ({_first_line(exc)})") from None
    return inputs, targets


def optimizers(name: str | None, lr: float, momentum: float, weight_decay: float
               ) -> tuple[Callable | None, Any]:
    """The PyTorch optimizer factory and its Optax twin (jaxnets' named transformations)."""
    if name is None:
        return None, None
    from jaxnets.optim import make_optimizer as make_optax
    from torchref.optim import make_optimizer as make_torch

    cfg = {"name": name, "learning_rate": lr, "momentum": momentum, "nesterov": False,
           "weight_decay": weight_decay}
    return (lambda params: make_torch(cfg, params)), make_optax(cfg)


def run(args) -> int:
    """Build both models and the inputs from ``args``, verify, print the verdict."""
    shape = parse_shape(args.input_shape) if args.input_shape else None
    if args.inputs:
        inputs, targets = read_inputs(args.inputs)
    elif shape:
        inputs = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
        targets = None
    else:
        raise ConfigError("give --input-shape N,C,H,W or --inputs FILE.npz")
    if args.steps < 0:
        raise ConfigError(f"--steps {args.steps}: give 0 or more")
    if args.steps and not args.optimizer:
        raise ConfigError(f"--steps {args.steps}: name the optimizer (--optimizer sgd|adam|"
                          f"adamw --lr X)")
    torch_model = build_torch(args.torch)
    flax_model = build_flax(args.flax, args.seed)
    torch_opt, flax_opt = optimizers(args.optimizer, args.lr, args.momentum, args.weight_decay)
    from torchref.verify.engine import verify

    out = Path(args.out or "runs/verify")
    report = verify(torch_model, flax_model, inputs, targets=targets, loss=args.loss,
                    torch_optimizer=torch_opt, flax_optimizer=flax_opt, steps=args.steps,
                    dtype=args.dtype, mapping=args.mapping, out=out,
                    flax_layout=args.flax_layout, seed=args.seed)
    print(report.verdict)
    print(f"report: {out / 'report.md'} and {out / 'report.json'}; mapping: "
          f"{out / 'mapping.toml'} (edit and pass back with --mapping)")
    return 0 if report.passed else 1
