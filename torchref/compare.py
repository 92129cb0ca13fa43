"""The side-by-side run: both frameworks from the same initial weights on the same batches.

PyTorch initialises the model; its ``state_dict`` goes through a safetensors file into the
Flax model (``jaxnets.convert``); then each block of epochs runs in JAX and in PyTorch on the
index batches ``jaxnets.data.epoch_batches`` made once, and a table row compares them. An
ensemble config repeats this for each member (seeds ``seed``, ``seed + 1``, ...). Both run on
one device with the same numerics (``torchref.numerics``: TF32 off on both), and the report
records the devices and settings as each framework reports them.
"""

from __future__ import annotations

import copy
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch

import jaxnets
from jaxnets import convert
from jaxnets.data import Dataset, load_dataset
from jaxnets.figures import regression_grid, run_figures
from jaxnets.report import (
    compare_header,
    compare_markdown,
    compare_row,
    eval_blocks,
    write_json,
)
from jaxnets.train import Trainer as JaxTrainer
from torchref.numerics import numerics, read_numerics, torch_device
from torchref.train import Trainer as TorchTrainer


def versions() -> dict[str, str]:
    import flax
    import optax

    return {"python": platform.python_version(), "jaxnets": jaxnets.__version__,
            "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "torch": torch.__version__, "numpy": np.__version__}


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest absolute difference over every tensor of two same-named weight sets (torch's
    first), but BatchNorm's num_batches_tracked, which the Flax side does not keep."""
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a
               if not k.endswith(".num_batches_tracked"))


def _diff(a: float | None, b: float | None, scale: float = 1.0) -> float | None:
    return None if a is None or b is None else scale * (a - b)


def compare_member(cfg: dict[str, Any], dataset: Dataset, out: Path, progress: bool,
                   echo: Callable[[str], None], device: str = "cpu",
                   dtype: str = "float32") -> dict[str, Any]:
    """One model trained side by side on ``device`` in ``dtype``; returns its part of the
    report."""
    torch_side = TorchTrainer(cfg, dataset, dtype=dtype, device=torch_device(device))
    jax_side = JaxTrainer(cfg, dataset, dtype=dtype)

    # Identical start: torch's initial weights -> safetensors -> the Flax model.
    initial = out / f"initial_weights_torch_seed{cfg['seed']}.safetensors"
    convert.write_safetensors(torch_side.weights(), initial, framework="torch")
    jax_side.load_weights(convert.torch_to_flax(convert.read_safetensors(initial)))
    init_diff = max_abs_diff(torch_side.weights(), convert.flax_to_torch(jax_side.weights()))

    echo(compare_header())
    epochs, first_step, step_losses = [], None, []
    for block in eval_blocks(cfg["train"]["epochs"], cfg["train"]["eval_every"]):
        jax_stats = jax_side.train_epochs(block, progress)
        torch_stats = torch_side.train_epochs(block, progress)
        for j, t in ((jax_side, jax_stats[-1]), (torch_side, torch_stats[-1])):
            t.test_loss, t.test_accuracy = j.evaluate()
        if first_step is None:
            first_step = {"jax": float(jax_stats[0].step_losses[0]),
                          "torch": float(torch_stats[0].step_losses[0])}
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as log:
            for epoch, j, t in zip(block, jax_stats, torch_stats, strict=True):
                step_losses.append({"jax_steps": j.step_losses, "torch_steps": t.step_losses})
                step_diff = float(np.max(np.abs(j.step_losses - t.step_losses)))
                epochs.append({"epoch": epoch + 1, "jax": j.as_dict(), "torch": t.as_dict(),
                               "step_loss_max_abs_diff": step_diff})
                log.write(json.dumps({"seed": cfg["seed"], **epochs[-1]}) + "\n")
        block_diff = max(e["step_loss_max_abs_diff"] for e in epochs[-len(block):])
        echo(compare_row(block.stop, jax_stats[-1], torch_stats[-1], block_diff,
                         sum(s.seconds for s in jax_stats), sum(s.seconds for s in torch_stats)))
    last = epochs[-1]
    jax_out = np.asarray(jax_side.apply(jax_side.params, jax_side.other, jax_side.test_x))
    with torch.no_grad():  # eval mode on both sides
        torch_out = torch_side.model.eval()(torch_side.test_x).cpu().numpy()
    return {
        "seed": cfg["seed"],
        "initial_weights_max_abs_diff": init_diff,
        "first_step_loss": first_step,
        "epochs": epochs,
        "final": {
            "jax_test_accuracy": last["jax"]["test_accuracy"],
            "torch_test_accuracy": last["torch"]["test_accuracy"],
            "accuracy_diff_pp": _diff(last["jax"]["test_accuracy"],
                                      last["torch"]["test_accuracy"], 100.0),
            "jax_test_loss": last["jax"]["test_loss"],
            "torch_test_loss": last["torch"]["test_loss"],
            "jax_train_seconds": sum(e["jax"]["seconds"] for e in epochs),
            "torch_train_seconds": sum(e["torch"]["seconds"] for e in epochs),
            "jax_compile_seconds": jax_side.compile_seconds,
            "final_weights_max_abs_diff": max_abs_diff(
                torch_side.weights(), convert.flax_to_torch(jax_side.weights())),
        },
        "test_outputs": {"jax": jax_out, "torch": torch_out},
        "step_losses": {"jax": np.concatenate([e["jax_steps"] for e in step_losses]),
                        "torch": np.concatenate([e["torch_steps"] for e in step_losses])},
        "trainers": {"jax": jax_side, "torch": torch_side},
    }


