"""Training's edge cases: a consumer that stops the prefetch thread early, a finite loss with a
non-finite gradient under ``train.on_nonfinite = "skip"``, and a progress bar that stays out of
the timed, compiled JAX epoch."""

from __future__ import annotations

import gc
import re
import threading
import weakref

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxnets.train
from jaxnets.config import load_config
from jaxnets.data import load_dataset, prefetch
from jaxnets.train import Trainer as JaxTrainer
from torchref.train import Trainer as TorchTrainer


class Batch:
    """A stand-in for a device buffer whose release a weak reference can see."""


def _stop_early(how: str) -> tuple[list[threading.Thread], list[weakref.ref]]:
    made: list[weakref.ref] = []

    def endless():
        while True:
            batch = Batch()
            made.append(weakref.ref(batch))
            yield batch

    before = set(threading.enumerate())
    if how == "break":
        for _batch in prefetch(endless(), size=2):
            break
    else:
        with pytest.raises(RuntimeError, match="training failed"):
            for _batch in prefetch(endless(), size=2):
                raise RuntimeError("training failed")
    del _batch
    return [t for t in threading.enumerate() if t not in before], made


@pytest.mark.parametrize("how", ["break", "exception"])
def test_prefetch_thread_ends_and_releases_its_batches_when_the_consumer_stops(how):
    started, made = _stop_early(how)
    for thread in started:  # the producer, had it been left blocked on a full queue
        thread.join(timeout=10)
        assert not thread.is_alive(), f"{thread.name} still running after the consumer's {how}"
    gc.collect()
    assert len(made) >= 1 and all(ref() is None for ref in made), "batches kept alive"


class JaxSqrtModel(nnx.Module):
    """y = sqrt(w) x + b with w = 0: a finite output whose gradient in w is infinite."""

    def __init__(self):
        self.w = nnx.Param(jnp.zeros((1,)))
        self.b = nnx.Param(jnp.ones((1,)))

    def __call__(self, x, train: bool = False):  # jaxnets models take the mode explicitly
        return jnp.sqrt(self.w[...]) * x + self.b[...]


class TorchSqrtModel(torch.nn.Module):
    """The same model in PyTorch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.b = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return torch.sqrt(self.w) * x + self.b


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_skip_also_skips_a_step_whose_gradient_is_not_finite(framework):
    cfg = load_config("regression_linear", ['train.on_nonfinite="skip"'])
    dataset = load_dataset(cfg["data"])
    if framework == "jax":
        trainer = JaxTrainer(cfg, dataset, model=JaxSqrtModel())

        def params():
            return {k: np.asarray(v) for k, v in
                    {"w": trainer.params["w"][...], "b": trainer.params["b"][...]}.items()}
    else:
        trainer = TorchTrainer(cfg, dataset, model=TorchSqrtModel())

        def params():
            return {k: v.detach().numpy().copy() for k, v in trainer.model.named_parameters()}
    stats = trainer.train_epoch(0, progress=False)  # one full-batch step
    assert np.isfinite(stats.step_losses).all()  # the loss itself is finite: 1 - y
    assert params() == {"w": [0.0], "b": [1.0]}, "a step with an Inf gradient updated"
    assert stats.skipped == 1  # and it is counted as skipped, like a non-finite loss


def test_progress_bar_advances_without_host_callbacks_in_the_compiled_epoch(monkeypatch):
    updates = []

    class RecordingBar:
        def __init__(self, *args, **kwargs):
            self.n = 0

        def update(self, n=1):
            self.n += n
            updates.append(n)

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(jaxnets.train, "tqdm", RecordingBar)
    cfg = load_config("regression_linear", ["train.log_every=5"])  # one step per epoch
    dataset = load_dataset(cfg["data"])
    with_bar = JaxTrainer(cfg, dataset)
    losses = [s.step_losses for s in with_bar.train_epochs(range(12), progress=True)]
    assert sum(updates) == 12 and len(updates) > 1  # 12 steps, shown as they go
    assert with_bar._compiled
    for compiled in with_bar._compiled.values():  # what ran in the timed region
        targets = re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())
        assert not [t for t in targets if "callback" in t], targets
    without_bar = JaxTrainer(cfg, dataset)
    np.testing.assert_array_equal(  # the bar changes no number
        [s.step_losses for s in without_bar.train_epochs(range(12), progress=False)], losses)
