"""``jaxnets parity``: evidence that each JAX model computes what its PyTorch twin computes.

A front end of the verification engine (``torchref.verify``): for every config, from PyTorch's
initial weights converted into the Flax model and identical inputs, the engine's layer-by-layer
forward and backward (the zoo's pair as any user's pair), the loss, every parameter's gradient;
then one optimizer step and a K-step training trajectory on the config's first K batches (the
engine's training rows, bounds measured in the run). Each check records its max-abs and
max-relative difference against its tolerance; a failed check names the first layer whose
values differ beyond it, so a broken port points at its own bug.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxnets import convert
from jaxnets.data import Dataset, epoch_batches, load_dataset, model_arrays
from jaxnets.report import write_json
from torchref.numerics import numerics, read_numerics, tf32_summary, torch_device
from torchref.verify.mapping import Mapping

# The forward, loss and gradient checks' fixed tolerances (max-abs, Flax against PyTorch at
# the same precision), each with its reason; the engine judges the same rows against PyTorch
# float64 too. The step and trajectory checks have no fixed tolerance: their bounds are the
# engine's, measured in the run (torchref.verify.training, torchref.verify.spread).
TOLERANCES = {
    "float32": {
        # one forward pass: a few float32 roundings (~6e-8 relative) per layer, summed over
        # up to 980 products in different orders, on activations of order 1-10
        "forward": 1e-5,
        "loss": 1e-5,  # a mean of forward outputs through log-softmax: the forward's bound
        # backward sums over the batch as well: an order more accumulation than the forward
        "gradients": 1e-4,
    },
    "float64": {
        # float64 rounding is ~1e-16 relative: 1e-12 leaves room for accumulation only
        "forward": 1e-12,
        "loss": 1e-12,
        "gradients": 1e-10,  # the batch sum adds accumulation, as in float32
    },
}


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
    # step and trajectory checks: PyTorch float32's own error against float64 (one step), or
    # the largest deviation of the ensemble of one-ulp-moved PyTorch runs (trajectories), of
    # the row closest to its bound; None in float64 and for the fixed-tolerance checks
    torch_noise: float | None = None


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


def probe_batch(cfg: dict[str, Any], dataset: Dataset, size: int = 64) -> Dataset:
    """The first ``size`` training examples (all of them for the full-batch toys)."""
    count = len(dataset.train_x) if cfg["train"]["batch_size"] >= len(dataset.train_x) else size
    return dataset.head(count, count)


def twins(cfg, dataset, dtype, device, converter, flax_cfg=None):
    """A JAX and a PyTorch trainer (for their models) from the same initial weights; the JAX
    side from ``flax_cfg`` where given (a port whose layer list or optimizer differs)."""
    from jaxnets.train import Trainer as JaxTrainer
    from torchref.train import Trainer as TorchTrainer

    torch_side = TorchTrainer(cfg, dataset, dtype=dtype,
                              device="cuda" if device == "gpu" else "cpu")
    jax_side = JaxTrainer(flax_cfg or cfg, dataset, dtype=dtype)
    jax_side.load_weights(converter(torch_side.weights()))
    return jax_side, torch_side


def converter_load(converter: Callable[[dict], dict]) -> Callable:
    """``load(torch_model, flax_model)`` for the engine: the Flax weights from torch's
    state_dict through ``converter`` (a test plants a wrong one)."""
    def load(torch_model, flax_model):
        weights = {k: v.detach().cpu().numpy().copy() for k, v in
                   torch_model.state_dict().items()}
        convert.load_flax_params(flax_model, converter(weights))
    return load


def engine_checks(cfg, jax_side, torch_side, torch_x, torch_y, converter, tol, dtype
                  ) -> tuple[list[Check], Any]:
    """The engine's rows (``torchref.verify``) for one config as parity's forward, loss and
    gradients checks. A check passes when the engine judges every row of it (the Flax side
    against PyTorch float64, within PyTorch's own float32 error; or float64's tolerances)
    *and* its largest Flax-vs-PyTorch difference stays within this module's fixed tolerance,
    as before the engine existed. ``converter`` puts the weights in (a test plants a wrong
    one). Returns the checks and the engine's weight mapping."""
    from torchref.verify.engine import verify

    report = verify(torch_side.model, jax_side.model, torch_x, targets=torch_y,
                    loss=cfg["train"]["loss"], dtype=dtype, modes=("eval",),
                    load=converter_load(converter))
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
    return checks, report.mapping


