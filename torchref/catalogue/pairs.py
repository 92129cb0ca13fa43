"""The catalogue's correct ports: small PyTorch models and their hand-written Flax NNX ports,
written the way a user writes them (their own attribute names, no jaxnets base classes).

Each Flax port takes ``bug``: "" is the correct port; any other value plants one named porting
bug (see :mod:`torchref.catalogue.bugs`). Shapes: ``convnet`` (8, 1, 14, 14) -> (8, 10);
``mixer`` (8, 8, 12) -> (8, 10); ``pools`` (8, 1, 16, 16) with 2x2-constant blocks -> (8, 10);
``mlp`` (8, 20) -> (8, 10). Inputs are given in PyTorch's layout; 4-D ones reach Flax as NHWC.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

TOKENS, PATCH, WIDTH = 8, 12, 16


# ---------------------------------------------------------------- convnet: conv, BN, dropout
def convnet_torch() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(4 * 7 * 7, 16), nn.ReLU(),
        nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))


class UnbiasedBatchNorm(nnx.BatchNorm):
    """nnx.BatchNorm whose running variance takes the *unbiased* batch variance (torch's
    convention) where nnx.BatchNorm keeps the biased one. x: (batch, H, W, C)."""

    def __call__(self, x, use_running_average=None, *, mask=None):
        old = self.var.get_value()
        out = super().__call__(x, use_running_average, mask=mask)
        if not (self.use_running_average if use_running_average is None
                else use_running_average):
            count = int(np.prod(x.shape[:-1]))
            batch_var = jnp.var(x, axis=tuple(range(x.ndim - 1)))
            decay = self.momentum
            self.var.set_value(decay * old + (1 - decay) * batch_var * count / (count - 1))
        return out


class ConvPort(nnx.Module):
    """x: (batch, 14, 14, 1) NHWC -> logits (batch, 10)."""

    def __init__(self, bug: str = "", *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), padding=1, rngs=rngs)
        # torch's momentum 0.1 weighs the new batch; Flax's momentum weighs the old value: 0.9
        momentum = 0.1 if bug == "bn_momentum_convention" else 0.9
        eps = 1e-3 if bug == "bn_eps" else 1e-5
        norm = UnbiasedBatchNorm if bug == "bn_running_var_convention" else nnx.BatchNorm
        self.norm = norm(4, momentum=momentum, epsilon=eps, rngs=rngs)
        self.dropout = nnx.Dropout(0.25, rngs=rngs)
        self.hidden = nnx.Linear(4 * 7 * 7, 16, rngs=rngs)
        self.square = nnx.Linear(16, 16, rngs=rngs)
        self.logits = nnx.Linear(16, 10, rngs=rngs)
        self.bug = bug

    def __call__(self, x):
        frozen = True if self.bug == "bn_train_eval_mismatch" else None
        x = nnx.max_pool(jax.nn.relu(self.norm(self.conv(x), frozen)), (2, 2), (2, 2))
        if self.bug != "flatten_hwc":  # torch flattens channel-major (C, H, W)
            x = x.transpose(0, 3, 1, 2)
        x = x.reshape(x.shape[0], -1)
        x = self.dropout(x, deterministic=False) if self.bug == "dropout_in_eval" \
            else self.dropout(x)
        return self.logits(jax.nn.relu(self.square(jax.nn.relu(self.hidden(x)))))


# ---------------------------------------------------------------- mixer: LayerNorm, GELU, softmax
class Mixer(nn.Module):
    """x: (batch, tokens, patch) -> logits (batch, 10); attention pooling over the tokens."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(PATCH, WIDTH)
        self.norm1 = nn.LayerNorm(WIDTH)
        self.token_mlp = nn.Sequential(nn.Linear(TOKENS, TOKENS), nn.GELU(),
                                       nn.Linear(TOKENS, TOKENS))
        self.norm2 = nn.LayerNorm(WIDTH)
        self.channel_mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(),
                                         nn.Linear(2 * WIDTH, WIDTH))
        self.score = nn.Linear(WIDTH, 1, bias=False)  # a bias is constant over the softmax
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.channel_mlp(self.norm2(x))
        weights = torch.softmax(self.score(x), dim=1)  # over the tokens
        return self.head((weights * x).sum(dim=1))


def mixer_torch() -> nn.Module:
    torch.manual_seed(0)
    return Mixer()


