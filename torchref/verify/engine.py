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
from flax import nnx

from jaxnets import losses as jax_losses
from jaxnets.convert import activation_torch_to_flax, torch_running_var_as_flax
from jaxnets.errors import JaxnetsError
from torchref.verify.capture import FlaxRunner, flat, flax_layer_vjp, torch_forward
from torchref.verify.checks import Row, judge
from torchref.verify.mapping import Mapping, load_into_flax, propose, read_mapping, torch_tensors
from torchref.verify.report import Report, first_divergence

LOSSES = ("cross_entropy", "mse", "sum")
MODES = ("eval", "train")


def torch_loss(name: str, target) -> Callable:
    import torch.nn.functional as F

    return {"cross_entropy": lambda y: F.cross_entropy(y, target),
            "mse": lambda y: F.mse_loss(y, target), "sum": lambda y: y.sum()}[name]


def flax_loss(name: str) -> Callable:
    """The same losses in JAX (mean-reduced like PyTorch's defaults)."""
    return {"cross_entropy": jax_losses.cross_entropy, "mse": jax_losses.mse,
            "sum": lambda y, t: jnp.sum(y)}[name]


def set_mode(torch_model, flax_model: nnx.Module | None, mode: str) -> None:
    """eval, or train with every dropout rate at 0 (on the engine's own copies)."""
    from torch import nn

    torch_model.train(mode == "train")
    if flax_model is None:
        flax_model = nnx.Module()
    flax_model.train() if mode == "train" else flax_model.eval()
    if mode == "train":
        for m in torch_model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.p = 0.0
        for _, m in nnx.iter_modules(flax_model):
            if isinstance(m, nnx.Dropout):
                m.rate = 0.0


