"""Training parity for the seed MLP: identical batches, one identical step, the models."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import assert_allclose
from jaxnets import convert
from jaxnets.config import load_config
from jaxnets.data import epoch_batches, load_dataset, preprocess
from jaxnets.errors import ConversionError
from jaxnets.models import build_model as build_jax
from jaxnets.train import Trainer as JaxTrainer
from torchref.models import build_model as build_torch
from torchref.train import Trainer as TorchTrainer


def twin_trainers(cfg):
    """A JAX and a PyTorch trainer starting from the same (PyTorch-initialised) weights."""
    dataset = load_dataset(cfg["data"])
    torch_side, jax_side = TorchTrainer(cfg, dataset), JaxTrainer(cfg, dataset)
    jax_side.load_weights(convert.torch_to_flax(torch_side.weights()))
    return jax_side, torch_side


def test_epoch_batches_are_a_seeded_permutation():
    full, rest = epoch_batches(1050, 100, seed=3, epoch=0)
    assert full.shape == (10, 100) and rest.shape == (50,)
    assert sorted(np.concatenate([full.ravel(), rest]).tolist()) == list(range(1050))
    again, _ = epoch_batches(1050, 100, seed=3, epoch=0)
    np.testing.assert_array_equal(full, again)
    other, _ = epoch_batches(1050, 100, seed=3, epoch=1)
    assert not np.array_equal(full, other)
    ordered, none = epoch_batches(300, 100, seed=3, epoch=0, shuffle=False)
    assert none is None and ordered.ravel().tolist() == list(range(300))


def test_both_frameworks_see_the_same_batches(fashion, small_cfg):
    # With a zero-effect optimizer step the weights never change, so each step's loss depends
    # only on which images the batch holds: equal per-step losses mean equal batches, in order.
    cfg = small_cfg(250, "optimizer.name=sgd", "optimizer.learning_rate=1e-30",
                    "train.batch_size=32")
    jax_side, torch_side = twin_trainers(cfg)
    for epoch in range(2):
        j, t = jax_side.train_epoch(epoch, False), torch_side.train_epoch(epoch, False)
        assert len(j.step_losses) == len(t.step_losses) == 8  # 7 full batches and one of 26
        assert_allclose(j.step_losses, t.step_losses, 1e-6, f"epoch {epoch} step losses")
    assert len(np.unique(j.step_losses)) == 8  # the batches really differ from each other


def test_mlp_output_shapes(fashion):
    x = fashion.test_x[:5]
    scale = {"preprocess": "scale", "mean": 0.0, "std": 1.0}
    mlp = load_config("mlp_fashion")["model"]  # 784-512-512-10, ReLU
    jax_model, torch_model = build_jax(mlp, 0), build_torch(mlp, 0)
    assert jax_model(preprocess(x, scale, "flat")).shape == (5, 10)
    assert jax_model(preprocess(x, scale, "nhwc")).shape == (5, 10)  # flattens images itself
    assert torch_model(torch.from_numpy(preprocess(x, scale, "nchw"))).shape == (5, 10)


def test_parameter_names_and_shapes_correspond(small_cfg):
    cfg = small_cfg()
    torch_weights = {k: v.numpy() for k, v in build_torch(cfg["model"], 0).state_dict().items()}
    flax_weights = convert.flax_params(build_jax(cfg["model"], 0))
    converted = convert.torch_to_flax(torch_weights)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in
                                                           flax_weights.items()}
    back = convert.flax_to_torch(converted)
    for name, value in torch_weights.items():
        np.testing.assert_array_equal(back[name], value)


def test_conversion_lists_every_mismatch(small_cfg):
    cfg = small_cfg()
    weights = convert.torch_to_flax(
        {k: v.numpy() for k, v in build_torch(cfg["model"], 0).state_dict().items()})
    weights["layers.1.kernel"] = weights["layers.1.kernel"][:, :7]
    del weights["layers.2.bias"]
    weights["head.kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ConversionError) as info:
        convert.load_flax_params(build_jax(cfg["model"], 0), weights)
    message = str(info.value)
    assert "3 problems" in message and "missing layers.2.bias (10,)" in message
    assert "unexpected head.kernel (3, 3)" in message
    assert "shape of layers.1.kernel: model (512, 512), weights (512, 7)" in message


@pytest.mark.parametrize("optimizer", [
    ("optimizer.name=adam", "optimizer.learning_rate=1e-3"),
    ("optimizer.name=sgd", "optimizer.learning_rate=0.1", "optimizer.momentum=0.5",
     "optimizer.weight_decay=1e-3"),
])
def test_one_training_step_matches(fashion, small_cfg, optimizer):
    cfg = small_cfg(100, *optimizer)  # 100 images, batch 100: one step per epoch
    jax_side, torch_side = twin_trainers(cfg)
    for epoch in range(3):  # assert every step, not only the last one
        j, t = jax_side.train_epoch(epoch, False), torch_side.train_epoch(epoch, False)
        # Step 1 starts from identical weights: 1e-6. Later steps start from weights that
        # already differ by up to ~1e-5: Adam's first update is lr * g / (|g| + eps), which turns
        # float32 rounding in gradients of size ~eps into differences of up to ~1e-2 * lr.
        assert_allclose(j.step_losses, t.step_losses, 1e-6 if epoch == 0 else 1e-5,
                        f"loss at step {epoch + 1}")
        jax_weights = convert.flax_to_torch(jax_side.weights())
        for name, value in torch_side.weights().items():
            assert_allclose(jax_weights[name], value, 1e-5, f"{name} after step {epoch + 1}")


def test_evaluate_agrees(fashion, small_cfg):
    jax_side, torch_side = twin_trainers(small_cfg())
    (jl, ja), (tl, ta) = jax_side.evaluate(), torch_side.evaluate()
    assert abs(jl - tl) < 1e-5 and ja == ta


def test_jaxnets_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import jaxnets, jaxnets.cli, jaxnets.train, jaxnets.data, jaxnets.convert\n"
            "from jaxnets.cli import main\n"
            "try:\n    main(['compare', 'mlp_fashion'])\nexcept SystemExit:\n    pass\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "needs PyTorch, which is not installed: pip install torch==2.13.0" in result.stderr


def test_scan_dispatch_and_stream_give_identical_steps(fashion, small_cfg):
    cfg = small_cfg(1050)  # 10 full batches and one of 50
    dataset = load_dataset(cfg["data"])
    runs = [JaxTrainer(cfg, dataset).train_epochs(range(2), False, **mode)
            for mode in ({}, {"scan": False}, {"stream": True})]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert len(a.step_losses) == 11
            np.testing.assert_array_equal(a.step_losses, b.step_losses)


def test_prefetch_keeps_order_and_raises_producer_errors():
    from jaxnets.data import prefetch

    assert list(prefetch(iter(range(100)), size=2)) == list(range(100))

    def broken():
        yield 1
        raise ValueError("bad batch")

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for item in prefetch(broken()):
            got.append(item)
    assert got == [1]