class MixerPort(nnx.Module):
    def __init__(self, bug: str = "", *, rngs: nnx.Rngs):
        self.patch_proj = nnx.Linear(PATCH, WIDTH, rngs=rngs)
        self.ln_tokens = nnx.LayerNorm(WIDTH, epsilon=1e-5, rngs=rngs)  # Flax's default: 1e-6
        self.mix_a = nnx.Linear(TOKENS, TOKENS, rngs=rngs)
        self.mix_b = nnx.Linear(TOKENS, TOKENS, rngs=rngs)
        self.ln_channels = nnx.LayerNorm(WIDTH, epsilon=1e-6 if bug == "layernorm_eps" else 1e-5,
                                         rngs=rngs)
        self.up = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
        self.down = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)
        self.attend = nnx.Linear(WIDTH, 1, use_bias=False, rngs=rngs)
        self.classifier = nnx.Linear(WIDTH, 10, rngs=rngs)
        self.bug = bug

    def __call__(self, x):
        # torch's nn.GELU() is the exact (erf) form; jax.nn.gelu defaults to the tanh one
        x = self.patch_proj(x)
        y = self.ln_tokens(x).transpose(0, 2, 1)
        x = x + self.mix_b(jax.nn.gelu(self.mix_a(y), approximate=False)).transpose(0, 2, 1)
        h = jax.nn.gelu(self.up(self.ln_channels(x)), approximate=self.bug == "gelu_tanh")
        x = x + self.down(h)
        axis = -1 if self.bug == "softmax_axis" else 1
        weights = jax.nn.softmax(self.attend(x), axis=axis)
        return self.classifier((weights * x).sum(axis=1))


# ---------------------------------------------------------------- pools: padding and pooling
class PoolNet(nn.Module):
    """x: (batch, 1, 16, 16) -> logits (batch, 10). A 1x1 conv on 2x2-constant blocks gives
    exact ties in every window of the first max-pool."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 4, 1)
        self.conv1 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        x = F.max_pool2d(self.conv0(x), 2)  # 16 -> 8, four equal values per window
        x = self.conv1(x)  # 8 -> 4, one zero row and column on each side
        x = F.avg_pool2d(x, 3, 1, 1)  # count_include_pad=True (torch's default)
        x = F.max_pool2d(x, 3, 2, ceil_mode=True)  # 4 -> 2 (1 without ceil_mode)
        return self.head(x.mean(dim=(2, 3)))


def pools_torch() -> nn.Module:
    torch.manual_seed(0)
    return PoolNet()


class PoolPort(nnx.Module):
    def __init__(self, bug: str = "", *, rngs: nnx.Rngs):
        self.pointwise = nnx.Conv(1, 4, (1, 1), rngs=rngs)
        # torch's padding=1 is (1, 1); XLA's "SAME" at stride 2 on 8 pads (0, 1): same shape
        padding = "SAME" if bug == "same_padding_stride2" else 1
        self.strided = nnx.Conv(4, 4, (3, 3), strides=2, padding=padding, rngs=rngs)
        self.classifier = nnx.Linear(4, 10, rngs=rngs)
        self.bug = bug

    def __call__(self, x):
        x = self.pointwise(x)
        if self.bug == "maxpool_tie_routing":  # a reshape-max pool: jnp.max splits ties' grads
            b, h, w, c = x.shape
            x = x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
        else:
            x = nnx.max_pool(x, (2, 2), (2, 2))
        x = self.strided(x)
        x = nnx.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)),
                         count_include_pad=self.bug != "avgpool_count_include_pad")
        # ceil_mode: one more window at the end, padded with -inf (max_pool's padding value)
        x = nnx.max_pool(x, (3, 3), (2, 2), "VALID" if self.bug == "maxpool_ceil_mode"
                         else ((0, 1), (0, 1)))
        return self.classifier(x.mean(axis=(1, 2)))


def tied_input(seed: int = 0) -> np.ndarray:
    """(8, 1, 16, 16), each value repeated over a 2x2 block."""
    small = np.random.default_rng(seed).standard_normal((8, 1, 8, 8)).astype(np.float32)
    return small.repeat(2, axis=2).repeat(2, axis=3)


# ---------------------------------------------------------------- mlp: losses and optimizers
def mlp_torch() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 10))


class MlpPort(nnx.Module):
    """x: (batch, 20) -> logits (batch, 10)."""

    def __init__(self, bug: str = "", *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(20, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


TORCH = {"convnet": convnet_torch, "mixer": mixer_torch, "pools": pools_torch,
         "mlp": mlp_torch}
FLAX = {"convnet": ConvPort, "mixer": MixerPort, "pools": PoolPort, "mlp": MlpPort}


def make_flax(pair: str, bug: str = "") -> nnx.Module:
    return FLAX[pair](bug, rngs=nnx.Rngs(0))


def inputs(pair: str, seed: int = 0) -> np.ndarray:
    """The pair's input batch in PyTorch's layout (float32; the engine casts)."""
    if pair == "pools":
        return tied_input(seed)
    shape = {"convnet": (8, 1, 14, 14), "mixer": (8, TOKENS, PATCH), "mlp": (8, 20)}[pair]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
