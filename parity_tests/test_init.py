"""Initialisation, checked statistically: jaxnets' JAX init schemes against torch's real init.

``init = "torch"`` reimplements PyTorch's default init in JAX: the same law, not the same
numbers. So it is checked the way a law is checked, per parameter tensor, over many seeded draws
of the whole model on both sides: every value lies in the theoretical support, the largest
reaches its edge (a too-narrow law fails), the mean, the standard deviation and the share of
values within one standard deviation (the law's shape) match theory, and the two frameworks'
standard deviations match each other. ``"normal"`` (d2l) and ``"flax"`` (lecun_normal) are
checked the same way, on both sides (the JAX scheme and ``torchref.models.apply_init``).

Every tolerance is ``Z`` standard errors of its statistic at the tensor's pooled sample size, so
large tensors are checked tightly; tensors with few values (biases of 1..10) are pooled over as
many seeds as it takes to reach ``N_TARGET`` values. The last tests feed the checker wrong laws
at that smallest sample size and expect it to object, so a pass means something.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jaxnets import models as jax_models
from jaxnets.config import load_config
from jaxnets.convert import flax_params, flax_to_torch
from torchref import models as torch_models

# Standard errors allowed per statistic. One check of a correct init fails with probability
# P_FALSE = 5.7e-7; this file runs ~10^3 checks, so ~1e-3 family-wise. The seeds are fixed,
# so the outcome is reproducible rather than re-rolled on every run.
Z = 5.0
P_FALSE = math.erfc(Z / math.sqrt(2))  # two-sided normal tail beyond Z
# Pooled values per tensor at least: a uniform's std is then pinned to Z * sqrt(0.2 / 4000) =
# 3.5% and its edge to ln(1/P_FALSE) / 4000 = 0.4%; the smallest tensors need 4000 draws.
N_TARGET = 4000
MIN_DRAWS = 2  # every tensor from two seeds at least, so seed independence is checked too
FLOAT32_SLACK = 1e-6  # relative: the bound rounded to float32 (half an ulp = 6e-8), with margin
TRUNC_CUT = 2.0  # lecun_normal truncates the underlying normal at +-2 of its std

MODEL_CONFIGS = ("mlp_fashion", "d2l_mlp_fashion", "lenet_mnist", "simplenet_mnist",
                 "convnet_mnist", "spiral_relu", "regression_tanh")


# -- laws ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Law:
    """A zero-mean symmetric law, by the statistics the checks need."""

    name: str
    std: float
    kurtosis: float  # E[x^4] / std^4: sets the standard error of the sample std
    p_within_std: float  # P(|x| <= std): the law's shape (uniform 0.577, normal 0.683)
    bound: float = math.inf  # the support is [-bound, bound]
    edge_rate: float = 0.0  # P(|x| > bound * (1 - d)) >= edge_rate * d for small d


def uniform(bound: float) -> Law:
    return Law(f"U(+-{bound:.4g})", bound / math.sqrt(3), 9 / 5, 1 / math.sqrt(3), bound, 1.0)


def normal(std: float) -> Law:
    return Law(f"N(0, {std:.4g}^2)", std, 3.0, math.erf(1 / math.sqrt(2)))


def truncated_normal(std: float, cut: float = TRUNC_CUT) -> Law:
    """N(0, std^2) restricted to [-cut * std, cut * std]; moments of the truncated standard
    normal in closed form (integration by parts of z^2 phi and z^4 phi)."""
    mass = math.erf(cut / math.sqrt(2))
    phi = math.exp(-cut**2 / 2) / math.sqrt(2 * math.pi)
    m2 = 1 - 2 * cut * phi / mass
    m4 = 3 - (2 * cut**3 + 6 * cut) * phi / mass
    # The density of |z| grows inwards from the cut, so 2 phi(cut) / mass * cut is a lower bound.
    return Law(f"truncN(0, {std:.4g}^2, +-{cut:g} std)", std * math.sqrt(m2), m4 / m2**2,
               math.erf(math.sqrt(m2) / math.sqrt(2)) / mass, cut * std, 2 * cut * phi / mass)


# The std of a standard normal truncated to [-2, 2]: Flax's 0.87962566103423978.
TRUNC_STD = truncated_normal(1.0).std


def expected_law(scheme: str, leaf: str, fan_in: int, init_std: float) -> Law | None:
    """The law of a parameter under a scheme; None for an exactly zero tensor."""
    torch_default = uniform(1 / math.sqrt(fan_in))  # kaiming_uniform(a=sqrt(5)) and the bias
    if leaf == "bias":
        return None if scheme == "flax" else torch_default
    if scheme == "torch":
        return torch_default
    if scheme == "normal":
        return normal(init_std)
    if scheme == "flax":  # lecun_normal: variance 1/fan_in after truncation
        return truncated_normal(math.sqrt(1 / fan_in) / TRUNC_STD)
    raise ValueError(scheme)


# -- the checker -----------------------------------------------------------------------------


def std_se(law: Law, n: int) -> float:
    """Standard error of the sample std (delta method): std * sqrt((kurtosis - 1) / (4 n))."""
    return law.std * math.sqrt((law.kurtosis - 1) / (4 * n))


def mismatches(values: np.ndarray, law: Law) -> list[str]:
    """What in ``values`` (iid draws, pooled) contradicts ``law``; empty if nothing does."""
    x = np.asarray(values, np.float64).ravel()
    n = x.size
    mean, std, top = float(x.mean()), float(x.std()), float(np.abs(x).max())
    within = float(np.mean(np.abs(x) <= law.std))
    problems = []
    if top > law.bound * (1 + FLOAT32_SLACK):
        problems.append(f"max |x| {top:.6g} is outside the bound {law.bound:.6g}")
    if law.edge_rate:
        # P(no value beyond bound * (1 - d)) <= (1 - rate d)^n <= exp(-rate d n) = P_FALSE.
        floor = law.bound * (1 - math.log(1 / P_FALSE) / (law.edge_rate * n))
        if top < floor:
            problems.append(f"max |x| {top:.6g} never reaches {floor:.6g}: too narrow")
    if abs(mean) > Z * law.std / math.sqrt(n):  # standard error of the mean: std / sqrt(n)
        problems.append(f"mean {mean:.4g} is off 0 by more than {Z:g} standard errors "
                        f"({law.std / math.sqrt(n):.3g})")
    if abs(std - law.std) > Z * std_se(law, n):
        problems.append(f"std {std:.6g} != {law.std:.6g} (+-{Z * std_se(law, n):.3g})")
    p = law.p_within_std
    se_p = math.sqrt(p * (1 - p) / n)  # binomial standard error of a proportion
    if abs(within - p) > Z * se_p:
        problems.append(f"share within one std {within:.4f} != {p:.4f} (+-{Z * se_p:.3g})")
    return [f"{law.name}, n={n}: {problem}" for problem in problems]


def std_disagreement(a: np.ndarray, b: np.ndarray, law: Law) -> str | None:
    """Whether two samples' stds differ by more than Z standard errors of their difference."""
    na, nb = np.size(a), np.size(b)
    sa, sb = float(np.std(np.asarray(a, np.float64))), float(np.std(np.asarray(b, np.float64)))
    se = math.hypot(std_se(law, na), std_se(law, nb))
    if abs(sa - sb) > Z * se:
        return f"stds differ: {sa:.6g} (n={na}) vs {sb:.6g} (n={nb}), more than {Z * se:.3g}"
    return None


