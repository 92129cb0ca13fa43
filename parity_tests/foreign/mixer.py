"""A small MLP-mixer block as a user writes it: LayerNorm, GELU, a residual, a square token-mixing
Linear; the Flax port names everything differently. ``broken`` plants one porting bug."""

from __future__ import annotations

import jax
import torch
from flax import nnx
from torch import nn

TOKENS, PATCH, WIDTH = 8, 12, 16


class Mixer(nn.Module):
    """x: (batch, tokens, patch) -> logits (batch, 10)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(PATCH, WIDTH)
        self.norm1 = nn.LayerNorm(WIDTH)
        self.token_mlp = nn.Sequential(nn.Linear(TOKENS, TOKENS), nn.GELU(),
                                       nn.Linear(TOKENS, TOKENS))
        self.norm2 = nn.LayerNorm(WIDTH)
        self.channel_mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(),
                                         nn.Linear(2 * WIDTH, WIDTH))
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.channel_mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


def make_torch() -> nn.Module:
    torch.manual_seed(0)
    return Mixer()


class MixerPort(nnx.Module):
    def __init__(self, broken: str = "", *, rngs: nnx.Rngs):
        self.patch_proj = nnx.Linear(PATCH, WIDTH, rngs=rngs)
        self.ln_tokens = nnx.LayerNorm(WIDTH, epsilon=1e-5, rngs=rngs)  # Flax's default: 1e-6
        self.mix_a = nnx.Linear(TOKENS, TOKENS, rngs=rngs)
        self.mix_b = nnx.Linear(TOKENS, TOKENS, rngs=rngs)
        self.ln_channels = nnx.LayerNorm(WIDTH, epsilon=1e-6 if broken == "eps" else 1e-5,
                                         rngs=rngs)
        self.up = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
        self.down = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)
        self.classifier = nnx.Linear(WIDTH, 10, rngs=rngs)
        self.broken = broken

    def __call__(self, x):
        # torch's nn.GELU() is the exact (erf) form; jax.nn.gelu defaults to the tanh one
        gelu_tanh = self.broken == "gelu_tanh"
        x = self.patch_proj(x)
        y = self.ln_tokens(x).transpose(0, 2, 1)
        x = x + self.mix_b(jax.nn.gelu(self.mix_a(y), approximate=False)).transpose(0, 2, 1)
        h = jax.nn.gelu(self.up(self.ln_channels(x)), approximate=gelu_tanh)
        x = x + self.down(h)
        return self.classifier(x.mean(axis=1))


def make_flax(broken: str = "", rngs: nnx.Rngs | None = None) -> MixerPort:
    return MixerPort(broken, rngs=rngs or nnx.Rngs(0))
