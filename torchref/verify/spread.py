"""The training checks' bounds, measured in the run: how far float32 training may drift, and
which updates no framework determines.

**Trajectories (float32).** Training is chaotic at the scale of rounding: one float32 ulp on
the initial weights moves ``mlp_fashion``'s 100-step Adam losses by ~5e-3, in float64 as much
as in float32 (issue table: 5.4e-3 and 6.2e-3), so no single PyTorch float32 run is a noise
level. The bound is the spread of an :class:`Ensemble`: PyTorch float32 runs from the given
start and from ``ENSEMBLE_SIZE`` starts moved by one ulp (random sign per entry), each measured
against the float64 reference from the unmoved start; a candidate passes when its own deviation
from that reference is within ``TRAJECTORY_MARGIN`` times the ensemble's largest so far.

**Updates at the rounding level (float64).** A parameter whose true gradient is 0 (a bias
directly before a BatchNorm) gets a gradient of pure rounding (~1e-17), and Adam's step
lr g / (sqrt(v) + eps) turns it into a step each framework draws differently: such entries are
:func:`undetermined`, reported as such, and left out of the comparison.
"""

from __future__ import annotations

import copy

import numpy as np

# Members moved by one ulp, beside the unmoved PyTorch float32 run: 5 samples of float32
# training noise. A cost choice (each member is one more PyTorch run, stepped in lockstep): with
# 5 samples a correct port, one more sample of the same noise, lies above their maximum with
# chance ~1/6 only, and the margin below covers the rest.
ENSEMBLE_SIZE = 4
# Measured (jaxnets parity, float32, CPU, the rows closest to their bounds; README "Bounds
# measured in the run"): the ratio of the JAX run's deviation from the float64 reference to the
# ensemble's spread reached 2.1 on a weight tensor (mlp_fashion, 100 Adam steps, step 6) and
# 4.3 on lenet_mnist's first-step loss, where the 16-ulp floor (4.4e-6) is the larger term; 4
# covers the first with a factor ~2. A real, small systematic difference is far outside:
# Optax's float32 Adam bias correction (1 - 0.999 off by 1.3e-5) puts mlp_fashion's losses at
# 630x the bound.
TRAJECTORY_MARGIN = 4.0


def one_ulp_moved(model, seed: int):
    """A copy of ``model`` (float32) with every floating parameter moved by one ulp, up or
    down at random per entry (NumPy, ``seed``)."""
    import torch

    moved = copy.deepcopy(model)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in moved.parameters():
            if p.is_floating_point():
                values = p.detach().cpu().numpy()
                up = rng.random(values.shape) < 0.5
                target = np.where(up, np.inf, -np.inf).astype(values.dtype)
                p.copy_(torch.from_numpy(np.nextafter(values, target)))
    return moved


class Ensemble:
    """PyTorch float32 runs from one-ulp-moved starts, stepped in lockstep with the run under
    test; ``spread[key]`` is the largest deviation of any member from the reference so far."""

    def __init__(self, torch_model, torch_optimizer, size: int = ENSEMBLE_SIZE, seed: int = 0):
        self.members = []
        for index in range(size):
            model = one_ulp_moved(torch_model, seed + 1000 + index)
            self.members.append((model, torch_optimizer(model.parameters())))
        self.spread: dict[str, float] = {}

    def widen(self, key: str, deviation: float) -> float:
        """Record one deviation of one member; the spread of ``key`` so far."""
        self.spread[key] = max(self.spread.get(key, 0.0), float(deviation))
        return self.spread[key]

    def measure(self, key: str, values: list[np.ndarray], reference: np.ndarray) -> float:
        for value in values:
            self.widen(key, np.abs(np.asarray(value, np.float64) - reference).max(initial=0.0))
        return self.spread.get(key, 0.0)


def undetermined(flax_grads: dict[str, np.ndarray], ref_grads: dict[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
    """Entries whose float64 gradient is at the rounding level: ``|g_ref|`` no larger than the
    largest disagreement of the two frameworks' gradients anywhere in the model (measured in
    this step; ~1e-16 of the largest gradient), and the two not equal. ``{name: mask}`` for the
    tensors that have any."""
    level = max((np.abs(flax_grads[n] - g).max(initial=0.0) for n, g in ref_grads.items()),
                default=0.0)
    masks = {}
    for name, g in ref_grads.items():
        mask = (np.abs(g) <= level) & (flax_grads[name] != g)
        if mask.any():
            masks[name] = mask
    return masks


class RunningVariance:
    """BatchNorm's running variance in both conventions along a torch run: torch's (the
    unbiased batch variance) as the module keeps it, and nnx.BatchNorm's (the biased one),
    followed step by step with :func:`jaxnets.convert.torch_running_var_as_flax`."""

    def __init__(self, model):
        from torch import nn

        self.modules = {n: m for n, m in model.named_modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum}
        self.counts: dict[str, int] = {}
        self.biased = {f"{n}.running_var": m.running_var.detach().cpu().numpy().astype(
            np.float64) for n, m in self.modules.items() if m.running_var is not None}
        for name, module in self.modules.items():
            module.register_forward_pre_hook(self._counter(name))

    def _counter(self, name):
        def hook(module, args):
            if module.training:
                self.counts[name] = args[0].numel() // args[0].shape[1]
        return hook

    def before(self) -> dict[str, np.ndarray]:
        """The running variances now (before a step); the step's batch counts are reset."""
        self.counts.clear()
        return {f"{n}.running_var": m.running_var.detach().cpu().numpy().astype(np.float64)
                for n, m in self.modules.items() if m.running_var is not None}

    def update(self, before: dict[str, np.ndarray]) -> None:
        """After one training step: advance the biased convention by that step's batch."""
        from jaxnets.convert import torch_running_var_as_flax

        for name, old in before.items():
            layer = name.rpartition(".")[0]
            module = self.modules[layer]
            if layer not in self.counts:  # not called in train mode this step
                continue
            new = module.running_var.detach().cpu().numpy().astype(np.float64)
            step = torch_running_var_as_flax(new, old, module.momentum, self.counts[layer])
            self.biased[name] = step + (1 - module.momentum) * (self.biased[name] - old)
