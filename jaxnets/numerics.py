"""JAX's numerics for one block of work, set on entry and restored on exit.

Float64 mode, matmul precision and the default device are JAX settings that change results;
:func:`jax_numerics` sets all three for a ``with`` block (JAX's own scoped contexts, so an fp64
reference can run beside an fp32 run in one process and a library caller's settings come back
afterwards). The CLI and the library both run inside it; ``torchref.numerics`` adds PyTorch's
settings beside it. Reports record :func:`read_jax_numerics`: the values JAX reports back, not
the values asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp

from jaxnets.errors import JaxnetsError

DEVICES = ("cpu", "gpu")
# "highest": float32 matmuls and convolutions in true float32 (no TF32 or bfloat16 passes on a
# GPU, which JAX's "default" precision allows); on a CPU every precision computes the same
MATMUL_PRECISION = "highest"


def jax_device(device: str) -> jax.Device:
    """The first JAX device of ``device`` ("cpu" or "gpu"); a one-line error when JAX has none."""
    if device not in DEVICES:
        raise JaxnetsError(f"device {device!r}: choose one of {', '.join(DEVICES)}")
    try:
        return jax.local_devices(backend=device)[0]  # this process's, with several
    except RuntimeError:
        raise JaxnetsError(f"--device {device}: JAX sees no {device.upper()} here (install "
                           f"jax[cuda12] on a machine with one)") from None


@contextmanager
def jax_numerics(dtype: str = "float32", device: str = "cpu") -> Iterator[None]:
    """Inside the block: x64 mode on exactly for ``dtype="float64"``, matmul precision
    :data:`MATMUL_PRECISION`, new arrays on ``device``. All three are restored on exit."""
    if dtype not in ("float32", "float64"):
        raise JaxnetsError(f"dtype {dtype!r}: choose float32 or float64")
    placement = jax_device(device)
    with (jax.enable_x64(dtype == "float64"), jax.default_matmul_precision(MATMUL_PRECISION),
          jax.default_device(placement)):
        yield


def read_jax_numerics() -> dict[str, Any]:
    """JAX's settings as JAX reports them now: x64 mode, default matmul precision, and the
    device a new array lands on (read from an array made for the purpose)."""
    probe = jnp.zeros(())
    return {"x64": bool(jax.config.jax_enable_x64),
            "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
            "device": str(next(iter(probe.devices()))),
            "default_float": str(probe.dtype)}
