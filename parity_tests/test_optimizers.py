"""Each ``jaxnets.optim`` transformation against the torch.optim optimizer it stands for, in
float64: the same parameters and the same 20 gradients, within 1e-12 after every step."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import torch

from jaxnets import optim
from jaxnets.config import load_config
from torchref.optim import make_optimizer as make_torch_optimizer

SHAPES = {"w": (7, 5), "b": (5,), "k": (3, 3, 2, 4)}
STEPS = 20
ATOL = 1e-12

# name -> (Optax transformation, torch optimizer for the given parameters)
CASES = {
    "sgd": (lambda: optim.sgd(0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "sgd_wd": (lambda: optim.sgd(0.1, weight_decay=0.05),
               lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.05)),
    "sgd_momentum_0.5": (lambda: optim.sgd_momentum(0.1, 0.5),
                         lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5)),
    "sgd_momentum_0.9": (lambda: optim.sgd_momentum(0.1, 0.9),
                         lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    "sgd_momentum_wd": (lambda: optim.sgd_momentum(0.1, 0.9, weight_decay=0.05),
                        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.05)),
    "sgd_nesterov": (lambda: optim.sgd_nesterov(0.1, 0.9),
                     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)),
    "sgd_nesterov_wd": (lambda: optim.sgd_nesterov(0.1, 0.9, weight_decay=0.05),
                        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                                   weight_decay=0.05)),
    "adam": (lambda: optim.adam(1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2)),
    "adam_wd": (lambda: optim.adam(1e-2, weight_decay=0.1),
                lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1)),
    # both sides' defaults: torch's AdamW decays by 1e-2 unless told otherwise
    "adamw": (lambda: optim.adamw(1e-2), lambda ps: torch.optim.AdamW(ps, lr=1e-2)),
    "adamw_wd": (lambda: optim.adamw(1e-2, weight_decay=0.1),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)),
}


def initial_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}


def gradients(steps: int = STEPS, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Random float64 gradients per step; in every tensor a fixed fifth of the entries is
    exactly 0 and another fifth ~1e-9 (below Adam's eps once it is square-rooted)."""
    rng = np.random.default_rng(seed)
    kind = {name: rng.permutation(np.prod(shape)).reshape(shape) % 5
            for name, shape in SHAPES.items()}
    out = []
    for _ in range(steps):
        step = {}
        for name, shape in SHAPES.items():
            g = rng.standard_normal(shape)
            g[kind[name] == 0] = 0.0
            g[kind[name] == 1] *= 1e-9
            step[name] = g
        out.append(step)
    return out


def all_float64(tree) -> bool:
    """Every floating point leaf is float64 (plain SGD's state has none)."""
    return all(x.dtype == np.float64 for x in jax.tree.leaves(tree)
               if np.issubdtype(x.dtype, np.floating))


def optax_steps(tx: optax.GradientTransformation, start: dict[str, np.ndarray], grads,
                jit: bool = True) -> list[dict[str, np.ndarray]]:
    """Optax's parameters after each step, computed in float64. ``jit``: the update and its
    application in one compiled function, as in training (XLA then fuses ``p + (-lr) * u`` into
    one FMA, as torch's ``add_(alpha=-lr)`` is on the CPU)."""
    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), updates, state

    step = jax.jit(step) if jit else step
    trajectory = []
    with jax.enable_x64(True):
        params = {k: jax.numpy.asarray(v) for k, v in start.items()}
        state = tx.init(params)
        for g in grads:
            params, updates, state = step({k: jax.numpy.asarray(v) for k, v in g.items()},
                                          state, params)
            assert all_float64(params) and all_float64(updates) and all_float64(state)
            trajectory.append({k: np.asarray(v) for k, v in params.items()})
    return trajectory


def torch_steps(make_torch, start: dict[str, np.ndarray], grads) -> list[dict[str, np.ndarray]]:
    """torch's parameters after each ``optimizer.step()``."""
    params = {k: torch.tensor(v, requires_grad=True) for k, v in start.items()}
    opt = make_torch(list(params.values()))
    trajectory = []
    for g in grads:
        for k, p in params.items():
            p.grad = torch.from_numpy(g[k].copy())
        opt.step()
        trajectory.append({k: p.detach().numpy().copy() for k, p in params.items()})
    return trajectory


def max_abs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in SHAPES)


def run_both(tx: optax.GradientTransformation, make_torch, jit: bool = True) -> list[float]:
    """Both sides through the same gradients; the max-abs parameter difference after each
    step, each asserted <= ATOL."""
    start, grads = initial_params(), gradients()
    diffs = [max_abs(ours, theirs) for ours, theirs in zip(
        optax_steps(tx, start, grads, jit), torch_steps(make_torch, start, grads), strict=True)]
    for step, diff in enumerate(diffs, 1):
        assert diff <= ATOL, f"step {step}: max-abs difference {diff:.3g} > {ATOL:g}"
    return diffs


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("case", CASES)
def test_optax_matches_torch_every_step(case, jit):
    make_tx, make_torch = CASES[case]
    assert len(run_both(make_tx(), make_torch, jit)) == STEPS