# -- drawing the two frameworks' inits -------------------------------------------------------


def jax_drawer(model_cfg: dict):
    """``seed -> {torch name: array in torch layout}`` through ``jaxnets.models.build_model``,
    jitted: drawing is cheap after one compile. ``nnx.Rngs`` takes a key as well as an int
    seed (it makes ``jax.random.key(seed)`` of an int), so the numbers are build_model's own,
    as :func:`test_jitted_draws_are_build_models_own` checks."""

    def params(key):
        model = jax_models.build_model(model_cfg, key)
        flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
        return {".".join(map(str, path)): var.get_value() for path, var in flat}

    compiled = jax.jit(params)
    return lambda seed: flax_to_torch(jax.device_get(compiled(jax.random.key(seed))))


def torch_draw(model_cfg: dict, seed: int) -> dict[str, np.ndarray]:
    model = torch_models.build_model(model_cfg, seed)
    return {name: value.numpy().copy() for name, value in model.state_dict().items()}


def draws_needed(size: int) -> int:
    return max(MIN_DRAWS, math.ceil(N_TARGET / size))


def collect(draw, n_draws: dict[str, int]) -> dict[str, list[np.ndarray]]:
    """The first ``n_draws[name]`` draws of each tensor (seeds 0, 1, ...), nothing more kept."""
    kept = {name: [] for name in n_draws}
    for seed in range(max(n_draws.values())):
        params = draw(seed)
        for name, k in n_draws.items():
            if seed < k:
                kept[name].append(params[name])
    return kept


