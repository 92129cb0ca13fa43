"""Where ``jaxnets bench`` builds and times its units: one worker process per framework.

Why a process each. In one process JAX's oneDNN convolutions (jaxnets.onednn) and PyTorch
share one OpenMP runtime (PyTorch's wheel ships a ``libgomp.so.1``, which the system oneDNN's
``libgomp.so.1`` resolves to). Every XLA thread that runs a oneDNN call gets a thread pool of
its own; once libgomp manages more threads than there are cores it throttles its spin-waits
for every pool, PyTorch's included: a PyTorch ConvNet step took 4.5 ms before and 7.2-7.5 ms
after 50 JAX oneDNN calls in the same process (2-core Xeon), and a bench run measured
PyTorch eager ConvNet training at 8,383 samples/s beside JAX against 14,135 alone. Each
framework in its own process measures it as it runs on its own; the coordinator still
interleaves the modes (A B A B ...), so contention from outside hits both alike.

``LocalHost`` builds and times units in this process; ``WorkerHost`` runs a ``LocalHost``
in ``python -m bench.hosts FRAMEWORK DEVICE`` and forwards the same calls to it (pickled
over pipes; the timing is taken in the worker, so the pipe's latency is not in it).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from typing import Any

JAX_MODES = ("jit_step", "scan", "stream")
REPLY_TIMEOUT_S = 1800  # one build or timed run (a full-size warm-up on 2 cores included)


def framework_of(mode: str) -> str:
    return "jax" if mode in JAX_MODES else "torch"


def mode_units(mode: str, unit_cfg: dict, unit_data, epochs: range, device: str):
    """(train unit, inference unit, wait-for-results, test examples) of one mode. PyTorch is
    imported only for its modes (a JAX worker never loads it)."""
    if mode in JAX_MODES:
        from jaxnets.train import Trainer as JaxTrainer

        trainer = JaxTrainer(unit_cfg, unit_data)

        def train_unit():
            return trainer.train_epochs(epochs, progress=False, scan=(mode == "scan"),
                                        stream=(mode == "stream"))

        return train_unit, trainer.evaluate, lambda: None, len(trainer.test_x)
    import torch

    from bench.measure import torch_sync
    from jaxnets.spec import data_input_shape
    from torchref.models import build_model as build_torch
    from torchref.train import Trainer as TorchTrainer

    torch_device = "cuda" if device == "gpu" else "cpu"
    model = build_torch(unit_cfg["model"], unit_cfg["seed"],
                        data_input_shape(unit_cfg)).to(torch_device)
    if mode == "compile":
        model = torch.compile(model)
    trainer = TorchTrainer(unit_cfg, unit_data, model=model, device=torch_device)

    def torch_train_unit():
        return trainer.train_epochs(epochs, progress=False)

    return torch_train_unit, trainer.evaluate, torch_sync(device), len(trainer.test_x)


def matmul_unit(framework: str, n: int, device: str):
    """(one float32 n x n x n matmul, wait-for-results) in ``framework``: the unit of
    ``bench.measure.matmul_peak``."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), np.float32) for _ in range(2))
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        matmul, ja, jb = jax.jit(jnp.matmul), jnp.asarray(a), jnp.asarray(b)
        return (lambda: matmul(ja, jb).block_until_ready()), (lambda: None)
    import torch

    from bench.measure import torch_sync

    dev = torch.device("cuda" if device == "gpu" else "cpu")
    ta, tb = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)
    return (lambda: ta @ tb), torch_sync(device)


class LocalHost:
    """Units built, warmed up and timed in this process."""

    def __init__(self, device: str = "cpu"):
        self.device, self.units = device, {}

    def reset(self) -> None:
        """Drop the previous config's units; reset dynamo where PyTorch is loaded: every
        config's torch model runs the same ``forward`` code object, and dynamo stops
        compiling a code object after ``recompile_limit`` (8) guard failures (from the
        seventh config on, "compile" ran eager: "torch._dynamo hit config.recompile_limit")."""
        self.units.clear()
        if "torch" in sys.modules:
            import torch

            torch._dynamo.reset()

    def build(self, mode: str, unit_cfg: dict, unit_data, epochs: range) -> dict[str, Any]:
        """Build one mode's units and warm each up once: the warm-up seconds per phase, the
        test examples and the peak RSS while building (cumulative over this host's modes)."""
        from bench.measure import PeakRSS
        from bench.timing import warm_up

        with PeakRSS() as rss:
            train, infer, sync, test_examples = mode_units(mode, unit_cfg, unit_data, epochs,
                                                           self.device)
            warm = {"train": warm_up(train, sync), "infer": warm_up(infer, sync)}
        self.units[mode] = {"train": train, "infer": infer, "sync": sync}
        return {"warm": warm, "test_examples": test_examples, "peak_rss": rss.peak}

    def build_matmul(self, framework: str, n: int) -> str:
        """Build and warm up :func:`matmul_unit`: the name to ``run`` it by (phase "train")."""
        from bench.timing import warm_up

        unit, sync = matmul_unit(framework, n, self.device)
        warm_up(unit, sync)
        name = f"matmul_{framework}_{n}"
        self.units[name] = {"train": unit, "sync": sync}
        return name

    def run(self, mode: str, phase: str, count: int) -> float:
        """Seconds for ``count`` runs of one unit, its results waited for."""
        from bench.timing import local_runner

        return local_runner(self.units[mode][phase], self.units[mode]["sync"])(count)

    def close(self) -> None:
        self.units.clear()

    def loaded(self, module: str) -> bool:
        """Whether ``module`` is imported in this host's process."""
        return module in sys.modules

    def cpu_dispatch(self) -> str:
        """JAX's CPU dispatch in this host's process, as JAX reports it."""
        from jaxnets.numerics import read_cpu_dispatch

        return read_cpu_dispatch()


