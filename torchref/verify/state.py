"""The state training leaves behind, compared after the steps: the optimizer's (Adam's m, v
and step count, SGD's momentum buffer) and the model's (BatchNorm running statistics), the Flax
side against PyTorch float64, in float32 within PyTorch float32's own error or an ensemble's
spread (``torchref.verify.spread``)."""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from torchref.verify.capture import flat
from torchref.verify.checks import Row, judge
from torchref.verify.spread import Ensemble, RunningVariance

# torch.optim state name -> the Optax state field holding the same quantity
OPTAX_FIELDS = {"exp_avg": "mu", "exp_avg_sq": "nu", "step": "count",
                "momentum_buffer": "trace"}


def optax_slots(state: Any, found: dict | None = None) -> dict[str, Any]:
    """``{"exp_avg": mu, "exp_avg_sq": nu, "step": count, "momentum_buffer": trace}`` from
    wherever they sit in an Optax state (chains are tuples of named tuples)."""
    found = {} if found is None else found
    if hasattr(state, "_fields"):
        for torch_name, field in OPTAX_FIELDS.items():
            if field in state._fields:
                found.setdefault(torch_name, getattr(state, field))
    if isinstance(state, tuple):
        for part in state:
            optax_slots(part, found)
    return found


def replace_slots(state: Any, values: dict[str, Any]) -> Any:
    """The Optax state with its slots replaced (the inverse of :func:`optax_slots`)."""
    if hasattr(state, "_fields"):
        changes = {f: values[t] for t, f in OPTAX_FIELDS.items()
                   if f in state._fields and t in values}
        state = state._replace(**changes)
        return type(state)(*(replace_slots(p, values) for p in state))
    if isinstance(state, tuple):
        return tuple(replace_slots(p, values) for p in state)
    return state


def torch_slots(model, optimizer, mapping) -> dict[str, dict[str, np.ndarray]]:
    """torch optimizer state per slot, in Flax paths and layouts."""
    by_param = {p: n for n, p in model.named_parameters()}
    slots: dict[str, dict[str, np.ndarray]] = {}
    for param, state in optimizer.state.items():
        for slot, value in state.items():
            array = (value.detach().cpu().numpy().copy() if hasattr(value, "detach")
                     else np.array(value))
            slots.setdefault(slot, {})[by_param[param]] = array
    out = {}
    for slot, tensors in slots.items():
        if slot == "step":
            out[slot] = {"count": next(iter(tensors.values()))}
        else:
            out[slot] = mapping.torch_to_flax(tensors)
    return out


def slot_rows(trainer, ref_optimizer, optimizer, pair, ref_model, mapping, back,
              mode: str, ensemble: Ensemble | None = None) -> list[Row]:
    """Adam's m, v and step count, or the momentum buffer, free-running Flax against torch
    float64; in float32 torch float32 sets the noise bound, or the ``ensemble``'s spread."""
    flax_slots = optax_slots(trainer.opt_state)
    own = torch_slots(pair.torch, optimizer, mapping)
    ref = torch_slots(ref_model, ref_optimizer, mapping)
    members = [] if ensemble is None else [torch_slots(m, o, mapping)
                                           for m, o in ensemble.members]
    rows = []
    for slot, tensors in ref.items():
        if slot not in flax_slots:
            continue
        value = flax_slots[slot]
        if slot == "step":
            rows.append(judge("optimizer", "state step count", mode, pair.dtype,
                              np.asarray(value, np.float64), np.float64(tensors["count"]),
                              np.float64(own[slot]["count"]), "state"))
            continue
        found = flat(value)
        for name, array in tensors.items():
            spread = None if ensemble is None else ensemble.measure(
                f"{slot} {name}", [own[slot][name], *(m[slot][name] for m in members)], array)
            rows.append(judge(back.get(name, name), f"state {slot}", mode, pair.dtype,
                              found[name], array, own[slot][name], "state", name, spread))
    return rows


def running_stat_rows(trainer, ref_model, variance: RunningVariance, pair,
                      mapping, back, ensemble: Ensemble | None, steps: int,
                      undetermined_drift: float = 0.0) -> list[Row]:
    """BatchNorm running statistics after the last step, free-running Flax against the
    float64 reference. The running variance is compared in the convention nearer the Flax
    value, torch's (unbiased batch variance, as the zoo's BatchNorm keeps it) or
    nnx.BatchNorm's (biased, :class:`RunningVariance`); the row says which."""
    found = {".".join(map(str, p)): np.asarray(v.get_value())
             for p, v in nnx.to_flat_state(trainer.rest) if isinstance(v, nnx.BatchStat)}
    buffers = [n for n, _ in ref_model.named_buffers() if n in mapping.params]

    def stats(model):
        return mapping.torch_to_flax({n: b.detach().cpu().numpy() for n, b in
                                      model.named_buffers() if n in mapping.params})

    ref, own = stats(ref_model), stats(pair.torch)
    members = [] if ensemble is None else [stats(m) for m, _ in ensemble.members]
    mode = f"running statistics after step {steps}"
    rows = []
    for torch_name in buffers:
        name = mapping.params[torch_name][0]
        if name not in found:
            continue
        reference, detail = ref[name], ""
        if torch_name in variance.biased:
            biased = mapping.torch_to_flax({torch_name: variance.biased[torch_name]})[name]
            if np.abs(found[name] - biased).max() < np.abs(found[name] - reference).max():
                reference, detail = biased, "in nnx.BatchNorm's convention (biased variance)"
        spread = None if ensemble is None else ensemble.measure(
            f"running {name}", [own[name], *(m[name] for m in members)], ref[name])
        row = judge(torch_name, "state", mode, pair.dtype, found[name], reference, own[name],
                    "trajectory" if steps > 1 else "state", name, spread)
        row.detail = detail
        if not row.passed and row.error <= row.bound + undetermined_drift:
            # a bias whose update is undetermined shifts the batch mean below it by exactly
            # its own difference: the measured drift of those entries is part of the bound
            row.bound += undetermined_drift
            row.passed, row.verdict = True, "agrees"
            row.detail = (f"{detail}; bound includes the drift {undetermined_drift:.3g} of "
                          "undetermined updates (gradient at rounding level)").lstrip("; ")
        rows.append(row)
    return rows
