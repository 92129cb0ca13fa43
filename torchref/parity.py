"""``jaxnets parity``: evidence that each JAX model computes what its PyTorch twin computes.

A front end of the verification engine (``torchref.verify``): for every config, from PyTorch's
initial weights converted into the Flax model and identical inputs, the engine's layer-by-layer
forward and backward (the zoo's pair as any user's pair), the loss, every parameter's gradient;
then one optimizer step and a K-step training trajectory on identical batches. Each check
records its max-abs and max-relative difference against a stated tolerance; a failed check
names the first layer whose values differ beyond it, so a broken port points at its own bug.
"""

from __future__ import annotations

import contextlib
import copy
import math
import platform
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxnets import convert
from jaxnets.data import Dataset, load_dataset, model_arrays
from jaxnets.report import write_json
from torchref.numerics import numerics, read_numerics, tf32_summary, torch_device

# Tolerances (max-abs), each with its reason.
TOLERANCES = {
    "float32": {
        # one forward pass: a few float32 roundings (~6e-8 relative) per layer, summed over
        # up to 980 products in different orders, on activations of order 1-10
        "forward": 1e-5,
        "loss": 1e-5,  # a mean of forward outputs through log-softmax: the forward's bound
        # backward sums over the batch as well: an order more accumulation than the forward
        "gradients": 1e-4,
        # one update moves weights by ~lr; the rounding on top is far below 1e-5, except
        # where Adam divides a gradient of size ~eps by itself (lr * 1e-2 at worst)
        "step": 1e-5,
        # 100 steps: the rounding of each step feeds the next; measured drifts are ~1e-5-1e-4
        "trajectory": 1e-3,
        "trajectory_weights": 1e-3,
    },
    "float64": {
        # float64 rounding is ~1e-16 relative: 1e-12 leaves room for accumulation only
        "forward": 1e-12,
        "loss": 1e-12,
        "gradients": 1e-10,  # the batch sum adds accumulation, as in float32
        "step": 1e-12,
        "trajectory": 1e-9,  # 100 steps of feedback on 1e-16-level rounding
        "trajectory_weights": 1e-9,
    },
}


def tolerances(cfg: dict[str, Any], dtype: str, steps: int) -> dict[str, float]:
    """The tolerances for one config. Adam in float32 gets wider step and trajectory bounds:
    it divides each gradient entry by its own magnitude, lr * g / (|g| + eps), so an entry of
    size ~1e-8 whose float32 rounding differs by ~1e-9 between the frameworks (their sums run in
    different orders) moves by ~0.1 lr, and an entry near zero whose sign differs moves by 2 lr.
    Float64 rounding is too small for that and keeps the common bounds."""
    tol = dict(TOLERANCES[dtype])
    if dtype == "float32" and cfg["optimizer"]["name"] in ("adam", "adamw"):
        lr = cfg["optimizer"]["learning_rate"]
        tol["step"] = 0.1 * lr  # measured: 2.0e-5 for mlp_fashion at lr 1e-3
        tol["trajectory_weights"] = 2 * lr * steps  # worst case: a sign flip at every step
        # measured: 3.8e-3 for mlp_fashion over 100 steps, while PyTorch against itself
        # (batches reversed, one thread) stays at ~1e-7: see the README's parity section
        tol["trajectory"] = 1e-2
    return tol


NOISE_MARGIN = 2.0


