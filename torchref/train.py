"""Training in PyTorch, the idiomatic way (zero_grad, forward, backward, step): the reference.

:class:`Trainer` mirrors ``jaxnets.train.Trainer`` method for method and is fed the same index
batches (``jaxnets.data.epoch_batches``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from jaxnets.convert import mismatches
from jaxnets.data import Dataset, epoch_batches, input_layout, model_arrays, preprocess
from jaxnets.errors import CheckpointError, ConversionError
from jaxnets.report import EpochStats, check_finite, describe, split_epochs
from jaxnets.spec import data_input_shape
from torchref.models import build_model
from torchref.numerics import read_torch_numerics
from torchref.optim import make_optimizer

LOSSES = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss}


def num_correct(outputs: torch.Tensor, labels: torch.Tensor) -> int:
    """How many rows' argmax equals the integer label."""
    return int((outputs.argmax(dim=-1) == labels).sum())


def num_rounded_correct(predictions: torch.Tensor, targets: torch.Tensor) -> int:
    """How many regressed values round to the target (a digit regressed as a float)."""
    return int((torch.round(predictions.reshape(-1)) == targets.reshape(-1)).sum())


def no_metric(outputs: torch.Tensor, targets: torch.Tensor) -> int:
    return 0


METRICS = {"accuracy": num_correct, "rounded_accuracy": num_rounded_correct, "none": no_metric}


