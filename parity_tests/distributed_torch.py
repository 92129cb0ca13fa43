"""PyTorch DDP measurements for test_distributed.py: the cases of ``distributed_jax.CASES`` (an
MLP, a CNN, a BatchNorm network with dropout) on 2 gloo ranks against one process with the same
thread count (1, as torchrun gives each worker), plus the naive ports (per-rank BatchNorm
statistics, per-rank dropout masks) that differ. One launch of 2 ranks runs every case; prints
one JSON object of differences.

    python parity_tests/distributed_torch.py OUT_DIR          # the measurements
    python parity_tests/distributed_torch.py --rank OUT_DIR   # one rank (torchrun's environment)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from parity_tests.distributed_jax import CASES, COMMON, TEST_LIMIT

# the naive ports, 2 steps of 4 rows (2 per rank: per-rank BatchNorm needs 2 rows or more)
NAIVE = ("per_rank_batchnorm", "per_rank_dropout")
NAIVE_OVERRIDES = ["data.train_limit=8", "train.batch_size=4"]


def cases() -> list[tuple[str, dict, str]]:
    """(name, config, dtype) of every measured run: each network in float64 over 101 steps and
    in float32 over one step, then the naive ports of the BatchNorm network in float64."""
    from jaxnets.config import load_config

    runs = []
    for label, name, overrides in CASES:
        for dtype in ("float64", "float32"):
            cfg = load_config(name, [*COMMON, *overrides])
            if dtype == "float32":  # one step
                cfg["data"]["train_limit"] = cfg["train"]["batch_size"]
            runs.append((f"{label}_{dtype}", cfg, dtype))
    _, name, overrides = CASES[-1]
    runs += [(naive, load_config(name, [*COMMON, *overrides, *NAIVE_OVERRIDES]), "float64")
             for naive in NAIVE]
    return runs


def one_process(cfg: dict, dtype: str) -> tuple[np.ndarray, dict]:
    """(per-step losses, final weights) of the plain trainer, one thread."""
    from jaxnets.data import load_dataset
    from torchref.numerics import torch_numerics
    from torchref.train import Trainer

    with torch_numerics("cpu", threads=1):
        dataset = load_dataset(cfg["data"])
        trainer = Trainer(cfg, dataset.head(len(dataset.train_x), TEST_LIMIT), dtype=dtype)
        losses = []
        original = trainer.batch_loss

        def recorded(index):  # the float64 loss, before the report's float32
            loss, value, correct = original(index)
            losses.append(value)
            return loss, value, correct

        trainer.batch_loss = recorded
        trainer.train_epochs(range(cfg["train"]["epochs"]), progress=False)
    return np.asarray(losses), trainer.weights()


def rank(out: Path) -> None:
    """One rank: every case through DistributedTrainer (the naive ones through subclasses that
    skip the synchronisation); rank 0 writes OUT/<case>.npz."""
    import torch.distributed as dist

    from jaxnets.data import load_dataset
    from torchref.ddp import DistributedTrainer, exit_with_parent
    from torchref.numerics import torch_numerics

    class PerRankBatchNorm(DistributedTrainer):
        def synchronise_batchnorm(self, model):  # each rank's statistics of its own rows
            return model

    class PerRankDropout(DistributedTrainer):
        def shard_dropout(self, rows, batch):  # each rank draws a mask for its own rows
            pass

    trainers = {"per_rank_batchnorm": PerRankBatchNorm, "per_rank_dropout": PerRankDropout}
    exit_with_parent()
    dist.init_process_group("gloo")
    try:
        for case, cfg, dtype in cases():
            with torch_numerics("cpu", threads=1):
                dataset = load_dataset(cfg["data"])
                trainer = trainers.get(case, DistributedTrainer)(
                    cfg, dataset.head(len(dataset.train_x), TEST_LIMIT), dtype,
                    check_ranks=True)
                trainer.train_epochs(range(cfg["train"]["epochs"]), progress=False)
                trainer.finish()
            if trainer.rank == 0:
                np.savez(out / f"{case}.npz", step_losses=trainer.global_losses,
                         rank_param_max_diff=trainer.rank_param_max_diff,
                         **trainer.weights())
        dist.barrier()  # every rank done before any leaves (torchref.ddp.worker says why)
    finally:
        dist.destroy_process_group()


def main(out: Path) -> None:
    from torchref.ddp import run_ranks

    # measured on a loaded 2-core machine: ~25 s for all cases; 240 s leaves room
    run_ranks([sys.executable, __file__, "--rank", str(out)], out, 2, timeout=240)
    results = {}
    for case, cfg, dtype in cases():
        losses, weights = one_process(cfg, dtype)
        with np.load(out / f"{case}.npz") as ddp:
            results[case] = {
                "steps": len(losses),
                "step_loss": float(np.max(np.abs(losses - ddp["step_losses"]))),
                "weights": max(float(np.max(np.abs(weights[k] - ddp[k]))) for k in weights),
                "rank_param_max_diff": float(ddp["rank_param_max_diff"])}
    print(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1] == "--rank":
        rank(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
