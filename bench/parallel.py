"""``jaxnets bench --devices N``: training throughput on 1 and on N devices per framework, and
the scaling efficiency (N-device throughput / (N x one-device throughput)).

JAX: the ``scan`` path on one device and on a mesh of N (``jaxnets.parallel``), one process.
PyTorch: one process against DDP on N processes (``torchref.ddp``), one thread per process in
both. On a CPU the N "devices" share the same cores, so the figures measure the overhead of
the data-parallel machinery (sharding, all-reduce, process group), not a speed-up.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any

from bench.measure import bench_unit, timed
from jaxnets.data import Dataset


def bench_data_parallel(cfg: dict[str, Any], dataset: Dataset, devices: int, repeats: int,
                        steps: int, out: Path, device: str = "cpu") -> list[dict[str, Any]]:
    """Rows of (framework, devices, processes, samples/s, scaling efficiency)."""
    from jaxnets.parallel import data_mesh
    from jaxnets.train import Trainer as JaxTrainer
    from torchref.ddp import launch
    from torchref.numerics import torch_numerics
    from torchref.train import Trainer as TorchTrainer

    unit_cfg, unit_data, epochs = bench_unit(cfg, dataset, steps)
    examples = len(epochs) * min(len(unit_data.train_x), steps * unit_cfg["train"]["batch_size"])
    seconds = {}
    for count in (1, devices):
        trainer = JaxTrainer(unit_cfg, unit_data, mesh=data_mesh(count, device))
        seconds[("jax", count)] = timed(lambda t=trainer: t.train_epochs(epochs, progress=False),
                                        repeats, lambda: None)["median_s"]
    with torch_numerics(device, threads=1):
        trainer = TorchTrainer(unit_cfg, unit_data, device="cuda" if device == "gpu" else "cpu")
        seconds[("torch", 1)] = timed(lambda: trainer.train_epochs(epochs, progress=False),
                                      repeats, lambda: None)["median_s"]
    # DDP: the unit repeated 1 + repeats times in one run; the first (warm-up) is left out
    ddp_cfg = copy.deepcopy(unit_cfg)
    ddp_cfg["data"]["train_limit"] = len(unit_data.train_x)
    ddp_cfg["train"]["epochs"] = (1 + repeats) * len(epochs)
    per_epoch = launch(ddp_cfg, out / f"ddp_{cfg['name']}", devices)["epoch_seconds"]
    units = [sum(per_epoch[i:i + len(epochs)]) for i in range(0, len(per_epoch), len(epochs))]
    seconds[("torch", devices)] = statistics.median(units[1:])
    rows = []
    for framework in ("jax", "torch"):
        base = examples / seconds[(framework, 1)]
        for count in (1, devices):
            rate = examples / seconds[(framework, count)]
            rows.append({"config": cfg["name"], "framework": framework, "devices": count,
                         "processes": count if framework == "torch" else 1,
                         "samples_per_s": rate, "scaling_efficiency": rate / (count * base),
                         "examples": examples, "repeats": repeats})
    return rows


def parallel_markdown(rows: list[dict[str, Any]], command: str, device: str) -> str:
    lines = [f"# jaxnets bench --devices: `{command}`", "",
             "Training samples/s (medians) on 1 and N devices; scaling efficiency = N-device "
             "throughput / (N x one-device throughput). PyTorch: one thread per process.", ""]
    if device == "cpu":
        lines += ["On a CPU the N devices share the same cores: these figures measure the "
                  "data-parallel overhead, not a speed-up.", ""]
    lines += ["| config | framework | devices | processes | samples/s | scaling efficiency |",
              "|---|---|---:|---:|---:|---:|"]
    lines += [f"| `{r['config']}` | {r['framework']} | {r['devices']} | {r['processes']} | "
              f"{r['samples_per_s']:,.0f} | {r['scaling_efficiency']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"
