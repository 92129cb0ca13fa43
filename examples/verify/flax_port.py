"""The user's hand-written Flax NNX port of ``torch_model.Classifier`` (its own names)."""

import jax
from flax import nnx


class Classifier(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv_a = nnx.Conv(1, 8, (5, 5), padding=2, rngs=rngs)
        self.bn_a = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.conv_b = nnx.Conv(8, 16, (5, 5), padding="VALID", rngs=rngs)
        self.bn_b = nnx.BatchNorm(16, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.fc = nnx.Linear(16 * 5 * 5, 64, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):  # x: (batch, 28, 28, 1)
        x = nnx.max_pool(jax.nn.relu(self.bn_a(self.conv_a(x))), (2, 2), (2, 2))
        x = nnx.max_pool(jax.nn.relu(self.bn_b(self.conv_b(x))), (2, 2), (2, 2))
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # flatten as torch does: (C, H, W)
        x = self.drop(x)
        return self.out(jax.nn.gelu(self.fc(x), approximate=False))  # nn.GELU() is the erf form


def make(rngs: nnx.Rngs):
    return Classifier(rngs=rngs)
