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


CPU_DISPATCHES = ("async", "sync")
# jaxnets' CPU dispatch (the CLI's --cpu-dispatch default): "sync", measured below
CPU_DISPATCH = "sync"


def set_cpu_dispatch(dispatch: str, strict: bool = True) -> str:
    """How XLA:CPU runs a jitted call: "async" (JAX's own default: the call returns at once
    and a client thread runs the computation) or "sync" (the calling thread runs it). A
    setting of JAX's CPU client, so it takes effect only before JAX's backends start; after,
    a one-line error (``strict``) or the setting left as it is. Returns the dispatch in
    effect.

    Why "sync" on the CPU: with "async" every call whose results are waited for at once (an
    evaluation pass, a step of a tiny model) hands its work to a client thread and wakes the
    caller again, a cross-core round trip: ``regression_linear``'s evaluation (100 points)
    took 30-120 us a call over runs of 700 calls on a 2-core VM, a steady 40 us pinned to one
    core, and 23 us with "sync" (no other thread woke, against 1.5 wake-ups a call).
    ``python bench/cpu_dispatch.py`` measures both per config and mode, each setting in a
    process of its own (``bench/results/cpu-dispatch-epyc-2core``, sync / async samples/s):
    evaluation 1.57-2.55x for the full-batch toys (their pass is 25-60 us), 0.92-1.25x for
    the spirals, MLPs and the other CNNs (VGG 1.16-1.24x), 0.88-0.92x for the stride-2 CNN
    (also in a second run); the scanned training epoch, one call, 0.83-1.22x (the stride-2
    CNN 0.83x, 0.86x in a second run; ResNet 1.22x); a jitted call per step 0.70-1.24x (slower where
    the step takes microseconds, e.g. spiral_linear's streamed steps 0.70x: "async" overlaps
    the next step's Python with the running step)."""
    if dispatch not in CPU_DISPATCHES:
        raise JaxnetsError(f"CPU dispatch {dispatch!r}: choose one of "
                           f"{', '.join(CPU_DISPATCHES)}")
    from jax._src import xla_bridge

    if read_cpu_dispatch() != dispatch:
        if not xla_bridge.backends_are_initialized():
            jax.config.update("jax_cpu_enable_async_dispatch", dispatch == "async")
        elif strict:
            raise JaxnetsError(f"CPU dispatch {dispatch!r}: JAX's backends have already "
                               f"started with {read_cpu_dispatch()!r}; set it before the "
                               "first JAX computation")
    return read_cpu_dispatch()


def read_cpu_dispatch() -> str:
    """The CPU dispatch JAX's client is (or will be) made with."""
    return "async" if jax.config.values["jax_cpu_enable_async_dispatch"] else "sync"
