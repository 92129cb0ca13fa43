"""The side-by-side run: both frameworks from the same initial weights on the same batches.

PyTorch initialises the model; its ``state_dict`` goes through a safetensors file into the
Flax model (``jaxnets.convert``); then each epoch runs in JAX and in PyTorch on the index
batches ``jaxnets.data.epoch_batches`` made once, and a table row compares them.
"""

from __future__ import annotations

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
from jaxnets.data import load_dataset
from jaxnets.report import compare_header, compare_markdown, compare_row, write_json
from jaxnets.train import Trainer as JaxTrainer
from torchref.train import Trainer as TorchTrainer


def versions() -> dict[str, str]:
    import flax
    import optax

    return {"python": platform.python_version(), "jaxnets": jaxnets.__version__,
            "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "torch": torch.__version__, "numpy": np.__version__}


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest absolute difference over every tensor of two same-named weight sets."""
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def compare(cfg: dict[str, Any], out: Path, progress: bool = True,
            echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``cfg`` in both frameworks side by side; write ``out/report.json`` and ``.md``."""
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(cfg["data"])
    torch_side = TorchTrainer(cfg, dataset)
    jax_side = JaxTrainer(cfg, dataset)

    # Identical start: torch's initial weights -> safetensors -> the Flax model.
    initial = out / "initial_weights_torch.safetensors"
    convert.write_safetensors(torch_side.weights(), initial)
    jax_side.load_weights(convert.torch_to_flax(convert.read_safetensors(initial)))
    init_diff = max_abs_diff(torch_side.weights(), convert.flax_to_torch(jax_side.weights()))

    echo(f"{cfg['name']}: {dataset.name} from {dataset.source}; {jax_side.num_train} training "
         f"and {len(dataset.test_x)} test examples; initial weights max-abs diff {init_diff:g}")
    echo(compare_header())
    report: dict[str, Any] = {
        "config": cfg, "dataset": dataset.name, "data_source": dataset.source,
        "num_train": jax_side.num_train, "num_test": len(dataset.test_x),
        "versions": versions(), "devices": {"jax": str(jax.devices()[0]), "torch": "cpu"},
        "initial_weights_max_abs_diff": init_diff, "epochs": [],
    }
    for epoch in range(cfg["train"]["epochs"]):
        sides = {}
        for trainer in (jax_side, torch_side):
            stats = trainer.train_epoch(epoch, progress)
            stats.test_loss, stats.test_accuracy = trainer.evaluate()
            sides[trainer.framework] = stats
        j, t = sides["jax"], sides["torch"]
        step_diff = float(np.max(np.abs(j.step_losses - t.step_losses)))
        if epoch == 0:
            report["first_step_loss"] = {"jax": float(j.step_losses[0]),
                                         "torch": float(t.step_losses[0])}
        report["epochs"].append({"epoch": epoch + 1, "jax": j.as_dict(), "torch": t.as_dict(),
                                 "step_loss_max_abs_diff": step_diff})
        echo(compare_row(epoch + 1, j, t, step_diff))
    last = report["epochs"][-1]
    report["final"] = {
        "jax_test_accuracy": last["jax"]["test_accuracy"],
        "torch_test_accuracy": last["torch"]["test_accuracy"],
        "accuracy_diff_pp": 100 * (last["jax"]["test_accuracy"] - last["torch"]["test_accuracy"]),
        "jax_train_seconds": sum(e["jax"]["seconds"] for e in report["epochs"]),
        "torch_train_seconds": sum(e["torch"]["seconds"] for e in report["epochs"]),
        "jax_compile_seconds": jax_side.compile_seconds,
        "final_weights_max_abs_diff": max_abs_diff(torch_side.weights(),
                                                   convert.flax_to_torch(jax_side.weights())),
    }
    report["command"] = " ".join(["jaxnets", *sys.argv[1:]]) if sys.argv else ""
    write_json(out / "report.json", report)
    (out / "report.md").write_text(compare_markdown(report), encoding="utf-8")
    final = report["final"]
    echo(f"final test accuracy: jax {100 * final['jax_test_accuracy']:.2f} %, torch "
         f"{100 * final['torch_test_accuracy']:.2f} % ({final['accuracy_diff_pp']:+.2f} pp); "
         f"training seconds: jax {final['jax_train_seconds']:.1f}, torch "
         f"{final['torch_train_seconds']:.1f} (jax compilation {jax_side.compile_seconds:.1f} s, "
         f"timed apart)")
    echo(f"report: {out / 'report.md'} and {out / 'report.json'}")
    return report