def fan_in_of(shapes: dict[str, tuple[int, ...]], name: str) -> int:
    """From torch's layout: Linear weight (out, in), Conv2d weight (out, in, kh, kw); a bias
    has its weight's fan_in."""
    prefix, _, _ = name.rpartition(".")
    return math.prod(shapes[f"{prefix}.weight"][1:])


def init_problems(config: str, scheme: str) -> list[str]:
    """Every mismatch between theory, the JAX init and torch's, for one config and scheme."""
    model_cfg = load_config(config, [f"model.init={scheme}"])["model"]
    shapes = {name: v.shape for name, v in torch_draw(model_cfg, 0).items()}
    laws = {name: expected_law(scheme, name.rpartition(".")[2], fan_in_of(shapes, name),
                               model_cfg["init_std"]) for name in shapes}
    random_sizes = [math.prod(shapes[name]) for name, law in laws.items() if law is not None]
    n_all = max(draws_needed(size) for size in random_sizes)
    n_draws = {name: n_all if law is None else draws_needed(math.prod(shapes[name]))
               for name, law in laws.items()}
    sides = {"jax": collect(jax_drawer(model_cfg), n_draws),
             "torch": collect(lambda seed: torch_draw(model_cfg, seed), n_draws)}

    problems = []
    for name, law in laws.items():
        pooled = {}
        for side, kept in sides.items():
            where = f"{config} init={scheme} {side} {name}"
            if kept[name][0].shape != shapes[name]:
                problems.append(f"{where}: shape {kept[name][0].shape} != {shapes[name]}")
                continue
            if law is None:
                if any(np.any(v != 0) for v in kept[name]):
                    problems.append(f"{where}: not all zero")
                continue
            if np.array_equal(kept[name][0], kept[name][1]):
                problems.append(f"{where}: seeds 0 and 1 give the same values")
            pooled[side] = np.concatenate([v.ravel() for v in kept[name]])
            problems += [f"{where}: {m}" for m in mismatches(pooled[side], law)]
        if len(pooled) == 2:
            disagreement = std_disagreement(pooled["jax"], pooled["torch"], law)
            if disagreement:
                problems.append(f"{config} init={scheme} {name}: jax vs torch {disagreement}")
    return problems


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("config", MODEL_CONFIGS)
def test_torch_default_init_has_torchs_law(config):
    problems = init_problems(config, "torch")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("config", ["d2l_mlp_fashion", "convnet_mnist"])
def test_normal_init(config):
    """d2l: weights N(0, init_std^2) on both sides, biases keep torch's default."""
    problems = init_problems(config, "normal")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("config", ["convnet_mnist", "regression_tanh"])
def test_flax_init(config):
    """lecun_normal weights (std sqrt(1/fan_in), |w| <= 2 underlying stds), zero biases: JAX's
    own and torchref's reimplementation. regression_tanh has fan_in 1, where std is 1."""
    problems = init_problems(config, "flax")
    assert not problems, "\n".join(problems)


