"""PyTorch DDP measurements (the MLP and the CNN; the BatchNorm network needs SyncBatchNorm,
which PyTorch runs on GPUs only) for test_distributed.py: 2 gloo processes (torchref.ddp.launch)
against one process with the same thread count (1, as torchrun gives each worker); prints one
JSON object of differences.

    python parity_tests/distributed_torch.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from parity_tests.distributed_jax import CASES, COMMON, TEST_LIMIT


def one_process(cfg, dtype):
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


def main(out: Path) -> None:
    from jaxnets.config import load_config
    from torchref.ddp import launch

    results = {}
    for label, name, overrides in CASES[:2]:  # BatchNorm: SyncBatchNorm is GPU-only
        for dtype in ("float64", "float32"):
            cfg = load_config(name, [*COMMON, *overrides])
            if dtype == "float32":  # one step
                cfg["data"]["train_limit"] = cfg["train"]["batch_size"]
            losses, weights = one_process(cfg, dtype)
            ddp = launch(cfg, out / f"{label}_{dtype}", 2, dtype, timeout=240,
                         check_ranks=True, test_limit=TEST_LIMIT)
            results[f"{label}_{dtype}"] = {
                "steps": len(losses),
                "step_loss": float(np.max(np.abs(losses - np.asarray(ddp["step_losses"])))),
                "weights": max(float(np.max(np.abs(weights[k] - ddp["weights"][k])))
                               for k in weights),
                "rank_param_max_diff": ddp["rank_param_max_diff"]}
    print(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