class WorkerError(RuntimeError):
    """A call failed in the worker (its exception type and first line), or the worker died."""


class WorkerHost:
    """A ``LocalHost`` in a worker process of its own (see the module's docstring)."""

    def __init__(self, framework: str, device: str = "cpu", dispatch: str | None = None):
        """``dispatch``: JAX's CPU dispatch in a JAX worker (jaxnets.numerics.set_cpu_dispatch;
        None keeps JAX's default)."""
        self.framework = framework
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.hosts", framework, device, dispatch or ""],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _call(self, name: str, *args) -> Any:
        # a worker that hangs is killed after REPLY_TIMEOUT_S, which ends the read below
        watchdog = threading.Timer(REPLY_TIMEOUT_S, self._proc.kill)
        watchdog.start()
        try:
            pickle.dump((name, args), self._proc.stdin)
            self._proc.stdin.flush()
            status, value = pickle.load(self._proc.stdout)
        except (EOFError, BrokenPipeError, pickle.UnpicklingError) as exc:
            code = self._proc.poll()
            raise WorkerError(f"the {self.framework} bench worker stopped "
                              f"(exit {code}): {type(exc).__name__}") from exc
        finally:
            watchdog.cancel()
        if status != "ok":
            raise WorkerError(value)
        return value

    def reset(self) -> None:
        self._call("reset")

    def build(self, mode: str, unit_cfg: dict, unit_data, epochs: range) -> dict[str, Any]:
        return self._call("build", mode, unit_cfg, unit_data, epochs)

    def build_matmul(self, framework: str, n: int) -> str:
        return self._call("build_matmul", framework, n)

    def run(self, mode: str, phase: str, count: int) -> float:
        return self._call("run", mode, phase, count)

    def loaded(self, module: str) -> bool:
        return self._call("loaded", module)

    def cpu_dispatch(self) -> str:
        return self._call("cpu_dispatch")

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._call("close")
                pickle.dump(("quit", ()), self._proc.stdin)
                self._proc.stdin.close()
                self._proc.wait(timeout=60)
            except (WorkerError, OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(timeout=60)


class Hosts:
    """Context manager: one host per framework, ``isolated`` (a worker process each, what
    ``jaxnets bench`` uses) or both in this process."""

    def __init__(self, device: str = "cpu", isolated: bool = True, dispatch: str | None = None):
        """``dispatch``: the JAX worker's CPU dispatch (None: JAX's default; an in-process
        host keeps this process's)."""
        self.device, self.isolated, self.dispatch, self._hosts = device, isolated, dispatch, {}

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc) -> None:
        for host in self._hosts.values():
            host.close()
        self._hosts.clear()

    def for_framework(self, framework: str) -> LocalHost | WorkerHost:
        key = framework if self.isolated else "local"
        if key not in self._hosts:
            self._hosts[key] = (WorkerHost(framework, self.device,
                                           self.dispatch if framework == "jax" else None)
                                if self.isolated else LocalHost(self.device))
        return self._hosts[key]

    def active(self) -> list[LocalHost | WorkerHost]:
        return list(self._hosts.values())

    def worker_pids(self) -> tuple[int, ...]:
        return tuple(h.pid for h in self._hosts.values() if isinstance(h, WorkerHost))


def _serve(framework: str, device: str, dispatch: str = "") -> None:
    """The worker's loop: calls in on stdin, replies on the original stdout (anything the
    libraries print goes to stderr instead)."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    calls = sys.stdin.buffer
    if framework == "torch":
        from bench.timing import set_threads
        from torchref.numerics import numerics

        set_threads()
        setup = numerics("float32", device)
    else:
        from jaxnets.numerics import jax_numerics, set_cpu_dispatch

        if dispatch:
            set_cpu_dispatch(dispatch)
        setup = jax_numerics("float32", device)
    host = LocalHost(device)
    with setup:
        while True:
            try:
                name, args = pickle.load(calls)
            except EOFError:
                return
            if name == "quit":
                return
            try:
                reply = ("ok", getattr(host, name)(*args))
            except Exception as exc:  # reported to the coordinator, which records the row
                first = str(exc).splitlines()[0] if str(exc) else ""
                reply = ("error", f"{type(exc).__name__}: {first}")
            pickle.dump(reply, replies)
            replies.flush()


if __name__ == "__main__":
    _serve(*sys.argv[1:4])
