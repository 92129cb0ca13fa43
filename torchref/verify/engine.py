"""The verification engine: a user's PyTorch module and their Flax NNX port, compared layer by
layer, forward and backward, in eval and train mode, against PyTorch in float64.

Per mapped layer and mode: *propagated* (each side on its own previous output) and *shadow*
(the Flax layer run alone on PyTorch's exact input, and its VJP fed PyTorch's exact incoming
gradient), so a layer's own error is told apart from the error it inherits (PyTorch Numeric
Suite's shadow mode, across frameworks). Dropout is switched off in train mode (the two
frameworks draw different masks); BatchNorm uses batch statistics there and its running
statistics are compared after the step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets.errors import JaxnetsError
from torchref.verify.capture import FlaxRunner, torch_forward
from torchref.verify.checks import Row
from torchref.verify.layerwise import compare_mode, prove_mapping
from torchref.verify.mapping import (
    Mapping,
    load_into_flax,
    propose,
    prove_flatten_orders,
    read_mapping,
)
from torchref.verify.pair import (
    LOSSES,
    MODES,
    Pair,
    _np,
    make_targets,
    model_input,
    set_mode,
    torch_input,
)
from torchref.verify.report import Report, first_divergence


def verify_dtype(torch_model, flax_model, x: np.ndarray, targets, loss: str, dtype: str,
                 layout: str, mapping: Mapping | str | None, seed: int,
                 modes: tuple[str, ...] = MODES, load: Callable | None = None
                 ) -> tuple[list[Row], Mapping, list]:
    """Every row for one dtype, the mapping used, and the torch execution order."""
    import torch

    pair = Pair(torch_model, flax_model, dtype, layout)
    set_mode(pair.torch, pair.flax, "eval")
    set_mode(pair.reference, None, "eval")
    with torch.no_grad():
        t_out, t_calls = torch_forward(pair.torch, torch_input(x, dtype))
    runner = FlaxRunner(pair.flax)
    try:
        f_out = runner.forward(jnp.asarray(pair.to_flax(model_input(x, dtype))))[0]
    except Exception as exc:  # any error the user's Flax module raises on this input
        text = str(exc).strip()
        raise JaxnetsError(f"the Flax model rejects input {pair.to_flax(x).shape} "
                           f"({text.splitlines()[0] if text else type(exc).__name__})") from None
    expected = pair.to_flax(_np(t_out)).shape
    if tuple(f_out.shape) != expected:
        raise JaxnetsError(f"output shapes differ: torch {tuple(t_out.shape)} (in the Flax "
                           f"layout {expected}), flax {tuple(f_out.shape)}")
    if isinstance(mapping, Mapping):
        used = mapping
    elif mapping:
        used = read_mapping(mapping, pair.torch, pair.flax)
    else:
        used = propose(pair.torch, pair.flax, [c.name for c in t_calls], runner.order)
    load = load or (lambda t, f: load_into_flax(used, t, f))
    load(pair.torch, pair.flax)
    if not isinstance(mapping, Mapping) and not mapping:  # a proposal: prove flatten orders
        flax_inputs = FlaxRunner(pair.flax).forward(
            jnp.asarray(pair.to_flax(model_input(x, dtype))))[1]
        if prove_flatten_orders(used, t_calls, flax_inputs):
            load(pair.torch, pair.flax)
    rows = prove_mapping(pair, used, t_calls, seed)
    for mode in modes:
        rows += compare_mode(pair, used, x, targets, loss, mode)
    return rows, used, [c.name for c in t_calls]


def verify(torch_model, flax_model, inputs: np.ndarray, *, targets: np.ndarray | None = None,
           loss: str = "cross_entropy", torch_optimizer: Callable | None = None,
           flax_optimizer: Any = None, steps: int = 0, dtype: str = "float32",
           mapping: Mapping | str | None = None, out: str | None = None,
           flax_layout: str = "nhwc", seed: int = 0,
           modes: tuple[str, ...] = MODES, load: Callable | None = None) -> Report:
    """Verify that ``flax_model`` (an NNX module) computes what ``torch_model`` (an
    ``nn.Module``) computes. ``inputs``: a NumPy array in PyTorch's layout (4-D inputs reach
    the Flax model as NHWC unless ``flax_layout="same"``; ``"channels_last"`` moves the channel
    axis last at every rank >= 3, NCL -> NLC for a Conv1d model). ``dtype``: "float32", "float64" or
    "both". ``modes``: eval and train (dropout off) by default. Returns a :class:`Report`
    (``passed``, ``first_divergent_layer``, ``verdict``, ``rows``); with ``out`` also writes
    report.json, report.md, mapping.toml and a figure. ``load(torch_model, flax_model)``, if
    given, sets the Flax weights instead of the mapping (``jaxnets parity`` passes its
    converter, and its tests a deliberately wrong one)."""
    import torch

    if loss not in LOSSES:
        raise JaxnetsError(f"loss {loss!r}: choose one of {', '.join(LOSSES)}")
    x = np.asarray(inputs)
    dtypes = ["float32", "float64"] if dtype == "both" else [dtype]
    with torch.no_grad():
        try:
            own = next(torch_model.parameters(), torch.zeros(())).dtype  # the model's dtype
            probe = _np(copy.deepcopy(torch_model).eval()(torch_input(x, str(own)[6:])))
        except Exception as exc:  # any error the user's model raises on this input
            raise JaxnetsError(f"the torch model rejects input {x.shape} "
                               f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                               ) from None
    if targets is None:
        targets = make_targets(loss, probe, seed)
    rows, used, order = [], None, []
    for dt in dtypes:
        with _x64(dt):
            dt_rows, used, order = verify_dtype(torch_model, flax_model, x, targets, loss, dt,
                                                flax_layout, used or mapping, seed, modes, load)
        rows += dt_rows
    if steps or torch_optimizer is not None:
        from torchref.verify.training import training_rows

        for dt in dtypes:
            with _x64(dt):
                rows += training_rows(Pair(torch_model, flax_model, dt, flax_layout), used,
                                      [(x, targets)] * max(steps, 1), loss, torch_optimizer,
                                      flax_optimizer, seed=seed)
    report = Report(rows=rows, mapping=used, torch_order=order, dtype=dtype)
    report.first_divergent_layer, report.verdict, report.divergent_row = \
        first_divergence(report)
    report.passed = report.first_divergent_layer is None and not used.problems
    if out is not None:
        report.write(out)
    return report


def _x64(dtype: str):
    """JAX's x64 mode on exactly for the float64 checks, scoped: a float64 verify leaves the
    caller's process as it found it (float32 work beside it stays float32)."""
    return jax.enable_x64(dtype == "float64")


def assert_port_equivalent(*args, **kwargs) -> Report:
    """:func:`verify`, raising AssertionError naming the first divergent layer and its
    figures when the pair is not equivalent."""
    report = verify(*args, **kwargs)
    if not report.passed:
        raise AssertionError(report.verdict)
    return report
