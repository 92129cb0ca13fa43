"""The verify engine's propagated backward at a max-pool tie: a correct port whose forward
differs from PyTorch's by one ulp must not be judged a bug there.

On an image's constant background a convolution's outputs tie exactly in one framework and
differ by an ulp in the other (oneDNN rounds a row's last columns in another order). A max-pool
then sends each window's gradient to a different cell on each side, though both gradients are
right for their own activations (and the parameter gradients agree). The engine compares the
propagated backward at Flax's activations; here PyTorch's conv plays oneDNN's part
deterministically (its last column one ulp up).
"""

from __future__ import annotations

import math

import jax
import numpy as np
import torch
from flax import nnx
from torch import nn

from torchref.verify import verify


class EdgeRoundedConv(nn.Conv2d):
    """A Conv2d whose last output column comes out one ulp larger, as a kernel that rounds the
    edge of a row in another order does on a constant input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        up = torch.nextafter(out.detach(), torch.full_like(out, math.inf)) - out.detach()
        mask = torch.zeros_like(out)
        mask[..., -1] = 1.0
        return out + up * mask  # exactly the next float there; the gradient unchanged


def make_torch() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(EdgeRoundedConv(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(2 * 2 * 2, 3))


class Port(nnx.Module):
    """x: (batch, 4, 4, 1) NHWC -> (batch, 3)."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 2, (3, 3), padding=1, rngs=rngs)
        self.dense = nnx.Linear(2 * 2 * 2, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.max_pool(self.conv(x), (2, 2), (2, 2)).transpose(0, 3, 1, 2)
        return self.dense(x.reshape(x.shape[0], -1))


def test_max_pool_tie_is_not_a_backward_bug():
    x = np.zeros((2, 1, 4, 4))  # a constant background: every conv output equals its bias
    model = make_torch().double()
    out = model[0](torch.tensor(x)).detach().numpy()
    # the premise: PyTorch's last column is one ulp above the tied others, so each side's own
    # max-pool routes the gradient of the windows over columns 2-3 to a different cell
    assert (out[..., -1] == np.nextafter(out[..., -2], np.inf)).all()
    assert (out[..., :-1] == out[..., :1]).all()
    report = verify(make_torch(), Port(nnx.Rngs(0)), x, dtype="float64", modes=("eval",))
    backward = [r for r in report.rows if r.check == "backward" and r.mode.startswith("prop")]
    assert {r.layer for r in backward} == {"0", "3"}
    assert report.passed, report.verdict
    # the gradient itself is not small: a misrouted one would miss by its full size
    assert max(r.stats["scale"] for r in backward if r.layer == "0") > 1e-2
