"""jaxnets: the classic small networks as jitted Flax NNX models trained with Optax.

Every model here has a PyTorch twin of the same name in ``torchref``; the parity suite in
``parity_tests/`` shows the two agree. This package never imports torch.
"""

from jaxnets.errors import CheckpointError, ConfigError, ConversionError, DataError, JaxnetsError

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "DataError",
    "JaxnetsError",
    "__version__",
]
