"""Optimizer steps: a ``torch.optim`` set-up against an Optax transformation, the one engine
behind ``jaxnets verify --steps`` (the user's batch, repeated) and ``jaxnets parity``'s step and
trajectory checks (a config's first K batches, one per step).

Each step twice: **resynced** (before the step the Flax parameters and optimizer state are
reset to PyTorch's, so a row is that step's own bias; float32 passes within ``NOISE_MARGIN``
times PyTorch float32's own error plus a floor, ``torchref.verify.checks``) and
**free-running** (each side from its own previous steps: accumulated drift; float32 passes
within the spread of an ensemble of one-ulp-moved PyTorch runs, ``torchref.verify.spread``).
Both against PyTorch float64 run from the same state; float64 within the tight tolerances, with
updates at the rounding level reported as undetermined, and a step that misses its tolerance
judged once more against the reference optimizer fed Flax's own gradients (:func:`fed_step`)
where those gradients agree with the reference's. Train mode: batch statistics, the models'
own dropout masks. The optimizer state is compared after the first and the last step,
BatchNorm's running statistics after the last (``torchref.verify.state``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxnets.errors import JaxnetsError
from torchref.verify.capture import flat
from torchref.verify.checks import Row, judge
from torchref.verify.spread import Ensemble, RunningVariance, undetermined
from torchref.verify.state import replace_slots, running_stat_rows, slot_rows, torch_slots


def _like(params: nnx.State, values: dict[str, np.ndarray]) -> nnx.State:
    """A parameter-shaped state holding ``values`` (flax path -> array)."""
    return nnx.from_flat_state([(path, var.replace(jnp.asarray(values[".".join(map(str, path))],
                                                                var.get_value().dtype)))
                                for path, var in nnx.to_flat_state(params)])


class FlaxTrainer:
    """The Flax side: a jitted step (params, rest, opt_state) -> next, loss. ``apply(model,
    x)`` runs the model in train mode (default ``model(x)`` after ``model.train()``; the zoo's
    models take ``train=True`` as an argument)."""

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, loss_fn: Callable,
                 apply: Callable | None = None):
        apply = apply or (lambda module, x: module(x))
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        self.tx, self.opt_state = tx, tx.init(self.params)

        def loss(params, rest, x, target):
            model = nnx.merge(self.graphdef, params, rest, copy=True)
            value = loss_fn(apply(model, x), target)
            return value, nnx.split(model, nnx.Param, ...)[2]

        def step(params, rest, opt_state, x, target):
            (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(params, rest, x,
                                                                          target)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), rest, opt_state, value, grads

        self._step = jax.jit(step)
        self.grads = None  # the last step's gradients

    def step(self, x, target) -> float:
        self.params, self.rest, self.opt_state, value, self.grads = self._step(
            self.params, self.rest, self.opt_state, x, target)
        return float(value)


def _torch_step(model, optimizer, loss_fn, x) -> float:
    optimizer.zero_grad()
    loss = loss_fn(model(x))
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@dataclass
class Batch:
    """One step's data as each side takes it: torch float32/float64 inputs and losses, the
    Flax input and target."""

    t_x: Any
    r_x: Any
    f_x: Any
    f_target: Any
    t_loss: Callable
    r_loss: Callable


def _batch(pair, x: np.ndarray, target, loss: str) -> Batch:
    import torch

    from torchref.verify.pair import model_input, torch_input, torch_loss

    device = next(pair.torch.parameters()).device  # the model's (parity --device gpu)
    t_target = None if target is None else torch.tensor(np.asarray(target), device=device)
    is_float = t_target is not None and t_target.is_floating_point()
    return Batch(torch_input(x, pair.dtype).to(device), torch_input(x, "float64").to(device),
                 jnp.asarray(pair.to_flax(model_input(x, pair.dtype))),
                 None if target is None else (pair.to_flax(target.astype(pair.dtype))
                                              if target.dtype.kind == "f" else target),
                 torch_loss(loss, t_target.to(getattr(torch, pair.dtype)) if is_float
                            else t_target),
                 torch_loss(loss, t_target.double() if is_float else t_target))


def _judged_as_fed(row: Row, candidate: np.ndarray, fed: np.ndarray, kind: str,
                   flax_name: str) -> Row:
    """A float64 step row that missed its tolerance against the reference's own step, judged
    against the reference optimizer fed Flax's gradients (:func:`fed_step`): passed there, the
    difference is the optimizer's response to the frameworks' gradient rounding."""
    fed_row = judge(row.layer, row.check, row.mode, row.dtype, candidate, fed, kind=kind,
                    flax_name=flax_name)
    if not fed_row.passed:
        return row
    fed_row.extra = {"vs_reference_max_abs": row.error, "vs_reference_bound": row.bound}
    fed_row.detail = (f"{row.error:.3g} from the reference's own step (bound {row.bound:.3g}), "
                      f"{fed_row.error:.3g} from the reference optimizer fed Flax's "
                      "gradients (which agree with the reference's): the optimizer's "
                      "sensitivity to gradient rounding")
    return fed_row


def _masked(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return np.asarray(array) if mask is None else np.asarray(array)[~mask]


def training_rows(pair, mapping, batches: Sequence[tuple[np.ndarray, Any]], loss: str,
                  torch_optimizer: Callable, flax_optimizer: optax.GradientTransformation,
                  resynced_steps: int | None = None, load: Callable | None = None,
                  seed: int = 0, flax_apply: Callable | None = None) -> list[Row]:
    """Rows for one step per ``(x, target)`` of ``batches`` (the user's batch repeated, or a
    config's first batches): resynced for the first ``resynced_steps`` (default all),
    free-running for all, with the optimizer state after the first and last step and the
    BatchNorm running statistics after the last. Train mode; dropout masks are the models' own
    (off for torch.nn/nnx Dropout, :func:`torchref.verify.pair.set_mode`; shared NumPy masks
    for the zoo's layers). ``load(torch_model, flax_model)`` sets the Flax weights instead of
    the mapping; ``flax_apply`` runs the Flax model in train mode (:class:`FlaxTrainer`).
    In float32 the free-running rows are judged against an :class:`Ensemble`; in
    float64 updates at the rounding level are :func:`undetermined`."""
    import torch

    from torchref.verify.mapping import load_into_flax
    from torchref.verify.pair import flax_loss, set_mode

    if torch_optimizer is None or flax_optimizer is None:
        raise JaxnetsError("optimizer steps need both torch_optimizer and flax_optimizer")
    dtype, steps = pair.dtype, len(batches)
    resynced_steps = steps if resynced_steps is None else resynced_steps
    for model in (pair.torch, pair.reference):
        set_mode(model, None, "train")
    set_mode(pair.torch, pair.flax, "train")
    (load or (lambda t, f: load_into_flax(mapping, t, f)))(pair.torch, pair.flax)
    t_opt, r_opt = torch_optimizer(pair.torch.parameters()), torch_optimizer(
        pair.reference.parameters())
    free_ref = copy.deepcopy(pair.reference)  # float64, never resynced
    f_opt = torch_optimizer(free_ref.parameters())
    variance = RunningVariance(free_ref)
    ensemble = Ensemble(pair.torch, torch_optimizer, seed=seed) if dtype == "float32" else None
    free = FlaxTrainer(pair.flax, flax_optimizer, flax_loss(loss), flax_apply)
    synced = FlaxTrainer(pair.flax, flax_optimizer, flax_loss(loss), flax_apply)
    back = {f: t for t, (f, _) in mapping.params.items()}
    masks: dict[str, np.ndarray] = {}  # entries whose update is undetermined, so far
    rows = []

    def weights(model):
        return mapping.torch_to_flax({n: p.detach().cpu().numpy()
                                      for n, p in model.named_parameters()})

    def note_undetermined(trainer, reference) -> dict[str, np.ndarray]:
        """float64: add the entries whose gradient is at the rounding level in this step;
        the reference's gradients (Flax paths)."""
        if dtype != "float64":
            return {}
        ref_grads = mapping.torch_to_flax({n: p.grad.detach().cpu().numpy() for n, p in
                                           reference.named_parameters() if p.grad is not None})
        for name, mask in undetermined(flat(trainer.grads), ref_grads).items():
            masks[name] = masks[name] | mask if name in masks else mask
        return ref_grads

    def fed_weights(trainer, ref_grads, start):
        """float64: the reference optimizer's step fed the Flax gradients that agree with the
        reference's (:func:`fed_step`), as Flax paths; None in float32."""
        if dtype != "float64":
            return None
        found = flat(trainer.grads)
        agreeing = {n: g for n, g in found.items() if n in ref_grads and judge(
            n, "backward", "step", dtype, g, ref_grads[n], kind="backward").passed}
        model = fed_step(start, grads_as_torch(mapping, agreeing, start[0]))
        return {n: v for n, v in weights(model).items() if n in agreeing}

    def param_row(mode, step, name, flax_value, ref, own=None, spread=None, kind="step",
                  fed=None):
        mask = masks.get(name)
        row = judge(f"step {step}: {back[name]}", "step", mode, dtype,
                    _masked(flax_value, mask), _masked(ref, mask),
                    None if own is None else _masked(own, mask), kind, name, spread)
        if not row.passed and fed is not None and name in fed:
            row = _judged_as_fed(row, _masked(flax_value, mask), _masked(fed[name], mask),
                                 kind, name)
        if mask is not None:
            row.detail = "; ".join(filter(None, (
                f"update undetermined (gradient at rounding level): {int(mask.sum())} of "
                f"{mask.size} entries, left out", row.detail)))
            row.extra["undetermined"] = int(mask.sum())
        return row

    for step, (x, target) in enumerate(batches, 1):
        batch = _batch(pair, np.asarray(x), target, loss)
        members = [] if ensemble is None else ensemble.members
        if step <= resynced_steps:
            # resync: Flax and the float64 reference start this step from torch's state (the
            # first step from the loaded weights: a wrong ``load`` shows there)
            start, start_slots = weights(pair.torch), torch_slots(pair.torch, t_opt, mapping)
            if step > 1:
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
            start = copy_with_optimizer(pair.reference, r_opt) if dtype == "float64" else None
            ref_loss = _torch_step(pair.reference, r_opt, batch.r_loss, batch.r_x)
            synced_loss = synced.step(batch.f_x, batch.f_target)
            fed = fed_weights(synced, note_undetermined(synced, pair.reference), start)
        own_loss = _torch_step(pair.torch, t_opt, batch.t_loss, batch.t_x)
        if step <= resynced_steps:
            own, ref, found = weights(pair.torch), weights(pair.reference), flat(synced.params)
            rows += [param_row("resynced", step, n, found[n], ref[n], own[n], fed=fed)
                     for n in ref]
            rows.append(judge(f"step {step}", "loss", "resynced", dtype,
                              np.float64(synced_loss), np.float64(ref_loss),
                              np.float64(own_loss), "step"))
        # free-running: each side from its own previous steps (accumulated drift)
        before = variance.before()
        kind = "step" if step == 1 else "trajectory"
        # (the fed step for the first step only: later steps start from different weights
        # on the two sides, and the trajectory tolerance covers their accumulated rounding)
        start = (copy_with_optimizer(free_ref, f_opt) if dtype == "float64" and kind == "step"
                 else None)
        free_loss = _torch_step(free_ref, f_opt, batch.r_loss, batch.r_x)
        variance.update(before)
        flax_loss_value = free.step(batch.f_x, batch.f_target)
        ref_grads = note_undetermined(free, free_ref)
        fed = None if start is None else fed_weights(free, ref_grads, start)
        member_losses = [_torch_step(m, o, batch.t_loss, batch.t_x) for m, o in members]
        ref, found = weights(free_ref), flat(free.params)
        if ensemble is None:
            rows += [param_row("free-running", step, n, found[n], r, kind=kind, fed=fed)
                     for n, r in ref.items()]
        else:
            member_weights = [weights(m) for m in (pair.torch, *(m for m, _ in members))]
            rows += [param_row("free-running", step, n, found[n], r, spread=ensemble.measure(
                n, [_masked(w[n], masks.get(n)) for w in member_weights],
                _masked(r, masks.get(n)))) for n, r in ref.items()]
        rows.append(judge(f"step {step}", "loss", "free-running", dtype,
                          np.float64(flax_loss_value), np.float64(free_loss), None, kind,
                          spread=None if ensemble is None else ensemble.measure(
                              "loss", [own_loss, *member_losses], np.float64(free_loss))))
        if step in (1, steps):
            rows += slot_rows(free, f_opt, t_opt, pair, free_ref, mapping, back,
                              f"optimizer state after step {step}",
                              None if step == 1 else ensemble)
    found, ref = flat(free.params), weights(free_ref)
    drift = max((np.abs(found[n][m] - ref[n][m]).max() for n, m in masks.items()), default=0.0)
    rows += running_stat_rows(free, free_ref, variance, pair, mapping, back, ensemble, steps,
                              float(drift))
    return rows


def grads_as_torch(mapping, flax_grads: dict[str, np.ndarray], torch_model
                   ) -> dict[str, np.ndarray]:
    """Flax-path gradients -> torch names and layouts, float64. Every parameter layout rule
    (transpose, OIHW->HWIO, the HWC flatten permutation) only moves entries, so each is
    inverted by converting an array of entry indices with the mapping itself; a tensor whose
    rule is no permutation is left out."""
    out = {}
    for name, param in torch_model.named_parameters():
        index = np.arange(param.numel(), dtype=np.float64).reshape(tuple(param.shape))
        converted = mapping.torch_to_flax({name: index})
        if len(converted) != 1:
            continue
        ((flax_name, moved),) = converted.items()
        moved = np.asarray(moved).astype(np.int64).ravel()
        if flax_name not in flax_grads or not np.array_equal(np.sort(moved),
                                                             np.arange(param.numel())):
            continue
        values = np.empty(param.numel())
        values[moved] = np.asarray(flax_grads[flax_name], np.float64).ravel()
        out[name] = values.reshape(tuple(param.shape))
    return out


def copy_with_optimizer(model, optimizer) -> tuple[Any, Any]:
    """Copies of ``model`` and its ``optimizer``, the copy's parameters in the copied
    optimizer's groups and state. The whole ``__dict__`` is copied: ``copy.deepcopy`` of an
    optimizer goes through ``Optimizer.__getstate__``, which drops a subclass's own counters
    (the catalogue's scheduled SGD lost its step count that way)."""
    memo: dict[int, Any] = {}
    model_copy = copy.deepcopy(model, memo)
    optimizer_copy = object.__new__(type(optimizer))
    optimizer_copy.__dict__.update(copy.deepcopy(optimizer.__dict__, memo))
    return model_copy, optimizer_copy


def fed_step(start, grads: dict[str, np.ndarray]):
    """The float64 reference optimizer's step from ``start`` = (model, its optimizer), copied
    together before the reference's own step (:func:`copy_with_optimizer`, so the copy keeps
    every counter the optimizer holds, a schedule's step among them), fed ``grads`` (torch
    names) instead of its own.

    Why: an optimizer step is ill-conditioned where Adam divides a gradient entry by its own
    size: its first step lr g / (|g| + eps) has slope up to lr / eps (1e5 at lr 1e-3, eps
    1e-8), so two frameworks' float64 gradients that agree to ~4e-17 give steps ~4e-12 apart
    (vgg_bn_fashion's fc1), above the 1e-12 step tolerance although both are right. Fed the
    same gradients, a correct port's optimizer agrees with the reference's within that
    tolerance; the gradients themselves are held to the float64 gradient tolerance."""
    import torch

    model, optimizer = start
    optimizer.zero_grad()
    for name, param in model.named_parameters():
        if name in grads:
            param.grad = torch.from_numpy(grads[name]).to(param.device)
    optimizer.step()
    return model


def _copy_optimizer_state(source, target) -> None:
    """torch optimizer state -> the float64 reference optimizer (same order), as copies:
    ``.double()`` of a float64 tensor is the tensor itself, and the candidate's next step would
    then update the reference's buffers in place."""
    import torch

    for p_src, p_dst in zip(source.state.keys(), list(target.param_groups[0]["params"]),
                            strict=False):
        target.state[p_dst] = {k: (v.detach().to(torch.float64, copy=True) if torch.is_tensor(v) and
                                   v.is_floating_point() and v.dim() else v.clone()
                                   if torch.is_tensor(v) else v)
                               for k, v in source.state[p_src].items()}
