"""The layers whose training pass looks across the batch, made exact under DDP: each rank holds
a contiguous slice of the global batch (``torchref.ddp``), and these layers compute what one
device computes on the whole batch.

* BatchNorm: the batch statistics of the global batch. JAX gets them by itself: under ``jit``
  with the batch sharded over a mesh, ``x.mean(axes)`` is a mean over the global array and XLA
  inserts the all-reduce. PyTorch's engine for it, ``nn.SyncBatchNorm``, runs on GPUs only
  (torch 2.13 raises "SyncBatchNorm expected input tensor to be on GPU" for CPU tensors and has
  no CPU kernels for ``batch_norm_stats``): on a CPU each BatchNorm becomes
  :class:`GlobalBatchNorm`, which all-reduces its sums through ``torch.distributed`` (gloo).
* Dropout with the shared NumPy masks: each rank takes its rows of the global batch's mask
  (:func:`shard_dropout`), so N ranks drop the entries one device drops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from torchref.layers import Dropout


class SumOverRanks(torch.autograd.Function):
    """``dist.all_reduce`` (sum) that autograd sees through: the backward pass sums the
    gradient over the ranks as well, so each rank's rows get the gradient that every rank's
    loss sends into the shared statistics."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm (1d or 2d: x (rows, C) or (rows, C, H, W), rows possibly 0) whose training
    statistics are those of the global batch over every rank: mean and biased variance from
    all-reduced sums (two passes, as one device computes them), the running variance updated
    with the unbiased one, as ``nn.BatchNorm*d`` does. Same parameters and buffers, same names."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected 2D or 4D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)
        axes = [0, *range(2, x.dim())]
        per_channel = (1, -1) + (1,) * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64)
        dist.all_reduce(count)
        total = int(count)
        mean = SumOverRanks.apply(x.sum(axes)) / total
        centered = x - mean.reshape(per_channel)
        squares = SumOverRanks.apply(centered.square().sum(axes))
        var = squares / total
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), squares.detach(), total)
        normalized = centered / torch.sqrt(var + self.eps).reshape(per_channel)
        if self.affine:
            normalized = normalized * self.weight.reshape(per_channel) \
                + self.bias.reshape(per_channel)
        return normalized

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, squares: torch.Tensor,
                              total: int) -> None:
        """As ``nn.BatchNorm*d`` on one device: momentum weighs the new batch, the running
        variance takes the unbiased (total - 1) one."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.copy_(mean * factor + self.running_mean * (1 - factor))
        unbiased = squares / max(total - 1, 1)
        self.running_var.copy_(unbiased * factor + self.running_var * (1 - factor))


def global_batchnorm(model: nn.Module) -> nn.Module:
    # Framework difference: jit's BatchNorm on a sharded batch uses global statistics by
    # itself; torch's per-rank BatchNorm does not, and SyncBatchNorm refuses CPU tensors.
    """``model`` with every ``nn.BatchNorm1d/2d`` replaced by a :class:`GlobalBatchNorm` holding
    the same parameters and buffers (on GPUs use ``nn.SyncBatchNorm``, PyTorch's own)."""
    for name, child in model.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, GlobalBatchNorm):
            like = child.running_mean if child.running_mean is not None else child.weight
            synced = GlobalBatchNorm(child.num_features, child.eps, child.momentum,
                                     child.affine, child.track_running_stats,
                                     device=like.device, dtype=like.dtype)
            synced.load_state_dict(child.state_dict())
            setattr(model, name, synced)
        else:
            global_batchnorm(child)
    return model


def shard_dropout(model: nn.Module, rows: slice, batch: int) -> None:
    """Every shared-mask :class:`torchref.layers.Dropout` of ``model`` draws the mask of the
    global batch of ``batch`` rows and keeps ``rows`` (this rank's slice) in the next passes."""
    for module in model.modules():
        if isinstance(module, Dropout):
            module.global_rows = (rows, batch)
