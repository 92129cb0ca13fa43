"""Layer by layer: each mapped layer's input, output and gradients, propagated and in shadow
mode, its proof on random input, and the models' own state after a train-mode step."""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnets.convert import torch_running_var_as_flax
from torchref.verify.capture import FlaxRunner, flat, flax_layer_vjp, torch_forward
from torchref.verify.checks import Row, judge
from torchref.verify.mapping import Mapping, torch_tensors
from torchref.verify.pair import (
    Pair,
    _np,
    flax_loss,
    model_input,
    set_mode,
    torch_input,
    torch_loss,
)


def boundary_row(t_name: str, f_name: str, mode: str, dtype: str, t_shape, f_shape,
                 check: str = "input") -> Row:
    """A passing note where a mapped layer's input differs in shape between the two sides
    (e.g. torch pads with ``F.pad`` before its Conv2d, the port pads inside ``nnx.Conv``): the
    layers' boundaries differ, so that layer's input and shadow rows cannot be compared;
    its output, the layers after it and the whole-model rows still are."""
    nothing = np.zeros(1)
    row = judge(t_name, check, f"propagated {mode}" if check == "input" else
                "alone, random input", dtype, nothing, nothing, nothing, "forward", f_name)
    row.verdict = "not comparable"
    row.detail = (f"the layers' boundaries differ (padding or reshaping outside one and inside "
                  f"the other): torch's {t_name} " + (
                      f"reads {tuple(t_shape)}, Flax's {f_name} {tuple(f_shape)}" if check ==
                      "input" else f"on {tuple(t_shape)} gives Flax's {f_name} {tuple(f_shape)}")
                  + "; the layer's rows that need one input for both are left out")
    return row


def _torch_alone(module, x: np.ndarray, cotangent: np.ndarray | None, dtype):
    """A torch layer alone (a copy: its running statistics stay): output, input grad, grads."""
    import torch

    layer = copy.deepcopy(module)
    floating = np.issubdtype(x.dtype, np.floating)  # integer ids (an Embedding): no input grad
    inp = torch.tensor(x, dtype=dtype if floating else None,
                       requires_grad=cotangent is not None and floating)
    out = layer(inp)
    if cotangent is None:
        return _np(out), None, {}
    out.backward(torch.tensor(cotangent, dtype=dtype))
    return _np(out), _np(inp.grad) if floating else None, {
        n: _np(p.grad) for n, p in layer.named_parameters() if p.grad is not None}


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
    (t_out, t_loss), t_calls = torch_forward(pair.torch, torch_input(x, dtype),
                                         torch_loss(loss, t_target))
    r_target = t_target.double() if t_target is not None and t_target.is_floating_point() \
        else t_target
    (r_out, r_loss), r_calls = torch_forward(pair.reference, torch_input(x, "float64"),
                                             torch_loss(loss, r_target))
    f_target = None if target is None else (pair.to_flax(target.astype(dtype))
                                            if target.dtype.kind == "f" else target)
    runner = FlaxRunner(pair.flax)
    f = runner.loss_and_grads(jnp.asarray(pair.to_flax(model_input(x, dtype))), f_target,
                              flax_loss(loss))
    rows = []
    tc, rc = {c.name: c for c in t_calls}, {c.name: c for c in r_calls}
    # The propagated backward is compared at one forward point, Flax's: each mapped torch
    # layer's output is replaced by Flax's (on copies, so the models' own state stays). At a
    # max-pool window whose values tie in one framework and differ by an ulp in the other (a
    # conv on an image's constant background), each side's own gradient goes to a different
    # cell, so against PyTorch's own activations a correct port's gradient can differ by the
    # gradient's full size; the forward rows judge the activations themselves.
    flax_acts = {t: pair.to_torch(np.asarray(f["outputs"][fl])) for t, fl in mapping.layers
                 if fl in f["outputs"]}
    r_at = {c.name: c for c in torch_forward(
        copy.deepcopy(pair.reference), torch_input(x, "float64"), torch_loss(loss, r_target),
        {n: a.astype(np.float64) for n, a in flax_acts.items()})[1]}
    t_at = {c.name: c for c in torch_forward(
        copy.deepcopy(pair.torch), torch_input(x, dtype), torch_loss(loss, t_target),
        flax_acts)[1]}
    m = f"{mode}"
    for t_name, f_name in mapping.layers:
        if t_name not in tc or f_name not in f["outputs"]:
            continue
        t_call, r_call, layer = tc[t_name], rc[t_name], flax_modules[f_name]

        def to_in(a, t_name=t_name):  # an input in the order the Flax layer reads it
            return mapping.input_to_flax(t_name, pair.to_flax(a))

        same_boundary = to_in(_np(t_call.input)).shape == tuple(f["inputs"][f_name].shape)
        # propagated: each side on its own previous output (the backward at Flax's, above)
        rows.append(judge(t_name, "input", f"propagated {m}", dtype,
                          np.asarray(f["inputs"][f_name]), to_in(_np(r_call.input)),
                          to_in(_np(t_call.input)), "forward", f_name) if same_boundary else
                    boundary_row(t_name, f_name, m, dtype, _np(t_call.input).shape,
                                 f["inputs"][f_name].shape))
        rows.append(judge(t_name, "forward", f"propagated {m}", dtype,
                          np.asarray(f["outputs"][f_name]), pair.to_flax(_np(r_call.output)),
                          pair.to_flax(_np(t_call.output)), "forward", f_name))
        rows.append(judge(t_name, "backward", f"propagated {m}", dtype,
                          np.asarray(f["output_grads"][f_name]),
                          pair.to_flax(_np(r_at[t_name].output.grad)),
                          pair.to_flax(_np(t_at[t_name].output.grad)), "backward", f_name))
        if not same_boundary:
            continue
        # shadow: the Flax layer alone on PyTorch's exact input and incoming gradient
        t_in, t_cot = _np(t_call.input), _np(t_call.output.grad)
        r_out_l, r_gin, r_pg = _torch_alone(r_call.module, model_input(t_in, "float64"),
                                            t_cot.astype(np.float64), torch.float64)
        t_out_l, t_gin, t_pg = _torch_alone(t_call.module, t_in, t_cot, tdt)
        f_out_l, f_gin, f_pg = flax_layer_vjp(layer, to_in(t_in), pair.to_flax(t_cot))
        rows.append(judge(t_name, "forward", f"shadow {m}", dtype, np.asarray(f_out_l),
                          pair.to_flax(r_out_l), pair.to_flax(t_out_l), "forward", f_name))
        if f_gin is not None:
            rows.append(judge(t_name, "backward", f"shadow {m}", dtype, np.asarray(f_gin),
                              to_in(r_gin), to_in(t_gin), "backward", f_name))
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

    flax_stats = {".".join(map(str, path)): np.asarray(var.get_value())
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
            x = model_input(x, pair.dtype)
        ref = _torch_alone(dict(pair.reference.named_modules())[t_name], x, None,
                           torch.float64)[0]
        own = _torch_alone(module, x, None, getattr(torch, pair.dtype))[0]
        out = flax_layer_vjp(flax_modules[f_name], mapping.input_to_flax(t_name, pair.to_flax(x)),
                             None)[0]
        if tuple(out.shape) != pair.to_flax(ref).shape:  # the layers' boundaries differ
            rows.append(boundary_row(t_name, f_name, "", pair.dtype, x.shape, out.shape,
                                     "proof"))
            continue
        rows.append(judge(t_name, "proof", "alone, random input", pair.dtype, np.asarray(out),
                          pair.to_flax(ref), pair.to_flax(own), "forward", f_name))
    return rows