def compare(cfg: dict[str, Any], out: Path, progress: bool = True,
            echo: Callable[[str], None] = print, device: str = "cpu",
            devices: int = 1, dtype: str = "float32") -> dict[str, Any]:
    """Train ``cfg`` in both frameworks side by side on ``device`` ("cpu" or "gpu", in
    ``dtype``, TF32 off: :func:`torchref.numerics.numerics`); write ``out/report.json`` and
    ``.md``.
    ``devices`` > 1: then also data-parallel on that many devices in both frameworks
    (:mod:`torchref.parallel_compare`), with one PyTorch thread per process throughout."""
    with numerics(dtype, device, threads=1 if devices > 1 else None):
        return _compare(cfg, out, progress, echo, device, devices, dtype)


def _compare(cfg: dict[str, Any], out: Path, progress: bool, echo: Callable[[str], None],
             device: str, devices: int = 1, dtype: str = "float32") -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("", encoding="utf-8")  # appended to, epoch by epoch
    dataset = load_dataset(cfg["data"])
    size = cfg["train"]["ensemble"]
    echo(f"{cfg['name']}: {dataset.name} from {dataset.source}; {len(dataset.train_x)} "
         f"training and {len(dataset.test_x)} test examples"
         + (f"; an ensemble of {size} models (seeds {cfg['seed']}..{cfg['seed'] + size - 1})"
            if size > 1 else ""))
    members = []
    for m in range(size):
        member_cfg = copy.deepcopy(cfg)
        member_cfg["seed"] = cfg["seed"] + m
        if size > 1:
            echo(f"member {m + 1}/{size} (seed {member_cfg['seed']})")
        members.append(compare_member(member_cfg, dataset, out, progress,
                                      echo if m == 0 else (lambda _line: None), device,
                                      dtype))
        if m > 0:
            f = members[-1]["final"]
            echo(f"  final test loss: jax {f['jax_test_loss']:.6f}, torch "
                 f"{f['torch_test_loss']:.6f}")
    first = members[0]
    for fw, trainer in first["trainers"].items():  # the (first) model, for `jaxnets predict`
        convert.write_safetensors(trainer.weights(), out / f"weights_{fw}.safetensors",
                                  framework=fw)
    report: dict[str, Any] = {
        "config": cfg, "dataset": dataset.name, "data_source": dataset.source,
        "num_train": len(dataset.train_x), "num_test": len(dataset.test_x),
        "versions": versions(),
        # as each framework reports them: where the training data lives, and the settings
        "devices": {fw: t.data_device() for fw, t in first["trainers"].items()},
        "numerics": read_numerics(),
        "dtype": dtype,
        "processes": {"jax": jax.process_count(), "torch": 1},  # the side-by-side run
        "timing": {fw: t.timing for fw, t in first["trainers"].items()},
        "initial_weights_max_abs_diff": max(m["initial_weights_max_abs_diff"] for m in members),
        "first_step_loss": first["first_step_loss"],
        "epochs": first["epochs"],
        "final": first["final"],
        "command": " ".join(["jaxnets", *sys.argv[1:]]),
    }
    if size > 1:
        outputs = {fw: np.stack([m["test_outputs"][fw] for m in members]) for fw in ("jax",
                                                                                   "torch")}
        report["ensemble"] = {
            "members": [{"seed": m["seed"], **m["final"]} for m in members],
            "jax_test_loss_mean": float(np.mean([m["final"]["jax_test_loss"] for m in members])),
            "torch_test_loss_mean": float(np.mean([m["final"]["torch_test_loss"]
                                                   for m in members])),
            "prediction_mean_max_abs_diff": float(np.max(np.abs(
                outputs["jax"].mean(0) - outputs["torch"].mean(0)))),
            "prediction_std_max_abs_diff": float(np.max(np.abs(
                outputs["jax"].std(0) - outputs["torch"].std(0)))),
        }
    if dataset.name == "cubic":  # every member's fit, for the ensemble bands
        grid = regression_grid(dataset)
        report["regression_grid"] = {"x": grid[:, 0], **{
            fw: np.stack([m["trainers"][fw].predict(grid)[:, 0] for m in members])
            for fw in ("jax", "torch")}}
    report["figures"] = [str(p) for p in run_figures(
        out, cfg, dataset, {fw: [{"epoch": e["epoch"], **e[fw]} for e in first["epochs"]]
                            for fw in ("jax", "torch")},
        {fw: [m["trainers"][fw].predict for m in members] for fw in ("jax", "torch")})]
    markdown = compare_markdown(report)
    if devices > 1:
        from torchref.parallel_compare import data_parallel, parallel_markdown

        echo(f"data parallel on {devices} devices: jax (one process) and torch DDP "
             f"({devices} processes)")
        report["parallel"] = data_parallel(cfg, dataset, out, devices, first, device, dtype)
        markdown += parallel_markdown(report["parallel"])
        for key in ("jax_vs_one_device", "torch_vs_one_device", "jax_vs_torch"):
            diff = report["parallel"][key]
            echo(f"  {key.replace('_', ' ')}: per-step loss {diff['step_loss']:.3g}, "
                 f"weights {diff['weights']:.3g} (max-abs)")
    write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown, encoding="utf-8")
    final = report["final"]
    if final["jax_test_accuracy"] is not None:
        echo(f"final test accuracy: jax {100 * final['jax_test_accuracy']:.2f} %, torch "
             f"{100 * final['torch_test_accuracy']:.2f} % ({final['accuracy_diff_pp']:+.2f} pp)")
    echo(f"final test loss: jax {final['jax_test_loss']:.6f}, torch "
         f"{final['torch_test_loss']:.6f}; training seconds: jax "
         f"{final['jax_train_seconds']:.1f}, torch {final['torch_train_seconds']:.1f} (jax "
         f"compilation {final['jax_compile_seconds']:.1f} s, timed apart)")
    if size > 1:
        ens = report["ensemble"]
        echo(f"ensemble of {size}: mean test loss jax {ens['jax_test_loss_mean']:.6f}, torch "
             f"{ens['torch_test_loss_mean']:.6f}; ensemble-mean prediction max-abs diff "
             f"{ens['prediction_mean_max_abs_diff']:.3g}")
    if cfg["reported_result"]:  # a user's own config has no source to compare with
        echo(f"source's reported result ({cfg['source']}): {cfg['reported_result']}")
    echo(f"report: {out / 'report.md'} and {out / 'report.json'}; pictures: "
         + ", ".join(Path(p).name for p in report["figures"]))
    return report
