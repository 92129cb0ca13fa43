"""``jaxnets summary``: every layer's name, output shape and parameter count, as
``paddle.summary`` prints them, for the Flax model here and its PyTorch twin in
``torchref.summary``, side by side.

A summary is a plain dict, the same for both frameworks::

    {"total_params": 61610,
     "layers": [{"name": "conv1", "output_shape": [-1, 28, 28, 6], "params": 60}, ...]}

Nothing is computed: the Flax model is built abstractly (``nnx.eval_shape``, no weights drawn)
and its shapes come from ``jax.eval_shape`` on a batch of one; the batch dimension is shown as
-1. A layer's params are those of the module of its step (0 for activations, pooling and
flatten). An ensemble config's summary describes one member. This module never imports torch:
the table formatter works on the two dicts only.
"""

from __future__ import annotations

from itertools import zip_longest
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnets.models import build_model
from jaxnets.spec import data_input_shape


def input_shape(cfg: dict[str, Any], layout: str) -> tuple[int, ...]:
    """One example's input batch shape: ``(1, features)`` for vectors (flattened images and
    the generated datasets), else ``(1, 28, 28, 1)`` (``"nhwc"``) or ``(1, 1, 28, 28)``
    (``"nchw"``)."""
    shape = data_input_shape(cfg)
    if len(shape) == 1 or layout == "nchw":
        return (1, *shape)
    if layout == "nhwc":
        return (1, *shape[1:], shape[0])
    raise ValueError(f"unknown layout {layout!r}")


def _num_params(module: nnx.Module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def jax_summary(cfg: dict[str, Any]) -> dict[str, Any]:
    """The summary of the Flax model ``cfg["model"]`` describes (see the module docstring)."""
    # Abstract all the way: parameters and activations are shapes only, nothing is computed.
    model = nnx.eval_shape(lambda: build_model(cfg["model"], cfg["seed"], data_input_shape(cfg)))
    graphdef, state = nnx.split(model)
    spec = jax.ShapeDtypeStruct(input_shape(cfg, "nhwc"), jnp.float32)
    outputs = jax.eval_shape(
        lambda state, x: [y for _, y in nnx.merge(graphdef, state).forward_layers(x)], state, spec)
    steps = model.steps()
    layers = [{"name": name,
               "output_shape": [-1, *out.shape[1:]],
               "params": _num_params(step) if isinstance(step, nnx.Module) else 0}
              for (name, step), out in zip(steps, outputs, strict=True)]
    return {"total_params": _num_params(model), "layers": layers}


def _shape(layer: dict[str, Any] | None) -> str:
    return "" if layer is None else "(" + ", ".join(map(str, layer["output_shape"])) + ")"


def _count(layer: dict[str, Any] | None) -> str:
    return "" if layer is None else f"{layer['params']:,}"


def format_summary(jax_side: dict[str, Any], torch_side: dict[str, Any] | None = None) -> str:
    """The side-by-side table: layer | JAX shape | PyTorch shape | JAX params | PyTorch params,
    then the totals. Rows whose names or param counts differ end in ``<- differs``. Without
    ``torch_side`` only the JAX columns are printed."""
    header = ["Layer", "JAX output shape", "PyTorch output shape", "JAX params",
              "PyTorch params"]
    rows, marks = [], []
    for j, t in zip_longest(jax_side["layers"], (torch_side or {}).get("layers", [])):
        if torch_side is None:
            rows.append([j["name"], _shape(j), "", _count(j), ""])
            marks.append(False)
            continue
        names = {layer["name"] for layer in (j, t) if layer is not None}
        rows.append([" / ".join(sorted(names)), _shape(j), _shape(t), _count(j), _count(t)])
        marks.append(j is None or t is None or len(names) > 1 or j["params"] != t["params"])
    total = ["Total params", "", "", f"{jax_side['total_params']:,}",
             "" if torch_side is None else f"{torch_side['total_params']:,}"]
    total_differs = torch_side is not None and (
        jax_side["total_params"] != torch_side["total_params"])
    columns = [0, 1, 3] if torch_side is None else [0, 1, 2, 3, 4]
    widths = {c: max(len(r[c]) for r in [header, *rows, total]) for c in columns}

    def line(row: list[str], differs: bool = False) -> str:
        cells = [row[c].rjust(widths[c]) if c >= 3 else row[c].ljust(widths[c])
                 for c in columns]
        return ("  ".join(cells) + ("  <- differs" if differs else "")).rstrip()

    rule_width = sum(widths.values()) + 2 * (len(columns) - 1)
    out = [line(header), "-" * rule_width]
    out += [line(row, mark) for row, mark in zip(rows, marks, strict=True)]
    out += ["=" * rule_width, line(total, total_differs)]
    return "\n".join(out)
