"""Every layer's input, output and output gradient, from an unmodified model on either side.

PyTorch: forward pre-hooks and hooks on every leaf module (a clone of each output is passed on,
so an in-place activation downstream cannot overwrite what was recorded, and its ``.grad`` is
the gradient of the loss with respect to that layer's output).

Flax NNX: :func:`tapped` wraps ``__call__`` of every module class in the model for the duration
of one trace. It does what ``nnx.capture(model, nnx.Intermediate, method_outputs=...)`` does
(flax 0.12 also wraps the classes' methods) and one thing more: it adds a zero "delta" to each
leaf's output, so ``jax.grad`` with respect to the deltas is the gradient with respect to each
layer's output (``nnx.capture``'s ``Perturbation`` needs ``self.perturb`` calls in the user's own
module). Everything runs under ``jax.jit``, so activations round as in training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclass
class TorchCall:
    """One leaf module call: ``name`` is its module path (``"features.0"``; ``"blk#1"`` for the
    second call of a module used twice)."""

    name: str
    module: Any
    input: Any  # torch.Tensor, a copy taken before the call
    output: Any  # the tensor passed on (its .grad is filled by backward)
    extra_inputs: int = 0


def _leaves(model) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()
            if name and next(m.children(), None) is None}


def _substitute(output, value):
    """``value`` forward, the gradient passed to ``output`` unchanged backward: a leaf's
    output replaced by given values while the graph upstream of it stays connected."""
    import torch

    class Substitute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, out, new):
            return new.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    return Substitute.apply(output, torch.tensor(np.array(value), dtype=output.dtype))


def torch_forward(model, x, loss_fn: Callable | None = None,
                  replace: dict[str, np.ndarray] | None = None
                  ) -> tuple[Any, list[TorchCall]]:
    """Run ``model(x)``, recording every leaf call in execution order; with ``loss_fn``
    (output -> scalar) also run the backward, filling each call's ``output.grad`` and the
    parameters' ``.grad``. ``replace`` ({leaf call name: array in torch's layout}) substitutes
    those leaves' outputs (the backward still reaches the layers before them).
    Returns (output or loss, calls)."""
    names, calls, counts, pending, handles = _leaves(model), [], {}, {}, []
    replace = replace or {}

    def pre_hook(module, args):
        pending[id(module)] = (args[0].detach().clone() if args else None, len(args) - 1)

    def hook(module, args, output):
        base = names[id(module)]
        count = counts.get(base, 0)
        counts[base] = count + 1
        key = base if not count else f"{base}#{count}"
        if key in replace and tuple(replace[key].shape) == tuple(output.shape):
            passed = _substitute(output, replace[key])
        else:
            passed = output.clone() if hasattr(output, "clone") else output
        if getattr(passed, "requires_grad", False):
            passed.retain_grad()
        value, extra = pending.pop(id(module))
        calls.append(TorchCall(key, module, value, passed, extra))
        return passed

    for m in model.modules():
        if id(m) in names:
            handles += [m.register_forward_pre_hook(pre_hook), m.register_forward_hook(hook)]
    try:
        output = model(x)
        if loss_fn is not None:
            for p in model.parameters():
                p.grad = None
            loss = loss_fn(output)
            loss.backward()
            return (output, loss), calls
        return output, calls
    finally:
        for h in handles:
            h.remove()


def _is_leaf(module: nnx.Module) -> bool:
    return not any(isinstance(child, nnx.Module)
                   for _, child in nnx.iter_children(module))


def flax_leaves(model: nnx.Module) -> dict[int, str]:
    """``{id(module): "blocks.0.norm"}`` for every leaf module of an NNX model."""
    return {id(m): ".".join(map(str, path)) for path, m in nnx.iter_modules(model)
            if path and _is_leaf(m)}


@dataclass
class Tap:
    names: dict[int, str]
    deltas: dict[str, jax.Array] | None
    calls: list[tuple[str, jax.Array, jax.Array]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    active: set[int] = field(default_factory=set)


@contextlib.contextmanager
def tapped(model: nnx.Module, deltas: dict[str, jax.Array] | None = None) -> Iterator[Tap]:
    """Record ``(name, input, output)`` of every leaf call inside the ``with`` block, adding
    ``deltas[name]`` to that output where given. The classes are restored on exit."""
    tap = Tap(flax_leaves(model), deltas)
    classes = {type(m) for _, m in nnx.iter_modules(model)}
    saved = {cls: cls.__dict__.get("__call__") for cls in classes}
    for cls in classes:
        original = cls.__call__

        def wrapper(self, *args, _original=original, **kwargs):
            name = tap.names.get(id(self))
            if name is None or id(self) in tap.active:
                return _original(self, *args, **kwargs)
            tap.active.add(id(self))
            try:
                out = _original(self, *args, **kwargs)
            finally:
                tap.active.discard(id(self))
            count = tap.counts.get(name, 0)
            tap.counts[name] = count + 1
            key = name if not count else f"{name}#{count}"
            if tap.deltas is not None and key in tap.deltas:
                out = out + tap.deltas[key]
            tap.calls.append((key, args[0] if args else None, out))
            return out

        cls.__call__ = wrapper
    try:
        yield tap
    finally:
        for cls, original in saved.items():
            if original is None:
                del cls.__call__
            else:
                cls.__call__ = original


class FlaxRunner:
    """A Flax model as pure, jitted functions of (params, other state): the forward with every
    leaf's input and output, and the loss with gradients for the parameters and for every
    leaf's output."""

    def __init__(self, model: nnx.Module):
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        self.order: list[str] = []
        self._forward = jax.jit(self._run)
        self._grad = jax.jit(jax.value_and_grad(self._loss, argnums=(0, 1), has_aux=True),
                             static_argnums=(5,))

    def _run(self, params, rest, x, deltas):
        model = nnx.merge(self.graphdef, params, rest, copy=True)
        with tapped(model, deltas) as tap:
            y = model(x)
        self.order = [name for name, _, _ in tap.calls]
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return y, {n: i for n, i, _ in tap.calls}, {n: o for n, _, o in tap.calls}, new_rest

    def _loss(self, params, deltas, rest, x, target, loss_fn):
        y, inputs, outputs, new_rest = self._run(params, rest, x, deltas)
        return loss_fn(y, target), (y, inputs, outputs, new_rest)

    def forward(self, x) -> tuple[jax.Array, dict, dict, nnx.State]:
        """(output, {leaf: input}, {leaf: output}, other state after the call)."""
        return self._forward(self.params, self.rest, x, None)

    def loss_and_grads(self, x, target, loss_fn) -> dict[str, Any]:
        """Loss, output, parameter gradients and the gradient of each leaf's output."""
        shapes = jax.eval_shape(self._run, self.params, self.rest, x, None)[2]
        deltas = {name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}
        (loss, (y, inputs, outputs, rest)), (param_grads, output_grads) = self._grad(
            self.params, deltas, self.rest, x, target, loss_fn)
        return {"loss": loss, "output": y, "inputs": inputs, "outputs": outputs,
                "param_grads": param_grads, "output_grads": output_grads, "rest": rest}


def flax_layer_vjp(module: nnx.Module, x: np.ndarray, cotangent: np.ndarray | None):
    """One layer alone: its output on ``x`` and, with ``cotangent``, the gradient with respect
    to its input and its parameters (the layer's VJP fed that exact incoming gradient).
    The module's own state (BatchNorm statistics) is left as it was."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def apply(p, inp):
        return nnx.merge(graphdef, p, rest, copy=True)(inp)

    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):  # token ids: params only
        out, vjp = jax.vjp(lambda p: apply(p, jnp.asarray(x)), params)
        if cotangent is None:
            return out, None, None
        return out, None, vjp(jnp.asarray(cotangent, out.dtype))[0]
    out, vjp = jax.vjp(apply, params, jnp.asarray(x))
    if cotangent is None:
        return out, None, None
    param_grads, input_grad = vjp(jnp.asarray(cotangent, out.dtype))
    return out, input_grad, param_grads


def flat(state: nnx.State) -> dict[str, np.ndarray]:
    """An NNX state as ``{"blocks.0.norm.scale": array}``."""
    return {".".join(map(str, path)): np.asarray(
                var.get_value() if isinstance(var, nnx.Variable) else var)
            for path, var in nnx.to_flat_state(state)}
