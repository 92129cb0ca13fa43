"""Differences, their statistics and the verdict on them, in one place.

A float32 candidate is judged against PyTorch in float64 (the reference), not against PyTorch
in float32: its error ``err(flax32, ref64)`` is **precision noise** when it is at most
``NOISE_MARGIN`` times PyTorch's own float32 error ``err(torch32, ref64)`` plus a floor of
``FLOOR_ULPS`` float32 ulps of the largest reference value, and a **bug** otherwise (the idea of
``torch._dynamo.utils.same``'s fp64 reference). In float64 both frameworks round ~1e-16
relative, so plain tight tolerances apply (``TIGHT``, relative to the reference's scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Measured (``verify`` on parity_tests/foreign's CNN and mixer, two input seeds each, ~160 rows
# per run, float32 on the CPU): the largest ratio err(flax32)/err(torch32) of these correct ports
# was 5.7 (2.6, 5.7, 2.2, 1.6 per run); 8 keeps that inside while the smallest planted bug,
# LayerNorm eps 1e-6 for 1e-5, still lands at 4x its bound.
NOISE_MARGIN = 8.0
# Where torch32 happens to be exact (a ReLU, a copy, a sum of a few exact values) its error is
# 0 and the margin alone would demand bit-exactness; a correct Flax port may still round
# differently by a fraction of an ulp of the values it sums. Measured (``python -m
# torchref.catalogue.floor``: the catalogue's four correct ports, three input seeds each,
# float32 on the CPU, ~1,100 layer rows): the most any row needed beyond 8 x err(torch32) was
# 0.59 ulps of its scale (the MLP's loss where torch32 was nearly exact, 8e-9), every other
# row 0.06 or less; 2 ulps cover that 3.4 times over.
FLOOR_ULPS = 2
# The optimizer steps and trajectories keep 16 ulps: on lenet_mnist's first-step loss the JAX
# run's deviation reached 4.3x the ensemble's spread, inside its bound only by this floor
# (4.4e-6; README "Bounds measured in the run").
TRAINING_FLOOR_ULPS = 16
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7
# The cap: PyTorch's own float32 error sets the bound only while it is itself plausible
# rounding; measured it stays below 1e-6 of the layer's largest value (3e-7 on the foreign
# CNN's widest Linear), so a bound is never wider than 1e-4 of it (of 1 for values below 1:
# a gradient that cancels to ~0, such as a conv bias before BatchNorm, still has float32
# rounding ~1e-8 in both frameworks), and a torch float32 result that is itself far off (a
# mode mix-up, a wrong reference) cannot excuse the candidate.
CAP_RELATIVE = 1e-4
# float64: forward 1e-12 and gradients 1e-10 as `jaxnets parity` (relative to max(|ref|, 1))
TIGHT = {"forward": 1e-12, "backward": 1e-10, "params": 1e-10, "state": 1e-12,
         "step": 1e-12, "trajectory": 1e-9}


def statistics(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Polygraphy's comparison figures for one tensor pair: max, mean and median absolute
    and relative error, cosine similarity, and the reference's scale (max |ref|)."""
    a = np.asarray(candidate, np.float64).ravel()
    b = np.asarray(reference, np.float64).ravel()
    if a.shape != b.shape:
        return {"max_abs": math.inf, "mean_abs": math.inf, "median_abs": math.inf,
                "max_rel": math.inf, "mean_rel": math.inf, "median_rel": math.inf,
                "cosine": math.nan, "scale": float(np.abs(b).max()) if b.size else 0.0}
    if not a.size:
        return dict.fromkeys(("max_abs", "mean_abs", "median_abs", "max_rel", "mean_rel",
                              "median_rel", "scale"), 0.0) | {"cosine": 1.0}
    absolute = np.abs(a - b)
    relative = absolute / np.maximum(np.abs(b), 1e-30)
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(a @ b / norms) if norms else float(np.array_equal(a, b))
    return {"max_abs": float(absolute.max()), "mean_abs": float(absolute.mean()),
            "median_abs": float(np.median(absolute)), "max_rel": float(relative.max()),
            "mean_rel": float(relative.mean()), "median_rel": float(np.median(relative)),
            "cosine": cosine, "scale": float(np.abs(b).max())}


