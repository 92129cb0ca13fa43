"""Data parallel in PyTorch on its own engine: DistributedDataParallel over N processes.

Each process is started the way ``torchrun`` starts it (``MASTER_ADDR``, ``MASTER_PORT``,
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in its environment), so the worker runs under
``torchrun`` itself or under :func:`launch`, which starts N of them on this machine. gloo on a
CPU, NCCL on GPUs. Every rank walks the same global batches (``jaxnets.data.epoch_batches``) and
takes its contiguous slice of each, ``ceil(B / N)`` rows per rank, the last rank fewer (not
``DistributedSampler``, whose strided indices and padding change the batches). Its loss is its
rows' mean scaled by ``rows * N / B``, so that DDP's gradient average is the gradient of the
mean over the global batch: exact for a last batch that does not divide by N, even when a rank
holds no rows. BatchNorm normalises with the global batch's statistics and dropout uses the
global batch's masks (:mod:`torchref.ddp_layers`), so N ranks train what one process trains.
Worker usage (one line per rank; ``torchrun --nproc-per-node N -m torchref.ddp``
starts all)::

    python -m torchref.ddp CONFIG_JSON OUT_DIR [--dtype float64] [--initial W.safetensors]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from jaxnets.errors import TrainingError
from torchref.ddp_layers import global_batchnorm, shard_dropout
from torchref.optim import make_optimizer
from torchref.train import Trainer

# torchrun's contract; the worker reads nothing else from its environment
ENV_CONTRACT = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedTrainer(Trainer):
    """:class:`torchref.train.Trainer` whose steps run on this rank's slice of each global
    batch, through DDP, BatchNorm synchronised (:meth:`synchronise_batchnorm`) and dropout
    masks sliced (:meth:`shard_dropout`). ``check_ranks``: after every step, the largest
    difference of any parameter from rank 0's (all ranks), kept in ``rank_param_max_diff``."""

    def __init__(self, cfg: dict[str, Any], dataset, dtype: str = "float32",
                 device: str = "cpu", check_ranks: bool = False):
        super().__init__(cfg, dataset, dtype=dtype, device=device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if any(isinstance(m, _BatchNorm) for m in self.model.modules()):
            self.model = self.synchronise_batchnorm(self.model)
            self.optimizer = make_optimizer(cfg["optimizer"], self.model.parameters())
        self.ddp = DistributedDataParallel(self.model)  # broadcasts rank 0's parameters
        self.check_ranks, self.rank_param_max_diff, self.global_losses = check_ranks, 0.0, []

    def synchronise_batchnorm(self, model: torch.nn.Module) -> torch.nn.Module:
        """BatchNorm's statistics over the global batch, as on one device: PyTorch's
        SyncBatchNorm on GPUs, :func:`torchref.ddp_layers.global_batchnorm` on a CPU."""
        if self.device.type == "cuda":
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return global_batchnorm(model)

    def rank_slice(self, batch: int) -> slice:
        """This rank's contiguous rows of a global batch: ceil(B / N) rows, the last fewer."""
        per_rank = math.ceil(batch / self.world)
        return slice(min(self.rank * per_rank, batch), min((self.rank + 1) * per_rank, batch))

    def shard_dropout(self, rows: slice, batch: int) -> None:
        """Dropout masks of the global batch, this rank's ``rows`` of them."""
        shard_dropout(self.model, rows, batch)

    def batch_loss(self, index: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        if self.check_ranks:
            self._check_ranks()
        where = self.rank_slice(len(index))
        rows = index[where]
        self.shard_dropout(where, len(index))
        outputs = self.ddp(self.train_x[rows])
        y = self.train_y[rows]
        if len(rows):
            loss = self.loss_fn(outputs, y) * (len(rows) * self.world / len(index))
        else:  # no rows here: a zero loss that still takes part in DDP's all-reduce
            loss = outputs.sum() * 0
        totals = torch.stack([loss.detach().double(),
                              torch.tensor(float(self.num_correct(outputs.detach(), y)),
                                           dtype=torch.float64)])
        dist.all_reduce(totals)  # the global batch's mean loss and correct count
        self.global_losses.append(float(totals[0]) / self.world)
        return loss, self.global_losses[-1], int(totals[1])

    def _check_ranks(self) -> None:
        flat = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        reference = flat.clone()
        dist.broadcast(reference, 0)
        diff = (flat - reference).abs().max().double().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        self.rank_param_max_diff = max(self.rank_param_max_diff, float(diff))

    def finish(self) -> None:
        """The parameters after the last step, checked like every step's."""
        if self.check_ranks:
            self._check_ranks()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: dict[str, Any], out: Path, processes: int, dtype: str = "float32",
           initial: Path | None = None, timeout: float = 600.0, check_ranks: bool = False,
           test_limit: int | None = None) -> dict[str, Any]:
    """Train ``config`` with DDP on ``processes`` local worker processes (:func:`run_ranks`;
    ``test_limit``: evaluate on the first test examples only); returns rank 0's
    ``result.json`` with the weights from ``out/weights_ddp.npz``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    run_ranks([sys.executable, "-m", "torchref.ddp", str(out / "config.json"), str(out),
               "--dtype", dtype, *(["--initial", str(initial)] if initial else []),
               *(["--check-ranks"] if check_ranks else []),
               *(["--test-limit", str(test_limit)] if test_limit else [])],
              out, processes, timeout)
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    with np.load(out / "weights_ddp.npz") as weights:
        result["weights"] = {k: weights[k] for k in weights.files}
    return result


def run_ranks(command: list[str], out: Path, processes: int, timeout: float = 600.0) -> None:
    """Run ``command`` as ``processes`` ranks on this machine, in torchrun's environment with
    one thread each, logs in ``out/rank{i}.log``. A worker that fails, or a run past
    ``timeout`` seconds, stops every worker and raises one :class:`TrainingError` line."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    workers, logs = [], []
    for rank in range(processes):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "WORLD_SIZE": str(processes), "LOCAL_RANK": str(rank),
               "OMP_NUM_THREADS": "1"}
        logs.append(open(out / f"rank{rank}.log", "w", encoding="utf-8"))
        workers.append(subprocess.Popen(command, env=env, stdout=logs[-1],
                                        stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        while [w.poll() for w in workers].count(None):  # polls every worker, each turn
            failed = [(r, w.returncode) for r, w in enumerate(workers)
                      if w.returncode not in (None, 0)]
            if failed:
                rank, code = failed[0]
                raise TrainingError(f"DDP worker rank {rank} of {processes} exited with code "
                                    f"{code}: {_last_line(out / f'rank{rank}.log')}")
            if time.monotonic() > deadline:
                raise TrainingError(f"DDP run of {processes} processes passed its timeout of "
                                    f"{timeout:g} s; every worker stopped")
            time.sleep(0.1)
        failed = [(r, w.returncode) for r, w in enumerate(workers) if w.returncode != 0]
        if failed:
            rank, code = failed[0]
            raise TrainingError(f"DDP worker rank {rank} of {processes} exited with code "
                                f"{code}: {_last_line(out / f'rank{rank}.log')}")
    finally:
        for worker in workers:  # no orphans: each worker's own process group, by its id
            if worker.poll() is None:
                os.killpg(worker.pid, 9)
                worker.wait()
        for log in logs:
            log.close()


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
             if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def exit_with_parent() -> None:
    """A worker whose launcher dies (killed by a signal, say) ends too: no orphans."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def worker(argv: list[str] | None = None) -> None:
    """One rank: joins the process group from torchrun's environment, trains, and rank 0
    writes ``result.json`` and ``weights_ddp.npz`` into OUT_DIR."""
    parser = argparse.ArgumentParser(prog="python -m torchref.ddp")
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--initial", help="initial weights (safetensors, torch names)")
    parser.add_argument("--check-ranks", action="store_true")
    parser.add_argument("--test-limit", type=int, help="evaluate on the first N test examples")
    args = parser.parse_args(argv)
    missing = [name for name in ENV_CONTRACT if name not in os.environ]
    if missing:
        raise SystemExit(f"torchref.ddp: missing {', '.join(missing)} (start it with torchrun "
                         f"or torchref.ddp.launch)")
    exit_with_parent()
    from jaxnets.convert import read_safetensors
    from jaxnets.data import load_dataset
    from torchref.numerics import torch_numerics

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        cfg = json.loads(Path(args.config).read_text(encoding="utf-8"))
        with torch_numerics("gpu" if cuda else "cpu", threads=1):  # re-applied in each worker
            dataset = load_dataset(cfg["data"])
            if args.test_limit:
                dataset = dataset.head(len(dataset.train_x), args.test_limit)
            trainer = DistributedTrainer(cfg, dataset, args.dtype,
                                         "cuda" if cuda else "cpu", args.check_ranks)
            if args.initial:
                trainer.load_weights(read_safetensors(args.initial))
            start = time.perf_counter()
            stats = trainer.train_epochs(range(cfg["train"]["epochs"]), progress=False)
            seconds = time.perf_counter() - start
            trainer.finish()
            test_loss, test_accuracy = trainer.evaluate()
        if trainer.rank == 0:
            out = Path(args.out)
            np.savez(out / "weights_ddp.npz", **trainer.weights())
            (out / "result.json").write_text(json.dumps({
                "processes": trainer.world, "backend": dist.get_backend(),
                "threads_per_process": 1, "step_losses": trainer.global_losses,
                "epoch_train_loss": [s.as_dict()["train_loss"] for s in stats],
                "test_loss": test_loss, "test_accuracy": test_accuracy,
                "train_seconds": seconds, "epoch_seconds": [s.seconds for s in stats],
                "rank_param_max_diff": trainer.rank_param_max_diff,
            }), encoding="utf-8")
        # every rank done before any leaves: a rank that tore gloo down while the other was
        # still in its last collective aborted ("terminate called without an active
        # exception", exit -6: 1 of 3 runs of parity_tests/distributed_torch.py)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    worker()