class ConvertMapping(Mapping):
    """The zoo's weight mapping: ``jaxnets.convert``'s name and layout rules, for every
    parameter and BatchNorm statistic (the engine's proposal pairs standard layers only)."""

    def torch_to_flax(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return convert.torch_to_flax({k: v for k, v in tensors.items() if k in self.params})


def zoo_mapping(torch_model, flax_model, layers: list[tuple[str, str]]) -> ConvertMapping:
    from flax import nnx

    flax_names = set(convert.flat_arrays(nnx.state(flax_model, (nnx.Param, nnx.BatchStat))))
    mapping = ConvertMapping(layers=layers)
    for name, tensor in [*torch_model.named_parameters(), *torch_model.named_buffers()]:
        try:
            (flax_name,) = convert.torch_to_flax({name: tensor.detach().cpu().numpy()})
        except (KeyError, ValueError, TypeError):  # no Flax twin (num_batches_tracked, draws)
            continue
        if flax_name in flax_names:
            mapping.params[name] = (flax_name, "jaxnets.convert")
    return mapping


def trajectory_batches(cfg: dict[str, Any], dataset: Dataset, steps: int
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The config's first ``steps`` training batches (PyTorch layout), as its trainers draw
    them (``jaxnets.data.epoch_batches``; a full-batch config repeats its one batch)."""
    bs = cfg["train"]["batch_size"]
    data = dataset.head(min(len(dataset.train_x), steps * bs), 1)
    x, y, _, _ = model_arrays(data, cfg, "torch")
    plan: list[np.ndarray] = []
    epoch = 0
    while len(plan) < steps:
        full, rest = epoch_batches(len(x), bs, cfg["seed"], epoch, cfg["train"]["shuffle"])
        plan += [*full, *([] if rest is None else [rest])]
        epoch += 1
    return [(x[idx], y[idx]) for idx in plan[:steps]]


def rows_check(cfg: dict[str, Any], name: str, rows: list) -> Check:
    """One parity check from engine rows: passed when every row is within its bound; the
    figures are those of the row closest to its bound; the first failing row is named. No
    rows (plain SGD keeps no optimizer state, and no BatchNorm): nothing to compare, passed."""
    if not rows:
        return Check(cfg["name"], name, 0.0, 0.0, 0.0, True, None, "nothing to compare")
    worst = max(rows, key=lambda r: r.margin)
    bad = [r for r in rows if not r.passed]
    first = None
    if bad:
        tensor = bad[0].layer.rpartition(": ")[2]
        first = layer_of(tensor) if "." in tensor else bad[0].layer
    shown = bad[0] if bad else worst
    undetermined = sum(r.extra.get("undetermined", 0) for r in rows
                       if r.layer.startswith("step 1:") or r.check != "step")
    fed = [r for r in rows if "vs_reference_max_abs" in r.extra]
    detail = (f"{shown.layer} ({shown.mode}): error {shown.error:.3g} against PyTorch "
              f"float64, bound {shown.bound:.3g} ({shown.margin:.2g}x)"
              + (f"; {undetermined} entries: update undetermined (gradient at rounding level)"
                 if undetermined else "")
              + (f"; {len(fed)} tensors judged against the reference optimizer fed Flax's "
                 f"gradients (up to {max(r.extra['vs_reference_max_abs'] for r in fed):.3g} "
                 "from the reference's own step)" if fed else ""))
    return Check(cfg["name"], name, worst.error, worst.stats["max_rel"], worst.bound,
                 not bad, first, detail,
                 worst.torch_error if worst.dtype == "float32" else None)


def check_config(cfg: dict[str, Any], dataset: Dataset, dtype: str = "float32",
                 device: str = "cpu", steps: int = 100,
                 converter: Callable[[dict], dict] = convert.torch_to_flax,
                 flax_cfg: dict[str, Any] | None = None) -> list[Check]:
    """Every check for one config. ``converter`` maps torch weights to Flax weights, and
    ``flax_cfg`` (default ``cfg``) builds the JAX side's model and optimizer: the bug
    catalogue plants a wrong converter, a changed layer option or optimizer setting there to
    see the report name the broken layer or step (parity_tests/test_catalogue_zoo.py)."""
    from jaxnets.optim import make_optimizer
    from torchref.optim import make_optimizer as make_torch_optimizer
    from torchref.verify.pair import Pair
    from torchref.verify.training import training_rows

    batch = probe_batch(cfg, dataset)
    jax_side, torch_side = twins(cfg, batch, dtype, device, converter, flax_cfg)
    torch_x, torch_y, _, _ = model_arrays(batch, cfg, "torch")
    # forward, loss and gradients: the verification engine, layer by layer, against PyTorch
    # in float64, on the zoo's pair as on any user's pair
    checks, mapping = engine_checks(cfg, jax_side, torch_side, torch_x, torch_y, converter,
                                    TOLERANCES[dtype], dtype)
    # one step (resynced: its own bias) and a K-step trajectory (free-running) on the config's
    # first K batches: the engine's training rows, bounds measured in the run
    # the zoo's own mapping for the comparisons; ``converter`` sets the start under test
    mapping = zoo_mapping(torch_side.model, jax_side.model, mapping.layers)
    rows = training_rows(Pair(torch_side.model, jax_side.model, dtype, "nhwc"), mapping,
                         trajectory_batches(cfg, dataset, steps), cfg["train"]["loss"],
                         lambda params: make_torch_optimizer(cfg["optimizer"], params),
                         make_optimizer((flax_cfg or cfg)["optimizer"]), resynced_steps=1,
                         load=converter_load(converter), seed=cfg["seed"],
                         flax_apply=lambda model, x: model(x, train=True))
    free = [r for r in rows if r.mode == "free-running"]
    k = f"trajectory_{steps}_steps"
    checks += [rows_check(cfg, "step", [r for r in rows
                                         if r.mode == "resynced" and r.check == "step"]),
               rows_check(cfg, k, [r for r in free if r.check == "loss"]),
               rows_check(cfg, f"{k}_weights", [r for r in free if r.check == "step"]),
               rows_check(cfg, f"{k}_state", [r for r in rows if r.check.startswith("state")])]
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