def cast_flax(model: nnx.Module, dtype: str) -> nnx.Module:
    """A copy of ``model`` with every floating-point variable in ``dtype``."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                         else a, state)
    return nnx.merge(graphdef, state)


def make_targets(loss: str, output: np.ndarray, seed: int) -> np.ndarray | None:
    """Seeded targets: class labels for cross-entropy, normal values for MSE."""
    rng = np.random.default_rng(seed + 1)
    if loss == "cross_entropy":
        if output.ndim != 2:
            raise JaxnetsError(f"--loss cross_entropy needs (batch, classes) outputs, the torch "
                               f"model gives {output.shape} (use --loss mse or sum)")
        return rng.integers(0, output.shape[1], output.shape[0])
    return rng.standard_normal(output.shape) if loss == "mse" else None


class Pair:
    """One dtype's models: the torch candidate, its float64 reference and the Flax port, with
    the weights mapped across."""

    def __init__(self, torch_model, flax_model, dtype: str, layout: str):
        self.dtype, self.layout = dtype, layout
        self.torch = copy.deepcopy(torch_model).to(getattr(__import__("torch"), dtype))
        self.reference = copy.deepcopy(torch_model).double()
        self.flax = cast_flax(flax_model, dtype)

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        """An activation in torch's layout -> the Flax model's layout."""
        return activation_torch_to_flax(array) if self.layout == "nhwc" else array


def _np(t) -> np.ndarray:
    """A copy (a NumPy view of a torch tensor follows its in-place updates)."""
    return t.detach().cpu().numpy().copy()


def _torch_alone(module, x: np.ndarray, cotangent: np.ndarray | None, dtype):
    """A torch layer alone (a copy: its running statistics stay): output, input grad, grads."""
    import torch

    layer = copy.deepcopy(module)
    inp = torch.tensor(x, dtype=dtype, requires_grad=cotangent is not None)
    out = layer(inp)
    if cotangent is None:
        return _np(out), None, {}
    out.backward(torch.tensor(cotangent, dtype=dtype))
    return _np(out), _np(inp.grad), {n: _np(p.grad) for n, p in layer.named_parameters()
                                     if p.grad is not None}


def compare_mode(pair: Pair, mapping: Mapping, x: np.ndarray, target, loss: str,
                 mode: str) -> list[Row]:
    """Every row for one mode: per mapped layer forward and backward, propagated and shadow;
    parameter gradients; the loss and output; BatchNorm running statistics (train)."""
    import torch

    dtype = pair.dtype
    tdt = getattr(torch, dtype)
    flax_modules = {".".join(map(str, p)): m for p, m in nnx.iter_modules(pair.flax)}
    set_mode(pair.torch, pair.flax, mode)
    set_mode(pair.reference, None, mode)
    before = {n: _np(b).copy() for n, b in pair.reference.named_buffers()}
    t_target = None if target is None else torch.tensor(target)
    if t_target is not None and t_target.is_floating_point():
        t_target = t_target.to(tdt)
    (t_out, t_loss), t_calls = torch_forward(pair.torch, torch.tensor(x, dtype=tdt),
                                         torch_loss(loss, t_target))
    r_target = t_target.double() if t_target is not None and t_target.is_floating_point() \
        else t_target
    (r_out, r_loss), r_calls = torch_forward(pair.reference, torch.tensor(x, dtype=torch.float64),
                                             torch_loss(loss, r_target))
    f_target = None if target is None else (pair.to_flax(target.astype(dtype))
                                            if target.dtype.kind == "f" else target)
    runner = FlaxRunner(pair.flax)
    f = runner.loss_and_grads(jnp.asarray(pair.to_flax(x.astype(dtype))), f_target,
                              flax_loss(loss))
    rows = []
    tc, rc = {c.name: c for c in t_calls}, {c.name: c for c in r_calls}
    m = f"{mode}"
    for t_name, f_name in mapping.layers:
        if t_name not in tc or f_name not in f["outputs"]:
            continue
        t_call, r_call, layer = tc[t_name], rc[t_name], flax_modules[f_name]
        # propagated: each side on its own previous output
        rows.append(judge(t_name, "input", f"propagated {m}", dtype,
                          np.asarray(f["inputs"][f_name]), pair.to_flax(_np(r_call.input)),
                          pair.to_flax(_np(t_call.input)), "forward", f_name))
        rows.append(judge(t_name, "forward", f"propagated {m}", dtype,
                          np.asarray(f["outputs"][f_name]), pair.to_flax(_np(r_call.output)),
                          pair.to_flax(_np(t_call.output)), "forward", f_name))
        rows.append(judge(t_name, "backward", f"propagated {m}", dtype,
                          np.asarray(f["output_grads"][f_name]),
                          pair.to_flax(_np(r_call.output.grad)),
                          pair.to_flax(_np(t_call.output.grad)), "backward", f_name))
        # shadow: the Flax layer alone on PyTorch's exact input and incoming gradient
        t_in, t_cot = _np(t_call.input), _np(t_call.output.grad)
        r_out_l, r_gin, r_pg = _torch_alone(r_call.module, t_in.astype(np.float64),
                                            t_cot.astype(np.float64), torch.float64)
        t_out_l, t_gin, t_pg = _torch_alone(t_call.module, t_in, t_cot, tdt)
        f_out_l, f_gin, f_pg = flax_layer_vjp(layer, pair.to_flax(t_in), pair.to_flax(t_cot))
        rows.append(judge(t_name, "forward", f"shadow {m}", dtype, np.asarray(f_out_l),
                          pair.to_flax(r_out_l), pair.to_flax(t_out_l), "forward", f_name))
        rows.append(judge(t_name, "backward", f"shadow {m}", dtype, np.asarray(f_gin),
                          pair.to_flax(r_gin), pair.to_flax(t_gin), "backward", f_name))
        f_pg = flat(f_pg)
        for p_name, g in r_pg.items():
            full = f"{t_name}.{p_name}"
            if full in mapping.params:
                target_name = mapping.params[full][0]
                ref = mapping.torch_to_flax({full: g})[target_name]
                own = mapping.torch_to_flax({full: t_pg[p_name]})[target_name]
                leaf = target_name[len(f_name) + 1:]
                rows.append(judge(full, "params", f"shadow {m}", dtype, f_pg[leaf], ref, own,
                                  "params", target_name))
    # whole-model rows: parameter gradients, loss, output
    r_grads = mapping.torch_to_flax({n: _np(p.grad) for n, p in
                                     pair.reference.named_parameters() if p.grad is not None})
    t_grads = mapping.torch_to_flax({n: _np(p.grad) for n, p in
                                     pair.torch.named_parameters() if p.grad is not None})
    f_grads = flat(f["param_grads"])
    back = {f: t for t, (f, _) in mapping.params.items()}
    for name, ref in r_grads.items():
        if name in f_grads:
            rows.append(judge(back[name], "params", f"propagated {m}", dtype, f_grads[name],
                              ref, t_grads[name], "params", name))
    rows.append(judge("loss", "loss", f"propagated {m}", dtype, np.asarray(f["loss"]),
                      _np(r_loss), _np(t_loss), "forward"))
    rows.append(judge("output", "forward", f"propagated {m}", dtype, np.asarray(f["output"]),
                      pair.to_flax(_np(r_out)), pair.to_flax(_np(t_out)), "forward"))
    if mode == "train":  # the models' own state after one train-mode forward
        counts = {c.name: c.input.numel() // c.input.shape[1] for c in r_calls
                  if c.input is not None and c.input.ndim >= 2}
        rows += state_rows(pair, mapping, f["rest"], m, before, counts)
    return rows


def state_rows(pair: Pair, mapping: Mapping, flax_rest, mode: str, before: dict,
               counts: dict[str, int]) -> list[Row]:
    """BatchNorm running statistics after the train-mode forward. torch's running variance
    is unbiased, Flax's biased: that named difference
    (:func:`jaxnets.convert.torch_running_var_as_flax`) is taken out of the reference and
    noted on the row."""
    from torch import nn

    flax_stats = {".".join(map(str, path)): np.asarray(var.value)
                  for path, var in nnx.to_flat_state(flax_rest) if isinstance(var, nnx.BatchStat)}
    ref = {n: _np(b) for n, b in pair.reference.named_buffers()}
    own = {n: _np(b) for n, b in pair.torch.named_buffers()}
    modules = dict(pair.reference.named_modules())
    for name in ref:
        layer, _, leaf = name.rpartition(".")
        module = modules.get(layer)
        if leaf == "running_var" and isinstance(module, nn.modules.batchnorm._BatchNorm):
            for values in (ref, own):
                values[name] = torch_running_var_as_flax(
                    values[name], before[name], module.momentum, counts[layer])
    ref, own = mapping.torch_to_flax(ref), mapping.torch_to_flax(own)
    back = {f: t for t, (f, _) in mapping.params.items()}
    rows = []
    for name, value in flax_stats.items():
        if name in ref:
            row = judge(back[name], "state", f"after step {mode}", pair.dtype, value,
                        ref[name], own[name], "state", name)
            if back[name].endswith("running_var"):
                row.detail = ("reference adjusted by torch_running_var_as_flax: torch keeps "
                              "the unbiased batch variance, Flax the biased one")
            rows.append(row)
    return rows


def prove_mapping(pair: Pair, mapping: Mapping, t_calls, seed: int) -> list[Row]:
    """Each mapped layer alone, from both frameworks, on seeded random input of the shape it
    sees in the model (eval mode)."""
    import torch

    rng = np.random.default_rng(seed + 2)
    calls = {c.name: c for c in t_calls}
    flax_modules = {".".join(map(str, p)): m for p, m in nnx.iter_modules(pair.flax)}
    rows = []
    for t_name, f_name in mapping.layers:
        if t_name not in calls:
            continue
        module = calls[t_name].module
        x = rng.standard_normal(calls[t_name].input.shape)
        if torch_tensors(module).get("weight") is not None and calls[t_name].input.dtype in (
                torch.int32, torch.int64):  # an embedding: integer input
            x = rng.integers(0, module.num_embeddings, calls[t_name].input.shape)
        else:
            x = x.astype(pair.dtype)
        ref = _torch_alone(dict(pair.reference.named_modules())[t_name], x, None,
                           torch.float64)[0]
        own = _torch_alone(module, x, None, getattr(torch, pair.dtype))[0]
        out = flax_layer_vjp(flax_modules[f_name], pair.to_flax(x), None)[0]
        rows.append(judge(t_name, "proof", "alone, random input", pair.dtype, np.asarray(out),
                          pair.to_flax(ref), pair.to_flax(own), "forward", f_name))
    return rows


def verify_dtype(torch_model, flax_model, x: np.ndarray, targets, loss: str, dtype: str,
                 layout: str, mapping: Mapping | str | None, seed: int,
                 modes: tuple[str, ...] = MODES) -> tuple[list[Row], Mapping, list]:
    """Every row for one dtype, the mapping used, and the torch execution order."""
    import torch

    pair = Pair(torch_model, flax_model, dtype, layout)
    set_mode(pair.torch, pair.flax, "eval")
    set_mode(pair.reference, None, "eval")
    with torch.no_grad():
        _, t_calls = torch_forward(pair.torch, torch.tensor(x, dtype=getattr(torch, dtype)))
    runner = FlaxRunner(pair.flax)
    try:
        runner.forward(jnp.asarray(pair.to_flax(x.astype(dtype))))
    except (TypeError, ValueError) as exc:
        raise JaxnetsError(f"the Flax model rejects input {pair.to_flax(x).shape} "
                           f"({str(exc).splitlines()[0]})") from None
    if isinstance(mapping, Mapping):
        used = mapping
    elif mapping:
        used = read_mapping(mapping, pair.torch, pair.flax)
    else:
        used = propose(pair.torch, pair.flax, [c.name for c in t_calls], runner.order)
    load_into_flax(used, pair.torch, pair.flax)
    rows = prove_mapping(pair, used, t_calls, seed)
    for mode in modes:
        rows += compare_mode(pair, used, x, targets, loss, mode)
    return rows, used, [c.name for c in t_calls]


def verify(torch_model, flax_model, inputs: np.ndarray, *, targets: np.ndarray | None = None,
           loss: str = "cross_entropy", torch_optimizer: Callable | None = None,
           flax_optimizer: Any = None, steps: int = 0, dtype: str = "float32",
           mapping: Mapping | str | None = None, out: str | None = None,
           flax_layout: str = "nhwc", seed: int = 0,
           modes: tuple[str, ...] = MODES) -> Report:
    """Verify that ``flax_model`` (an NNX module) computes what ``torch_model`` (an
    ``nn.Module``) computes. ``inputs``: a NumPy array in PyTorch's layout (4-D inputs reach
    the Flax model as NHWC unless ``flax_layout="same"``). ``dtype``: "float32", "float64" or
    "both". ``modes``: eval and train (dropout off) by default. Returns a :class:`Report` (``passed``, ``first_divergent_layer``, ``verdict``,
    ``rows``); with ``out`` also writes report.json, report.md, mapping.toml and a figure."""
    import torch

    if loss not in LOSSES:
        raise JaxnetsError(f"loss {loss!r}: choose one of {', '.join(LOSSES)}")
    x = np.asarray(inputs)
    dtypes = ["float32", "float64"] if dtype == "both" else [dtype]
    if "float64" in dtypes and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    with torch.no_grad():
        try:
            probe = _np(copy.deepcopy(torch_model).eval()(torch.tensor(x.astype(np.float32))))
        except Exception as exc:  # any error the user's model raises on this input
            raise JaxnetsError(f"the torch model rejects input {x.shape} "
                               f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                               ) from None
    if targets is None:
        targets = make_targets(loss, probe, seed)
    rows, used, order = [], None, []
    for dt in dtypes:
        dt_rows, used, order = verify_dtype(torch_model, flax_model, x, targets, loss, dt,
                                            flax_layout, used or mapping, seed, modes)
        rows += dt_rows
    if steps or torch_optimizer is not None:
        from torchref.verify.training import training_rows

        for dt in dtypes:
            rows += training_rows(Pair(torch_model, flax_model, dt, flax_layout), used, x,
                                  targets, loss, torch_optimizer, flax_optimizer, steps)
    report = Report(rows=rows, mapping=used, torch_order=order, dtype=dtype)
    report.first_divergent_layer, report.verdict = first_divergence(report)
    report.passed = report.first_divergent_layer is None and not used.problems
    if out is not None:
        report.write(out)
    return report


def assert_port_equivalent(*args, **kwargs) -> Report:
    """:func:`verify`, raising AssertionError naming the first divergent layer and its
    figures when the pair is not equivalent."""
    report = verify(*args, **kwargs)
    if not report.passed:
        raise AssertionError(report.verdict)
    return report
