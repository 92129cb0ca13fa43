"""JAX on several processes (``jax.distributed``, 1 CPU device each, on localhost) for
test_distributed.py: each process trains the MLP of ``distributed_jax.CASES`` in float64 on a
mesh over every process's device; process 0 writes the step losses and weights to OUT.npz
(the one-process run on N devices it is checked against: ``distributed_jax.py N OUT.npz``).

    python parity_tests/distributed_processes.py OUT COORDINATOR NUM_PROCESSES PROCESS_ID
"""

from __future__ import annotations

import sys

from jaxnets.parallel import initialize_processes, request_host_devices


def main(out: str, coordinator: str, processes: int, process_id: int) -> None:
    request_host_devices(1)
    initialize_processes(coordinator, processes, process_id)
    import jax
    import numpy as np

    from jaxnets.config import load_config
    from jaxnets.data import load_dataset
    from jaxnets.numerics import jax_numerics
    from jaxnets.parallel import data_mesh
    from jaxnets.train import Trainer
    from parity_tests.distributed_jax import CASES, COMMON, TEST_LIMIT

    _, name, overrides = CASES[0]
    cfg = load_config(name, [*COMMON, *overrides])
    with jax_numerics("float64"):
        dataset = load_dataset(cfg["data"])
        trainer = Trainer(cfg, dataset.head(len(dataset.train_x), TEST_LIMIT), dtype="float64",
                          mesh=data_mesh(len(jax.devices())))
        stats = trainer.train_epochs(range(1), progress=False)
        weights = trainer.weights()
    if jax.process_index() == 0:
        np.savez(out, step_losses=np.concatenate([s.step_losses for s in stats]),
                 processes=jax.process_count(), devices=len(jax.devices()), **weights)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