# Optimizer steps and trajectories are not capped: Adam divides each gradient entry by its own
# magnitude, so rounding in a gradient that is exactly 0 (a conv bias before BatchNorm) becomes
# a step of ~lr. Measured: PyTorch float32 against float64 after one Adam step at lr 1e-2 on
# the test suite's CNN, 8.1e-3 on that bias; Flax's 5.1e-3. The rows are per tensor, so that
# one noisy tensor cannot widen the bound of the others.
UNCAPPED = {"step", "trajectory"}


def noise_bound(torch_error: float, scale: float, capped: bool = True) -> float:
    """The largest float32 error a correct port may have: ``NOISE_MARGIN * torch_error +
    FLOOR_ULPS * eps32 * scale``, at most ``CAP_RELATIVE * max(scale, 1)`` where ``capped``;
    uncapped (an optimizer step), with the floor of ``TRAINING_FLOOR_ULPS``."""
    if not capped:  # an optimizer step (:data:`UNCAPPED`)
        return NOISE_MARGIN * torch_error + TRAINING_FLOOR_ULPS * FLOAT32_EPS * scale
    bound = NOISE_MARGIN * torch_error + FLOOR_ULPS * FLOAT32_EPS * scale
    return min(bound, CAP_RELATIVE * max(scale, 1.0))


def tight_bound(kind: str, scale: float) -> float:
    return TIGHT[kind] * max(scale, 1.0)


@dataclass
class Row:
    """One comparison: ``layer`` (a torch module name, or "loss", "output", ...), ``check``
    (forward, backward, params, state, proof, step, ...), ``mode`` (propagated, shadow,
    alone; train or eval), the candidate's statistics against the reference, PyTorch's own
    error against it, the bound and the verdict."""

    layer: str
    check: str
    mode: str
    dtype: str
    stats: dict[str, float]
    torch_error: float
    bound: float
    verdict: str  # "precision noise", "agrees", "bug"
    passed: bool
    flax_name: str = ""
    detail: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def error(self) -> float:
        return self.stats["max_abs"]

    @property
    def margin(self) -> float:
        """How far inside (< 1) or outside (> 1) its bound the error is."""
        return self.error / self.bound if self.bound else (0.0 if not self.error else math.inf)


def ensemble_bound(spread: float, scale: float) -> float:
    """A float32 trajectory's bound: ``TRAJECTORY_MARGIN`` times the largest deviation of an
    ensemble of PyTorch runs from one-ulp-moved starts (``torchref.verify.spread``), plus the
    floor of ``TRAINING_FLOOR_ULPS`` ulps of the reference's scale."""
    from torchref.verify.spread import TRAJECTORY_MARGIN

    return TRAJECTORY_MARGIN * spread + TRAINING_FLOOR_ULPS * FLOAT32_EPS * scale


def judge(layer: str, check: str, mode: str, dtype: str, candidate: np.ndarray,
          reference: np.ndarray, torch_candidate: np.ndarray | None = None,
          kind: str | None = None, flax_name: str = "", spread: float | None = None) -> Row:
    """Compare ``candidate`` (Flax) with ``reference`` (PyTorch float64). In float32
    ``torch_candidate`` is PyTorch's own float32 result, which sets the noise bound, or, where
    ``spread`` is given, :func:`ensemble_bound` of it does; in float64 the tight tolerance of
    ``kind`` (default: the check's name) applies."""
    stats = statistics(candidate, reference)
    if dtype == "float64":
        bound, torch_error = tight_bound(kind or check, stats["scale"]), 0.0
        passed = stats["max_abs"] <= bound
        verdict = "agrees" if passed else "bug"
    elif spread is not None:
        torch_error, bound = spread, ensemble_bound(spread, stats["scale"])
        passed = stats["max_abs"] <= bound
        verdict = "precision noise" if passed else "bug"
    else:
        torch_error = (statistics(torch_candidate, reference)["max_abs"]
                       if torch_candidate is not None else 0.0)
        bound = noise_bound(torch_error, stats["scale"], (kind or check) not in UNCAPPED)
        passed = stats["max_abs"] <= bound
        verdict = "precision noise" if passed else "bug"
    row = Row(layer, check, mode, dtype, stats, torch_error, bound, verdict, passed, flax_name)
    if torch_candidate is not None:  # Flax against PyTorch at the same precision, as shown
        against_torch = statistics(candidate, torch_candidate)
        row.extra = {"vs_torch_max_abs": against_torch["max_abs"],
                     "vs_torch_max_rel": against_torch["max_rel"]}
    return row
