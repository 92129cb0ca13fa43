"""Determinism on the CPU: the same config and seed give bit-identical per-step losses (and
weights) in two separately constructed trainers, in JAX and in PyTorch, for an MLP and a CNN."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxnets.config import load_config

EPOCHS = range(0, 2)


def _mlp(fashion):
    """mlp_fashion on 600 images: 6 full batches of 100 per epoch (one scan in JAX)."""
    return load_config("mlp_fashion", ["data.train_limit=600"]), fashion.head(600, 100)


def _lenet(fashion):
    """LeNet on 300 Fashion-MNIST images, batch 64: 4 full batches and one of 44 per epoch."""
    cfg = load_config("lenet_mnist", ['data.dataset="fashion_mnist"', "data.train_limit=300"])
    return cfg, fashion.head(300, 100)


CONFIGS = {"mlp": _mlp, "lenet": _lenet}
_FIRST_RUNS: dict[tuple[str, str], np.ndarray] = {}  # (framework, model) -> losses


def _trainer_class(framework: str):
    if framework == "torch":
        pytest.importorskip("torch")
        from torchref.train import Trainer
    else:
        from jaxnets.train import Trainer
    return Trainer


def _run(framework: str, cfg: dict, dataset) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A fresh trainer's per-step losses over EPOCHS and its final weights, on the CPU."""
    with jax.default_device(jax.devices("cpu")[0]):
        trainer = _trainer_class(framework)(cfg, dataset)
        stats = trainer.train_epochs(EPOCHS, progress=False)
        weights = {k: np.array(v) for k, v in trainer.weights().items()}
    return np.concatenate([s.step_losses for s in stats]), weights


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_same_seed_same_losses(fashion, framework, model):
    cfg, dataset = CONFIGS[model](fashion)
    steps_per_epoch = -(-len(dataset.train_x) // cfg["train"]["batch_size"])
    first_losses, first_weights = _run(framework, cfg, dataset)
    _FIRST_RUNS[framework, model] = first_losses
    second_losses, second_weights = _run(framework, cfg, dataset)
    assert first_losses.shape == (len(EPOCHS) * steps_per_epoch,)
    assert np.isfinite(first_losses).all()
    assert np.array_equal(first_losses, second_losses), (
        f"{framework} {model}: per-step losses differ between two runs:\n{first_losses}\n"
        f"{second_losses}")
    assert first_weights.keys() == second_weights.keys()
    for name, value in first_weights.items():
        assert np.array_equal(value, second_weights[name]), f"{framework} {model}: {name} differs"


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_another_seed_other_losses(fashion, framework):
    """The comparison is not vacuous: seed 1 (other weights, other batch order) differs."""
    cfg, dataset = _mlp(fashion)
    seed0 = _FIRST_RUNS.get((framework, "mlp"))
    if seed0 is None:  # this test run alone
        seed0 = _run(framework, cfg, dataset)[0]
    other = load_config("mlp_fashion", ["data.train_limit=600", "seed=1"])
    assert not np.array_equal(seed0, _run(framework, other, dataset)[0])