def test_jitted_draws_are_build_models_own():
    """The statistics above are about build_model's numbers, not a lookalike path."""
    model_cfg = load_config("regression_tanh")["model"]
    draw = jax_drawer(model_cfg)
    for seed in (0, 7):
        eager = flax_to_torch(flax_params(jax_models.build_model(model_cfg, seed)))
        jitted = draw(seed)
        assert eager.keys() == jitted.keys()
        for name in eager:
            np.testing.assert_array_equal(jitted[name], eager[name], err_msg=name)


# The checker's power, at the smallest pooled sample (N_TARGET values) and a real fan_in
# (LeNet's fc1): each wrong law must be reported, and the right one must not.
FAN_IN = 400
BOUND = 1 / math.sqrt(FAN_IN)


def _weights(fill) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    weight = torch.empty(N_TARGET // FAN_IN, FAN_IN)  # nn.Linear(400, 10).weight's layout
    fill(weight, generator)
    return weight.numpy()


def test_checker_accepts_torchs_default():
    torch.manual_seed(0)
    weight = torch.nn.Linear(FAN_IN, N_TARGET // FAN_IN).weight.detach().numpy()
    assert mismatches(weight, uniform(BOUND)) == []


WRONG_UNIFORMS = {
    # kaiming_uniform with a=0 (the ReLU gain): bound sqrt(6 / fan_in), 2.45 times too wide
    "kaiming_uniform a=0": (lambda w, g: torch.nn.init.kaiming_uniform_(w, a=0, generator=g),
                            "outside the bound"),
    # the right formula on the wrong fan (fan_out = 10): 6.3 times too wide
    "fan_out": (lambda w, g: torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), mode="fan_out",
                                                            generator=g), "outside the bound"),
    # 10% too narrow, inside the bound: the edge check must catch it
    "too narrow": (lambda w, g: w.uniform_(-0.9 * BOUND, 0.9 * BOUND, generator=g),
                   "too narrow"),
    # the right std, the wrong shape
    "normal, same std": (lambda w, g: w.normal_(0, BOUND / math.sqrt(3), generator=g),
                         "share within one std"),
    # shifted by 0.1 bound: in range, right width, wrong mean
    "shifted": (lambda w, g: w.uniform_(-0.9 * BOUND, 0.9 * BOUND, generator=g).add_(0.1 * BOUND),
                "mean"),
}


@pytest.mark.parametrize("wrong", WRONG_UNIFORMS)
def test_checker_rejects_wrong_uniforms(wrong):
    fill, expected = WRONG_UNIFORMS[wrong]
    problems = mismatches(_weights(fill), uniform(BOUND))
    assert any(expected in problem for problem in problems), problems


def test_checker_rejects_wrong_lecun_normals():
    law = truncated_normal(math.sqrt(1 / FAN_IN) / TRUNC_STD)
    right = _weights(lambda w, g: torch.nn.init.trunc_normal_(
        w, 0, law.bound / 2, -law.bound, law.bound, generator=g))
    assert mismatches(right, law) == []
    # not truncated: values beyond 2 stds
    untruncated = _weights(lambda w, g: w.normal_(0, math.sqrt(1 / FAN_IN), generator=g))
    assert any("outside the bound" in p for p in mismatches(untruncated, law))
    # truncated, but without Flax's 1/0.8796 correction: 12% too small a std
    s = math.sqrt(1 / FAN_IN)
    uncorrected = _weights(lambda w, g: torch.nn.init.trunc_normal_(w, 0, s, -2 * s, 2 * s,
                                                                      generator=g))
    assert any("std" in p for p in mismatches(uncorrected, law))


def test_checker_rejects_disagreeing_stds():
    wide = _weights(lambda w, g: w.uniform_(-BOUND, BOUND, generator=g))
    narrow = _weights(lambda w, g: w.uniform_(-0.9 * BOUND, 0.9 * BOUND, generator=g))
    assert std_disagreement(wide, narrow, uniform(BOUND)) is not None
    assert std_disagreement(wide, wide[::-1], uniform(BOUND)) is None
