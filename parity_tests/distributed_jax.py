"""JAX data-parallel measurements for test_distributed.py, run in a subprocess (the host device
count is fixed when JAX starts): prints one JSON object of differences, N devices vs one.

    python parity_tests/distributed_jax.py DEVICES [OUT.npz]

OUT.npz: the MLP's float64 run on DEVICES devices (step losses and weights), the reference of
the multi-process check (distributed_processes.py).
"""

from __future__ import annotations

import json
import sys

from jaxnets.parallel import request_host_devices

# (name, config, overrides): small enough for a loaded 2-core machine; 201 examples in batches
# of 2 is 100 full steps and a last batch of 1, which one of two devices gets none of; the
# BatchNorm network needs 2 rows a batch (403 in 4s: 100 steps, then 3 rows, split 2 + 1); its
# dropout uses the shared NumPy masks, the global batch's on every device
BATCHNORM_LAYERS = ('model.layers=[{type="flatten"}, {type="linear", name="fc1", out=32, '
                    'bias=false}, {type="batchnorm", name="bn1"}, {type="relu"}, '
                    '{type="dropout", rate=0.5}, {type="linear", name="fc2", out=10}]')
CASES = (("mlp", "mlp_fashion", ["model.hidden=[32, 32]"]),
         ("cnn", "convnet_mnist", ["data.dataset=fashion_mnist"]),
         ("bn", "vgg_bn_fashion", [BATCHNORM_LAYERS, "data.train_limit=403",
                                   "train.batch_size=4"]))
COMMON = ["data.train_limit=201", "train.batch_size=2", "train.epochs=1"]
TEST_LIMIT = 256  # test examples kept: the runs only need a batch of them


def run(cfg, dataset, dtype, mesh, steps=None):
    """(per-step losses, final weights, loss of the first 64 examples) as float64 NumPy."""
    import numpy as np

    from jaxnets.train import Trainer

    trainer = Trainer(cfg, dataset, dtype=dtype, mesh=mesh)
    if steps is not None:  # only the first `steps` examples: steps / batch_size steps
        trainer.train_x, trainer.train_y = trainer.train_x[:steps], trainer.train_y[:steps]
    stats = trainer.train_epochs(range(1), progress=False)
    loss = trainer.loss_and_gradients(dataset_batch(trainer), trainer.host_y[:64])[0]
    return (np.concatenate([s.step_losses for s in stats]).astype(np.float64),
            trainer.weights(), loss)


def dataset_batch(trainer):
    return trainer.host_x[:64]


def differences(a, b) -> dict:
    import numpy as np

    return {"steps": len(a[0]), "step_loss": float(np.max(np.abs(a[0] - b[0]))),
            "weights": max(float(np.max(np.abs(a[1][k] - b[1][k]))) for k in a[1]),
            "final_loss": abs(a[2] - b[2])}


def main(devices: int, out: str | None = None) -> None:
    request_host_devices(devices)
    from jaxnets.config import load_config
    from jaxnets.data import load_dataset
    from jaxnets.numerics import jax_numerics
    from jaxnets.parallel import data_mesh

    results = {}
    for label, name, overrides in CASES:
        cfg = load_config(name, [*COMMON, *overrides])
        dataset = load_dataset(cfg["data"])
        dataset = dataset.head(len(dataset.train_x), TEST_LIMIT)
        for dtype in ("float64", "float32"):
            with jax_numerics(dtype):
                # float32: one step
                steps = None if dtype == "float64" else cfg["train"]["batch_size"]
                one = run(cfg, dataset, dtype, data_mesh(1), steps)
                many = run(cfg, dataset, dtype, data_mesh(devices), steps)
                results[f"{label}_{dtype}"] = differences(one, many)
                if out and label == "mlp" and dtype == "float64":
                    import numpy as np

                    np.savez(out, step_losses=many[0], **many[1])
                if label == "mlp" and dtype == "float32":  # a 1-device mesh vs plain jit
                    results["mesh1_vs_plain"] = differences(run(cfg, dataset, dtype, None,
                                                                steps), one)
    print(json.dumps(results))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