def test_parameters_really_move():
    """The comparison is not vacuous: every optimizer changes every tensor by much more than
    ATOL, and the exactly-zero gradients leave plain SGD's entries exactly where they were."""
    start, grads = initial_params(), gradients()
    for case, (make_tx, _) in CASES.items():
        end = optax_steps(make_tx(), start, grads)[-1]
        for k in SHAPES:
            moved = np.abs(end[k] - start[k])
            assert moved.max() > 1e-3, (case, k)
            if case == "sgd":
                zero = np.all([g[k] == 0 for g in grads], axis=0)
                assert zero.any() and np.all(moved[zero] == 0)


def test_coupled_adam_and_adamw_differ():
    """Adam's weight decay goes through the moments, AdamW's does not: with the same decay the
    two end in different places, on both sides."""
    start, grads = initial_params(), gradients()
    jax_ends = [optax_steps(tx, start, grads)[-1]
                for tx in (optim.adam(1e-2, 0.1), optim.adamw(1e-2, 0.1))]
    torch_ends = [torch_steps(lambda ps, cls=cls: cls(ps, lr=1e-2, weight_decay=0.1),
                              start, grads)[-1]
                  for cls in (torch.optim.Adam, torch.optim.AdamW)]
    assert max_abs(*jax_ends) > 1e-3 and max_abs(*torch_ends) > 1e-3
    assert max_abs(jax_ends[0], torch_ends[0]) <= ATOL  # and each side's Adam is the other's
    assert max_abs(jax_ends[1], torch_ends[1]) <= ATOL


@pytest.mark.parametrize("overrides, torch_class, group", [
    (["optimizer.name=sgd", "optimizer.learning_rate=0.1"], torch.optim.SGD,
     {"momentum": 0.0, "nesterov": False, "weight_decay": 0.0}),
    (["optimizer.name=sgd", "optimizer.learning_rate=0.1", "optimizer.weight_decay=0.05"],
     torch.optim.SGD, {"momentum": 0.0, "weight_decay": 0.05}),
    (["optimizer.name=sgd", "optimizer.learning_rate=0.1", "optimizer.momentum=0.9"],
     torch.optim.SGD, {"momentum": 0.9, "nesterov": False}),
    (["optimizer.name=sgd", "optimizer.learning_rate=0.1", "optimizer.momentum=0.9",
      "optimizer.nesterov=true"], torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    (["optimizer.name=adam"], torch.optim.Adam,
     {"weight_decay": 0.0, "decoupled_weight_decay": False}),
    (["optimizer.name=adam", "optimizer.weight_decay=0.01"], torch.optim.Adam,
     {"weight_decay": 0.01, "decoupled_weight_decay": False}),
    (["optimizer.name=adamw", "optimizer.weight_decay=0.01"], torch.optim.AdamW,
     {"weight_decay": 0.01, "decoupled_weight_decay": True}),
])
def test_make_optimizer_follows_the_config(overrides, torch_class, group):
    """Both make_optimizer functions pick the same optimizer from a config: torch's by its class
    and settings, Optax's by stepping exactly as torch's does."""
    opt_cfg = load_config("mlp_fashion", overrides)["optimizer"]
    torch_opt = make_torch_optimizer(opt_cfg, [torch.zeros(3, requires_grad=True)])
    assert type(torch_opt) is torch_class
    assert group.items() <= torch_opt.param_groups[0].items()
    assert torch_opt.param_groups[0]["lr"] == opt_cfg["learning_rate"]
    run_both(optim.make_optimizer(opt_cfg), lambda ps: make_torch_optimizer(opt_cfg, ps))


def test_nesterov_without_momentum_is_an_error_on_both_sides():
    # the config layer refuses it first (test_config); the optimizers refuse it too
    opt_cfg = {"optimizer": {"name": "sgd", "learning_rate": 0.1, "momentum": 0.0,
                             "nesterov": True, "weight_decay": 0.0}}
    with pytest.raises(ValueError, match=r"[Nn]esterov"):
        optim.make_optimizer(opt_cfg["optimizer"])
    with pytest.raises(ValueError, match=r"[Nn]esterov"):
        make_torch_optimizer(opt_cfg["optimizer"], [torch.zeros(3, requires_grad=True)])


def test_unknown_optimizer_is_an_error():
    opt_cfg = {"name": "rmsprop", "learning_rate": 0.1, "momentum": 0.0, "nesterov": False,
               "weight_decay": 0.0}
    with pytest.raises(ValueError, match="rmsprop"):
        optim.make_optimizer(opt_cfg)
    with pytest.raises(ValueError, match="rmsprop"):
        make_torch_optimizer(opt_cfg, [torch.zeros(3, requires_grad=True)])
