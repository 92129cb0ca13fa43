"""Optimizer steps: the user's ``torch.optim`` set-up against their Optax transformation.

K steps on the given batch (train mode, dropout off), twice: **free-running** (each side from
its own previous step: accumulated drift) and **resynced** (before every step the Flax
parameters and optimizer state are reset to PyTorch's, so each row is one step's own bias).
Both are judged against PyTorch in float64 run from the same state. The optimizer state (Adam's
m, v and step count, SGD's momentum buffer) is compared after the first and the last step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxnets.errors import JaxnetsError
from torchref.verify.capture import flat
from torchref.verify.checks import Row, judge

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


def _like(params: nnx.State, values: dict[str, np.ndarray]) -> nnx.State:
    """A parameter-shaped state holding ``values`` (flax path -> array)."""
    return nnx.from_flat_state([(path, var.replace(jnp.asarray(values[".".join(map(str, path))],
                                                                var.value.dtype)))
                                for path, var in nnx.to_flat_state(params)])


class FlaxTrainer:
    """The Flax side: a jitted step (params, rest, opt_state) -> next, loss."""

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, loss_fn: Callable):
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        self.tx, self.opt_state = tx, tx.init(self.params)

        def loss(params, rest, x, target):
            model = nnx.merge(self.graphdef, params, rest, copy=True)
            value = loss_fn(model(x), target)
            return value, nnx.split(model, nnx.Param, ...)[2]

        def step(params, rest, opt_state, x, target):
            (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(params, rest, x,
                                                                          target)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), rest, opt_state, value

        self._step = jax.jit(step)

    def step(self, x, target) -> float:
        self.params, self.rest, self.opt_state, value = self._step(
            self.params, self.rest, self.opt_state, x, target)
        return float(value)


def _torch_step(model, optimizer, loss_fn, x) -> float:
    optimizer.zero_grad()
    loss = loss_fn(model(x))
    loss.backward()
    optimizer.step()
    return float(loss)


def _torch_slots(model, optimizer, mapping) -> dict[str, dict[str, np.ndarray]]:
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


def training_rows(pair, mapping, x: np.ndarray, target, loss: str, torch_optimizer: Callable,
                  flax_optimizer: optax.GradientTransformation, steps: int) -> list[Row]:
    """Rows for every step, free-running and resynced, and the optimizer state."""
    import torch

    from torchref.verify.mapping import load_into_flax
    from torchref.verify.pair import flax_loss, model_input, set_mode, torch_input, torch_loss

    if torch_optimizer is None or flax_optimizer is None:
        raise JaxnetsError("optimizer steps need both torch_optimizer and flax_optimizer")
    dtype, tdt = pair.dtype, getattr(torch, pair.dtype)
    for model in (pair.torch, pair.reference):
        set_mode(model, None, "train")
    set_mode(pair.torch, pair.flax, "train")
    load_into_flax(mapping, pair.torch, pair.flax)
    t_target = None if target is None else torch.tensor(target)
    float_target = t_target is not None and t_target.is_floating_point()
    t_loss = torch_loss(loss, t_target.to(tdt) if float_target else t_target)
    r_loss = torch_loss(loss, t_target.double() if float_target else t_target)
    f_target = None if target is None else (pair.to_flax(target.astype(dtype))
                                            if target.dtype.kind == "f" else target)
    t_x, r_x = torch_input(x, dtype), torch_input(x, "float64")
    f_x = jnp.asarray(pair.to_flax(model_input(x, dtype)))
    t_opt, r_opt = torch_optimizer(pair.torch.parameters()), torch_optimizer(
        pair.reference.parameters())
    free_ref = copy.deepcopy(pair.reference)  # float64, never resynced
    f_opt = torch_optimizer(free_ref.parameters())
    free = FlaxTrainer(pair.flax, flax_optimizer, flax_loss(loss))
    synced = FlaxTrainer(pair.flax, flax_optimizer, flax_loss(loss))
    back = {f: t for t, (f, _) in mapping.params.items()}
    rows = []

    def weights(model):
        return mapping.torch_to_flax({n: p.detach().cpu().numpy()
                                      for n, p in model.named_parameters()})

    def param_rows(mode, step, flax_params, ref, own):
        """One row per parameter tensor (in the torch model's order), named "step K: name"."""
        return [judge(f"step {step}: {back[n]}", "step", mode, dtype, flax_params[n], ref[n],
                      own[n], "step", n) for n in ref]

    for step in range(1, max(steps, 1) + 1):
        # resync: Flax and the float64 reference start this step from torch's state
        start, start_slots = weights(pair.torch), _torch_slots(pair.torch, t_opt, mapping)
        synced.params = _like(synced.params, start)
        if start_slots:
            synced.opt_state = replace_slots(synced.opt_state, {
                slot: (jnp.asarray(v["count"], jnp.int32) if slot == "step"
                       else _like(synced.params, v)) for slot, v in start_slots.items()})
        with torch.no_grad():
            for (_, p64), (_, p32) in zip(pair.reference.named_parameters(),
                                          pair.torch.named_parameters(), strict=True):
                p64.copy_(p32.double())
        _copy_optimizer_state(t_opt, r_opt)
        own_loss = _torch_step(pair.torch, t_opt, t_loss, t_x)
        ref_loss = _torch_step(pair.reference, r_opt, r_loss, r_x)
        synced_loss = synced.step(f_x, f_target)
        rows += param_rows("resynced", step, flat(synced.params), weights(pair.reference),
                           weights(pair.torch))
        rows.append(judge(f"step {step}", "loss", "resynced", dtype, np.float64(synced_loss),
                          np.float64(ref_loss), np.float64(own_loss), "step"))
        # free-running: each side from its own previous steps (accumulated drift)
        _torch_step(free_ref, f_opt, r_loss, r_x)
        free.step(f_x, f_target)
        rows += param_rows("free-running", step, flat(free.params), weights(free_ref),
                           weights(pair.torch))
        if step in (1, max(steps, 1)):
            rows += slot_rows(free, f_opt, t_opt, pair, free_ref, mapping, back,
                              f"optimizer state after step {step}")
    return rows


def _copy_optimizer_state(source, target) -> None:
    """torch float32 optimizer state -> the float64 reference optimizer (same order)."""
    import torch

    for p_src, p_dst in zip(source.state.keys(), list(target.param_groups[0]["params"]),
                            strict=False):
        target.state[p_dst] = {k: (v.detach().double() if torch.is_tensor(v) and
                                   v.is_floating_point() and v.dim() else v.clone()
                                   if torch.is_tensor(v) else v)
                               for k, v in source.state[p_src].items()}


def slot_rows(trainer: FlaxTrainer, ref_optimizer, optimizer, pair, ref_model, mapping, back,
              mode: str) -> list[Row]:
    """Adam's m, v and step count, or the momentum buffer, free-running Flax against torch
    float64 (torch float32 sets the noise bound)."""
    flax_slots = optax_slots(trainer.opt_state)
    own = _torch_slots(pair.torch, optimizer, mapping)
    ref = _torch_slots(ref_model, ref_optimizer, mapping)
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
            rows.append(judge(back.get(name, name), f"state {slot}", mode, pair.dtype,
                              found[name], array, own[slot][name], "state", name))
    return rows