def compared(torch_weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The torch weights a JAX twin also holds: all but BatchNorm's ``num_batches_tracked``,
    which Flax does not keep (``jaxnets.convert.drop_num_batches_tracked``)."""
    return {k: v for k, v in torch_weights.items() if not k.endswith(".num_batches_tracked")}


def weights_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(diffs(a[name], value)[0] for name, value in compared(b).items())


def noise_bound(tolerance: float, floor: float | None) -> float:
    """A training step or trajectory passes within its tolerance, or within twice the noise
    floor where that is larger. Training amplifies rounding: over many steps (a max-pool
    window whose two largest values differ by a rounding error routes its gradient to either),
    and in one step through Adam's lr g / (|g| + eps) on tiny gradients. So two correct float32
    implementations can differ by as much as PyTorch differs from itself when only its
    summation order and kernels change. The floor is measured in the same run, never assumed;
    in float64 it is ~1e-15 and the fixed tolerances decide."""
    return tolerance if floor is None else max(tolerance, NOISE_MARGIN * floor)


@dataclass
class Check:
    config: str
    check: str
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    passed: bool
    first_divergent_layer: str | None = None
    detail: str = ""
    # how far PyTorch drifts from itself when only the rounding changes (each batch reversed)
    noise_floor: float | None = None


def diffs(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Max-abs and max-relative difference (relative to max(|b|, 1e-30) per element)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return math.inf, math.inf
    if not a.size:
        return 0.0, 0.0
    absolute = np.abs(a - b)
    return float(absolute.max()), float((absolute / np.maximum(np.abs(b), 1e-30)).max())


def layer_of(param_name: str) -> str:
    """``"layers.0.weight"`` -> ``"layers.0"``."""
    return param_name.rpartition(".")[0]


def _named_check(cfg, check, pairs: list[tuple[str, np.ndarray, np.ndarray]], tol,
                 detail: str = "", noise_floor: float | None = None) -> Check:
    """One check over named tensor pairs (in model order); the first over ``tol`` is named."""
    worst_abs, worst_rel, first = 0.0, 0.0, None
    for name, a, b in pairs:
        abs_d, rel_d = diffs(a, b)
        worst_abs, worst_rel = max(worst_abs, abs_d), max(worst_rel, rel_d)
        if first is None and not abs_d <= tol:
            first = name
            detail = detail or f"{name}: max-abs difference {abs_d:.3g}"
    return Check(cfg["name"], check, worst_abs, worst_rel, tol, first is None, first, detail,
                 noise_floor)


def probe_batch(cfg: dict[str, Any], dataset: Dataset, size: int = 64) -> Dataset:
    """The first ``size`` training examples (all of them for the full-batch toys)."""
    count = len(dataset.train_x) if cfg["train"]["batch_size"] >= len(dataset.train_x) else size
    return dataset.head(count, count)


@contextlib.contextmanager
def other_kernels():
    """PyTorch with oneDNN (mkldnn) off: its native CPU convolution kernels, which round
    differently. The noise trainer trains inside this context."""
    import torch

    with warnings.catch_warnings():  # the flags also set oneDNN's TF32 and warn on a CPU build
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def twins(cfg, dataset, dtype, device, converter):
    """A JAX and a PyTorch trainer from the same weights, and a second PyTorch trainer from
    those weights that sees every batch in reverse order and trains with oneDNN off (PyTorch's
    other CPU convolution kernels; see :func:`other_kernels`): same mathematics, other float
    rounding. How far PyTorch drifts from itself that way is the noise floor below which no
    port can be asked to agree (see :func:`noise_bound`)."""
    from jaxnets.train import Trainer as JaxTrainer
    from torchref.train import Trainer as TorchTrainer

    torch_device = "cuda" if device == "gpu" else "cpu"
    torch_side = TorchTrainer(cfg, dataset, dtype=dtype, device=torch_device)
    noise = None
    if dtype == "float32":  # in float64 the floor is ~1e-15 and the fixed tolerances decide
        noise = TorchTrainer(cfg, dataset, dtype=dtype, device=torch_device)
        noise.model.load_state_dict(torch_side.model.state_dict())
        noise.reverse_batches = True
    jax_side = JaxTrainer(cfg, dataset, dtype=dtype)
    jax_side.load_weights(converter(torch_side.weights()))
    return jax_side, torch_side, noise


def engine_checks(cfg, jax_side, torch_side, torch_x, torch_y, converter, tol, dtype
                  ) -> list[Check]:
    """The engine's rows (``torchref.verify``) for one config as parity's forward, loss and
    gradients checks. A check passes when the engine judges every row of it (the Flax side
    against PyTorch float64, within PyTorch's own float32 error; or float64's tolerances)
    *and* its largest Flax-vs-PyTorch difference stays within this module's fixed tolerance,
    as before the engine existed. ``converter`` puts the weights in (a test plants a wrong
    one)."""
    from torchref.verify.engine import verify

    def load(torch_model, flax_model):
        weights = {k: v.detach().cpu().numpy().copy() for k, v in
                   torch_model.state_dict().items()}
        convert.load_flax_params(flax_model, converter(weights))

    report = verify(torch_side.model, jax_side.model, torch_x, targets=torch_y,
                    loss=cfg["train"]["loss"], dtype=dtype, modes=("eval",),
                    load=load)
    groups = {"forward": [r for r in report.rows if r.check in ("forward", "input", "proof")
                          and r.layer != "output"],
              "loss": [r for r in report.rows if r.check == "loss"],
              "gradients": [r for r in report.rows if r.check in ("params", "backward")]}
    checks = []
    for name, rows in groups.items():  # rows in execution order (the engine's)
        worst_abs = max((r.extra.get("vs_torch_max_abs", 0.0) for r in rows), default=0.0)
        worst_rel = max((r.extra.get("vs_torch_max_rel", 0.0) for r in rows), default=0.0)
        bad = [r for r in rows if not r.passed
               or not r.extra.get("vs_torch_max_abs", 0.0) <= tol[name]]
        first, detail = None, ""
        if bad:
            first = layer_of(bad[0].layer) if bad[0].check == "params" else bad[0].layer
            if name == "forward" and report.first_divergent_layer:
                first = report.first_divergent_layer
            detail = (f"{first}: max-abs difference {bad[0].extra.get('vs_torch_max_abs', 0):.3g}"
                      f" ({bad[0].check}, {bad[0].mode}: error {bad[0].error:.3g} against "
                      f"PyTorch float64, bound {bad[0].bound:.3g})")
        if name == "forward":
            output = next(r for r in report.rows if r.layer == "output")
            detail += f" (output max-abs {output.extra.get('vs_torch_max_abs', 0.0):.3g})"
        checks.append(Check(cfg["name"], name, worst_abs, worst_rel, tol[name], not bad, first,
                            detail.strip()))
    return checks


def check_config(cfg: dict[str, Any], dataset: Dataset, dtype: str = "float32",
                 device: str = "cpu", steps: int = 100,
                 converter: Callable[[dict], dict] = convert.torch_to_flax) -> list[Check]:
    """Every check for one config. ``converter`` maps torch weights to Flax weights (a test
    passes a deliberately wrong one to see the report name the broken layer)."""
    tol = tolerances(cfg, dtype, steps)
    checks = []
    batch = probe_batch(cfg, dataset)
    jax_side, torch_side, _ = twins(cfg, batch, dtype, device, converter)
    torch_x, torch_y, _, _ = model_arrays(batch, cfg, "torch")

    # forward, loss and gradients: the verification engine, layer by layer, against PyTorch
    # in float64, on the zoo's pair as on any user's pair
    checks += engine_checks(cfg, jax_side, torch_side, torch_x, torch_y, converter, tol, dtype)

    # one optimizer step on that batch (one full batch: batch_size = the batch)
    step_cfg = copy.deepcopy(cfg)
    step_cfg["train"]["batch_size"] = len(batch.train_x)
    jax_side, torch_side, noise = twins(step_cfg, batch, dtype, device, converter)
    for trainer in (jax_side, torch_side):
        trainer.train_epoch(0, progress=False)
    after, reference = convert.flax_to_torch(jax_side.weights()), compared(torch_side.weights())
    floor = None
    if noise is not None:
        with other_kernels():
            noise.train_epoch(0, progress=False)
        floor = weights_diff(noise.weights(), reference)
    checks.append(_named_check(cfg, "step", [
        (layer_of(name), after[name], w) for name, w in reference.items()],
        noise_bound(tol["step"], floor), noise_floor=floor))

    # a K-step trajectory on identical batches
    bs = cfg["train"]["batch_size"]
    limit = min(len(dataset.train_x), steps * bs)
    traj_data = dataset.head(limit, 1)
    per_epoch = math.ceil(limit / bs)
    jax_side, torch_side, noise = twins(cfg, traj_data, dtype, device, converter)
    epochs = range(math.ceil(steps / per_epoch))
    jax_losses, torch_losses = (
        np.concatenate([s.step_losses for s in t.train_epochs(epochs, False)])[:steps]
        .astype(np.float64) for t in (jax_side, torch_side))
    floor = None
    if noise is not None:
        with other_kernels():
            noise_losses = np.concatenate([s.step_losses for s in
                                           noise.train_epochs(epochs, False)])[:steps]
        floor = float(np.abs(noise_losses.astype(np.float64) - torch_losses).max())
    per_step = np.abs(jax_losses - torch_losses)
    bound = noise_bound(tol["trajectory"], floor)
    first_bad = np.flatnonzero(~(per_step <= bound))
    checks.append(Check(
        cfg["name"], f"trajectory_{len(per_step)}_steps", float(per_step.max()),
        diffs(jax_losses, torch_losses)[1], bound, not len(first_bad), None,
        f"per-step loss difference: step 1 {per_step[0]:.3g}, last {per_step[-1]:.3g}"
        + (f"; first over tolerance at step {first_bad[0] + 1}" if len(first_bad) else ""),
        floor))
    final, reference = convert.flax_to_torch(jax_side.weights()), compared(torch_side.weights())
    floor = None if noise is None else weights_diff(noise.weights(), reference)
    checks.append(_named_check(cfg, f"trajectory_{len(per_step)}_steps_weights", [
        (layer_of(name), final[name], w) for name, w in reference.items()],
        noise_bound(tol["trajectory_weights"], floor), noise_floor=floor))
    return checks


def run_parity(cfgs: list[dict[str, Any]], out: Path, dtype: str = "float32",
               device: str = "cpu", steps: int = 100,
               echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Check every config in ``dtype`` on ``device``, inside :func:`torchref.numerics.numerics`
    (x64 for float64, TF32 off; the caller's settings come back afterwards); write
    ``out/report.json`` and ``out/report.md``, with the settings as both frameworks report
    them."""
    with numerics(dtype, device):
        return _check_all(cfgs, out, dtype, device, steps, echo)


def _check_all(cfgs: list[dict[str, Any]], out: Path, dtype: str, device: str, steps: int,
               echo: Callable[[str], None]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    checks: list[Check] = []
    datasets: dict[tuple, Dataset] = {}
    for cfg in cfgs:
        key = (cfg["data"]["dataset"], cfg["data"]["data_dir"], cfg["data"]["seed"])
        if key not in datasets:
            datasets[key] = load_dataset({**cfg["data"], "valid_size": 0, "train_limit": 0})
        results = check_config(cfg, datasets[key], dtype, device, steps)
        checks += results
        bad = [c for c in results if not c.passed]
        echo(f"{cfg['name']:<20} " + ("ok" if not bad else "FAILED: " + "; ".join(
            f"{c.check} {c.max_abs_diff:.3g} > {c.tolerance:g}"
            + (f" (first at {c.first_divergent_layer})" if c.first_divergent_layer else "")
            for c in bad)))
    import torch

    read = read_numerics()  # the settings in force, as each framework reports them
    probe = torch.zeros((), device=torch_device(device))
    report = {"dtype": dtype, "device": device, "steps": steps,
              "devices": {"jax": read["jax"]["device"], "torch": str(probe.device) + (
                  f" ({torch.cuda.get_device_name(probe.device)})" if probe.is_cuda else "")},
              "passed": all(c.passed for c in checks),
              "tf32": tf32_summary(read), "numerics": read,
              "machine": platform.machine(), "checks": [asdict(c) for c in checks]}
    write_json(out / "report.json", report)
    (out / "report.md").write_text(parity_markdown(report), encoding="utf-8")
    echo(f"{sum(c.passed for c in checks)}/{len(checks)} checks passed ({dtype}, {device}); "
         f"report: {out / 'report.md'} and {out / 'report.json'}")
    return report


def parity_markdown(report: dict[str, Any]) -> str:
    lines = [f"# jaxnets parity: {report['dtype']} on {report['device']}", "",
             f"{'All checks passed.' if report['passed'] else 'Some checks FAILED.'} "
             f"Trajectories: {report['steps']} steps. TF32: {report['tf32']}.", "",
             "| config | check | max-abs diff | max-rel diff | tolerance | passed | "
             "first divergent layer |", "|---|---|---:|---:|---:|---|---|"]
    for c in report["checks"]:
        lines.append(f"| {c['config']} | {c['check']} | {c['max_abs_diff']:.3g} | "
                     f"{c['max_rel_diff']:.3g} | {c['tolerance']:g} | "
                     f"{'yes' if c['passed'] else '**no**'} | "
                     f"{c['first_divergent_layer'] or ''} |")
    return "\n".join(lines) + "\n"
