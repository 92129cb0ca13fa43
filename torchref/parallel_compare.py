"""``compare --devices N``: both frameworks data-parallel from the side-by-side run's initial
weights, each against its own one-device run and against the other framework.

JAX runs in this process on a mesh of N devices (``jaxnets.parallel``); PyTorch runs DDP on N
worker processes (``torchref.ddp``, one thread each, so the one-device PyTorch run of the
comparison uses one thread too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxnets import convert
from jaxnets.data import Dataset
from jaxnets.parallel import data_mesh
from jaxnets.train import Trainer as JaxTrainer
from torchref.ddp import launch


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _weights_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(_max_diff(a[k], b[k]) for k in a)


def data_parallel(cfg: dict[str, Any], dataset: Dataset, out: Path, devices: int,
                  one_device: dict[str, Any], device: str = "cpu",
                  dtype: str = "float32") -> dict[str, Any]:
    """Train ``cfg`` data-parallel in both frameworks in ``dtype``; ``one_device``: the
    side-by-side member (its ``step_losses`` and ``trainers``). Returns the report's
    ``parallel`` part: max-abs differences of per-step losses and final weights (torch names
    and layouts)."""
    initial = out / f"initial_weights_torch_seed{cfg['seed']}.safetensors"
    jax_side = JaxTrainer(cfg, dataset, dtype=dtype, mesh=data_mesh(devices, device))
    jax_side.load_weights(convert.torch_to_flax(convert.read_safetensors(initial)))
    jax_stats = jax_side.train_epochs(range(cfg["train"]["epochs"]), progress=False)
    jax_losses = np.concatenate([s.step_losses for s in jax_stats])
    jax_weights = convert.flax_to_torch(jax_side.weights())
    ddp = launch(cfg, out / "ddp", devices, dtype, initial=initial)
    ddp_losses = np.asarray(ddp["step_losses"], np.float32)  # as the report keeps them
    one = one_device["step_losses"]
    one_weights = {fw: t.weights() for fw, t in one_device["trainers"].items()}
    one_weights["jax"] = convert.flax_to_torch(one_weights["jax"])
    jax_test_loss, jax_test_accuracy = jax_side.evaluate()
    return {
        "devices": devices,
        "dtype": dtype,
        "processes": {"jax": jax_side.parallel()["processes"], "torch": ddp["processes"]},
        "jax_mesh": jax_side.parallel(),
        "torch_backend": ddp["backend"],
        "threads_per_torch_process": ddp["threads_per_process"],
        "steps": len(jax_losses),
        "jax_vs_one_device": {"step_loss": _max_diff(jax_losses, one["jax"]),
                              "weights": _weights_diff(jax_weights, one_weights["jax"])},
        "torch_vs_one_device": {"step_loss": _max_diff(ddp_losses, one["torch"]),
                                "weights": _weights_diff(ddp["weights"], one_weights["torch"])},
        "jax_vs_torch": {"step_loss": _max_diff(jax_losses, ddp_losses),
                         "weights": _weights_diff(jax_weights, ddp["weights"])},
        "one_device_jax_vs_torch": {"step_loss": _max_diff(one["jax"], one["torch"]),
                                    "weights": _weights_diff(one_weights["jax"],
                                                             one_weights["torch"])},
        "final": {"jax_test_loss": jax_test_loss, "jax_test_accuracy": jax_test_accuracy,
                  "torch_test_loss": ddp["test_loss"],
                  "torch_test_accuracy": ddp["test_accuracy"],
                  "jax_train_seconds": sum(s.seconds for s in jax_stats),
                  "torch_train_seconds": ddp["train_seconds"]},
    }


def parallel_markdown(parallel: dict[str, Any]) -> str:
    """The report's data-parallel section."""
    rows = (("jax on N devices vs jax on 1", "jax_vs_one_device"),
            ("torch DDP on N processes vs torch on 1", "torch_vs_one_device"),
            ("jax on N devices vs torch DDP on N", "jax_vs_torch"),
            ("jax vs torch, both on 1 device (for scale)", "one_device_jax_vs_torch"))
    final = parallel["final"]
    lines = [
        "", f"## Data parallel on {parallel['devices']} devices", "",
        f"- jax: one process ({parallel['processes']['jax']}), a mesh "
        f"{parallel['jax_mesh']['mesh']} over {', '.join(parallel['jax_mesh']['device_list'])}",
        f"- torch: DistributedDataParallel, {parallel['processes']['torch']} processes, "
        f"backend {parallel['torch_backend']}, {parallel['threads_per_torch_process']} thread "
        f"each (the one-device torch run above used the same count)",
        f"- {parallel['steps']} steps in {parallel['dtype']}; max-abs differences of the "
        f"per-step losses (as the reports keep them, in float32) and the final weights:", "",
        "| runs | per-step loss | final weights |", "|---|---:|---:|"]
    lines += [f"| {label} | {parallel[key]['step_loss']:.3g} | {parallel[key]['weights']:.3g} |"
              for label, key in rows]
    lines += ["", f"Final test loss on {parallel['devices']} devices: jax "
              f"{final['jax_test_loss']:.6f}, torch {final['torch_test_loss']:.6f}.", ""]
    return "\n".join(lines)