def gradients_finite(model: nn.Module) -> bool:
    """Whether every parameter's gradient is free of NaN and Inf (one host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


class Trainer:
    framework = "torch"
    # how train_epochs' seconds are measured, for reports
    timing = ("wall-clock seconds of the training loop, progress bar included (loss.item() "
              "waits for every step)")

    def __init__(self, cfg: dict[str, Any], dataset: Dataset, model: nn.Module | None = None,
                 dtype: str = "float32", device: str = "cpu"):
        self.cfg = cfg
        self.dtype, self.device = getattr(torch, dtype), torch.device(device)
        self.model = model if model is not None else build_model(
            cfg["model"], cfg["seed"], data_input_shape(cfg))
        self.model.to(device=self.device, dtype=self.dtype)
        self.optimizer = make_optimizer(cfg["optimizer"], self.model.parameters())
        self.loss_fn = LOSSES[cfg["train"]["loss"]]()
        self.num_correct = METRICS[cfg["train"]["metric"]]
        self.train_x, self.train_y, self.test_x, self.test_y = (
            self.tensor(a) for a in model_arrays(dataset, cfg, "torch"))

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """A NumPy array on this trainer's device; floats in its dtype."""
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    @property
    def num_train(self) -> int:
        return len(self.train_x)

    def data_device(self) -> str:
        """The device the training data lives on, as PyTorch reports it."""
        return str(self.train_x.device)

    def parallel(self) -> dict[str, Any]:
        """Devices and processes this trainer uses, for reports (``torchref.ddp``: N)."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return {"devices": world, "processes": world}

    def numerics(self) -> dict[str, Any]:
        """PyTorch's numerics settings as PyTorch reports them now (``torchref.numerics``)."""
        return read_torch_numerics()

    def train_epoch(self, epoch: int, progress: bool = True) -> EpochStats:
        return self.train_epochs(range(epoch, epoch + 1), progress)[0]

    def train_epochs(self, epochs: range, progress: bool = True) -> list[EpochStats]:
        train = self.cfg["train"]
        plan = [epoch_batches(self.num_train, train["batch_size"], self.cfg["seed"], e,
                              train["shuffle"]) for e in epochs]
        batches = [b for full, rest in plan for b in (*full, *([] if rest is None else [rest]))]
        losses, correct, skipped = [], [], []
        self.model.train()
        start = time.perf_counter()
        with tqdm(batches, desc=f"torch {describe(epochs)}", leave=False,
                  disable=not progress) as bar:
            for step, idx in enumerate(bar, 1):
                index = torch.from_numpy(idx).to(self.device)
                self.optimizer.zero_grad()
                loss, loss_value, step_correct = self.batch_loss(index)
                losses.append(loss_value)
                correct.append(step_correct)
                skipped.append(True)  # until the update below happens
                if not np.isfinite(losses[-1]):
                    if train["on_nonfinite"] == "stop":
                        check_finite(np.asarray(losses, np.float32), plan, epochs, self.framework)
                    continue  # "skip": no update for this step
                loss.backward()
                if train["on_nonfinite"] == "skip" and not gradients_finite(self.model):
                    continue  # a finite loss with a NaN/Inf gradient: no update either
                self.optimizer.step()
                skipped[-1] = False
                if step % train["log_every"] == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        seconds = time.perf_counter() - start
        return split_epochs(np.asarray(losses, np.float32), np.asarray(correct), plan, seconds,
                            train["metric"], np.asarray(skipped, bool))

    def batch_loss(self, index: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """One global batch's (loss to differentiate, its mean loss, correct count); the
        data-parallel trainer (``torchref.ddp``) computes its rank's share instead."""
        x, y = self.train_x[index], self.train_y[index]
        outputs = self.model(x)
        loss = self.loss_fn(outputs, y)
        return loss, loss.item(), self.num_correct(outputs.detach(), y)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None
                 ) -> tuple[float, float | None]:
        x = self.test_x if x is None else x
        y = self.test_y if y is None else y
        size = self.cfg["train"]["eval_batch_size"]
        self.model.eval()
        loss_sum, correct = 0.0, 0
        for start in range(0, len(x), size):
            outputs = self.model(x[start:start + size])
            loss_sum += float(self.loss_fn(outputs, y[start:start + size])) * len(outputs)
            correct += self.num_correct(outputs, y[start:start + size])
        accuracy = None if self.cfg["train"]["metric"] == "none" else correct / len(x)
        return loss_sum / len(x), accuracy

    @torch.no_grad()
    def predict(self, raw_x: np.ndarray) -> np.ndarray:
        """Model outputs for raw examples (as a :class:`Dataset` holds them), in batches."""
        x = self.tensor(preprocess(raw_x, self.cfg["data"], input_layout(self.cfg, "torch")))
        size = self.cfg["train"]["eval_batch_size"]
        self.model.eval()
        return np.concatenate([self.model(x[i:i + size]).cpu().numpy()
                               for i in range(0, len(x), size)]) if len(x) else np.zeros((0,))

    def loss_and_gradients(self, x: np.ndarray, y: np.ndarray
                           ) -> tuple[float, dict[str, np.ndarray]]:
        """The loss of one batch and its gradient for every parameter (torch names, layouts),
        in train mode (batch statistics, the next dropout masks); the state it updates
        (running statistics, dropout's draw counter) is put back as it was."""
        state = {k: v.clone() for k, v in self.model.state_dict().items()
                 if k not in dict(self.model.named_parameters())}
        self.model.train()
        self.model.zero_grad()
        loss = self.loss_fn(self.model(self.tensor(x)), self.tensor(y))
        loss.backward()
        grads = {name: p.grad.detach().cpu().numpy().copy()
                 for name, p in self.model.named_parameters()}
        self.model.zero_grad()
        self.model.load_state_dict(state, strict=False)
        return float(loss.detach()), grads

    @torch.no_grad()
    def forward_layers(self, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """Every step's output (NCHW where 4-D), with the current parameters, in eval mode."""
        self.model.eval()
        return [(name, out.cpu().numpy()) for name, out in
                self.model.forward_layers(self.tensor(x))]

    def weights(self) -> dict[str, np.ndarray]:
        """``state_dict`` as NumPy arrays (PyTorch names and layouts)."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}

    def load_weights(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the parameters and buffers (PyTorch names and layouts) and restart the
        optimizer; buffers the arrays lack (``num_batches_tracked``, which Flax does not keep;
        dropout's ``draws``) keep their values."""
        params = dict(self.model.named_parameters())
        expected = {k: v for k, v in self.model.state_dict().items()
                    if k in params or k in arrays}
        problems = mismatches({k: tuple(v.shape) for k, v in expected.items()}, arrays)
        if problems:
            raise ConversionError(f"weights do not match {type(self.model).__name__} "
                                  f"({len(problems)} problems): " + "; ".join(problems))
        with torch.no_grad():
            for k, v in expected.items():
                v.copy_(torch.from_numpy(np.ascontiguousarray(arrays[k]).reshape(v.shape)))
        self.optimizer = make_optimizer(self.cfg["optimizer"], self.model.parameters())

    def optimizer_arrays(self) -> dict[str, np.ndarray]:
        """The optimizer's per-parameter state as ``{"<index>.<name>": array}``."""
        return {f"{i}.{name}": value.detach().cpu().numpy().copy()
                for i, state in self.optimizer.state_dict()["state"].items()
                for name, value in state.items() if torch.is_tensor(value)}

    def restore(self, weights: dict[str, np.ndarray], optimizer: dict[str, np.ndarray]) -> None:
        """Parameters and optimizer state from a checkpoint, bit for bit."""
        self.load_weights(weights)
        count = len(list(self.model.parameters()))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in optimizer.items():
            index, _, name = key.partition(".")
            if not index.isdigit() or int(index) >= count or not name:
                raise CheckpointError(f"optimizer state entry {key!r} does not fit this model "
                                      f"({count} parameters)")
            state.setdefault(int(index), {})[name] = torch.from_numpy(np.array(value))
        groups = self.optimizer.state_dict()["param_groups"]
        try:
            self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"the optimizer state does not fit "
                                  f"{type(self.optimizer).__name__}: {exc}") from None
