"""Data parallel in JAX on its own engine: SPMD with ``jax.sharding`` under ``jit``.

A :class:`jax.sharding.Mesh` over N devices with one axis, ``data``. Parameters, BatchNorm
state, optimizer state and the (small) dataset are replicated on every device; each global
batch is constrained to ``P("data")`` where the step gathers it, so every device computes its
rows and XLA all-reduces the gradient. The loss stays the mean over the global batch: ``jit``
computes the program for the global array, whatever the sharding, so the one-device path is
N = 1 of the same code. A batch that does not divide by N (the last, smaller one) is padded by
XLA inside the compiled program and its padding never enters the mean: no example is dropped
or counted twice. BatchNorm's batch statistics are means over the global batch the same way.

On a CPU, N host devices exist only when JAX is told before it starts (``jax_num_cpu_devices``
or ``--xla_force_host_platform_device_count=N`` in ``XLA_FLAGS``:
:func:`request_host_devices`). Several processes (one per
host or GPU) join through :func:`initialize_processes` (``jax.distributed.initialize``).
"""

from __future__ import annotations

import os
import re
from typing import Any

from jaxnets.errors import ConfigError, JaxnetsError

DATA_AXIS = "data"
HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def request_host_devices(count: int) -> None:
    """Ask XLA for ``count`` CPU devices in this process; must run before JAX starts (the
    ``jax_num_cpu_devices`` option where JAX is imported, else ``JAX_NUM_CPU_DEVICES`` and
    ``XLA_FLAGS``). A one-line error when JAX has already started with fewer devices."""
    if count < 1:
        raise JaxnetsError(f"--devices {count}: give 1 or more")
    import sys

    if "jax" in sys.modules:
        import jax

        try:  # JAX refuses a new count once its backends exist
            jax.config.update("jax_num_cpu_devices", count)
        except RuntimeError:
            have = len(jax.devices())
            if have < count:
                raise JaxnetsError(f"--devices {count}: JAX has already started with {have} "
                                   f"device(s); set {HOST_DEVICE_FLAG}={count} in XLA_FLAGS "
                                   f"before JAX starts") from None
            return
    flags = re.sub(rf"{HOST_DEVICE_FLAG}=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = f"{flags} {HOST_DEVICE_FLAG}={count}".strip()
    os.environ["JAX_NUM_CPU_DEVICES"] = str(count)


def data_mesh(count: int, device: str = "cpu"):
    """A mesh over the first ``count`` devices of ``device`` kind (all processes' devices in a
    multi-process run), with the one axis :data:`DATA_AXIS`."""
    import jax
    import numpy as np

    kind = {"cpu": "cpu", "gpu": "gpu"}[device]
    devices = jax.devices(kind)
    if len(devices) < count:
        raise JaxnetsError(f"--devices {count}: JAX sees {len(devices)} {kind.upper()} "
                           f"device(s) here" + (f" (the CLI asks XLA for host devices with "
                                                f"{HOST_DEVICE_FLAG})" if kind == "cpu" else ""))
    return jax.sharding.Mesh(np.array(devices[:count]), (DATA_AXIS,))


def replicated(mesh) -> Any:
    """The sharding of an array every device holds whole (parameters, optimizer state)."""
    import jax

    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharded(mesh) -> Any:
    """The sharding of a global batch: split along its first axis over ``data``."""
    import jax

    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def replicate(tree, mesh):
    """Every array of ``tree`` on every device of ``mesh``. With several processes each one
    gives its own copy (the same values in every process: the same seed, the same data) to
    ``jax.make_array_from_process_local_data``, which builds the global array."""
    import jax
    import numpy as np

    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(
        sharding, np.asarray(a)), tree)


def shard_batch_constraint(mesh):
    """A function for use inside ``jit``: a batch's arrays (leading axis = examples)
    constrained to :func:`batch_sharded`; None: the identity (one device, no mesh)."""
    import jax

    if mesh is None:
        return lambda batch: batch
    sharding = batch_sharded(mesh)
    return lambda batch: jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(a, sharding), batch)


def describe_mesh(mesh) -> dict[str, Any]:
    """For reports: devices and processes as JAX reports them."""
    import jax

    if mesh is None:
        return {"devices": 1, "processes": jax.process_count(), "mesh": None}
    return {"devices": int(mesh.devices.size), "processes": jax.process_count(),
            "mesh": {DATA_AXIS: int(mesh.devices.size)},
            "device_list": [str(d) for d in mesh.devices.flat]}


def initialize_processes(coordinator: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` from the arguments, else from the environment
    (``JAXNETS_COORDINATOR``, ``JAXNETS_NUM_PROCESSES``, ``JAXNETS_PROCESS_ID``; on a cluster
    JAX also reads SLURM's or Kubernetes' own variables when all three are None)."""
    import jax

    # CPU devices of different processes talk through gloo (GPUs use NCCL by themselves)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    env = os.environ
    coordinator = coordinator or env.get("JAXNETS_COORDINATOR")
    if num_processes is None and "JAXNETS_NUM_PROCESSES" in env:
        num_processes = int(env["JAXNETS_NUM_PROCESSES"])
    if process_id is None and "JAXNETS_PROCESS_ID" in env:
        process_id = int(env["JAXNETS_PROCESS_ID"])
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def joins_processes(coordinator: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None) -> bool:
    """Whether this command is one process of several: an option given, or
    ``JAXNETS_COORDINATOR`` in the environment."""
    return (coordinator is not None or num_processes is not None or process_id is not None
            or "JAXNETS_COORDINATOR" in os.environ)


def join_processes(devices: int, device: str = "cpu", coordinator: str | None = None,
                   num_processes: int | None = None, process_id: int | None = None) -> None:
    """Before JAX starts: join a run of several processes whose devices together are
    ``devices`` (on a CPU each process asks XLA for its share, ``devices / processes`` host
    devices), through :func:`initialize_processes`; a one-line error when JAX then sees
    another global device count."""
    if num_processes is None and "JAXNETS_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAXNETS_NUM_PROCESSES"])
    if device == "cpu":
        if num_processes is None or num_processes < 1 or devices % num_processes:
            raise ConfigError(f"--devices {devices} on a CPU over {num_processes} processes: "
                               f"give the process count (--num-processes or "
                               f"JAXNETS_NUM_PROCESSES), and --devices a multiple of it")
        request_host_devices(devices // num_processes)
    initialize_processes(coordinator, num_processes, process_id)
    import jax

    seen = len(jax.devices())
    if seen != devices:
        raise ConfigError(f"--devices {devices}: the {jax.process_count()} processes have "
                           f"{seen} device(s) together; give --devices {seen}")


def fetch_global(tree):
    """``tree`` with every array that spans several processes (not fully addressable)
    replaced by its whole value, gathered with ``process_allgather``: every process must call
    it at the same point. Arrays this process holds whole are returned as they are."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    def fetch(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return jnp.asarray(multihost_utils.process_allgather(a, tiled=True))
        return a

    return jax.tree.map(fetch, tree)
