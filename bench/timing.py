"""How ``jaxnets bench`` times work on a machine it may share: units interleaved across the
repeats (A B C A B C ...) so that contention hits every framework alike, each unit's spread
(slowest / fastest repeat), the load average before and after each timed run, and the CPU
time other processes took while the units ran. A unit whose spread or competing load
exceeds the stated limits is marked unstable, and the report leaves it out of the ratios.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import psutil

# A unit is unstable when its slowest repeat took more than SPREAD_LIMIT times its fastest,
# or when other processes kept more than COMPETING_LIMIT of a core busy (on average) while
# the units ran. Quiet 2-core x86-64 runs of every config stayed under 1.15 and 0.1 on the
# Xeon the limits were set on; on a 2-core EPYC VM a quiet full run (other processes at most
# 0.03 of a core) had spreads of 1.01-2.32, median 1.25, and 60 of its 160 measurements over
# 1.3, mostly one repeat of five far from the rest, in both frameworks' rows: the limit then
# flags the machine's own jitter, which makes those medians no basis for a ratio either.
SPREAD_LIMIT = 1.3
COMPETING_LIMIT = 0.25
# Each timed run lasts at least this long (a unit shorter than it is run several times per
# timed run, the time divided back): the kernel's CPU-time counters advance in ticks of 10 ms
# (USER_HZ 100), so a window of a few milliseconds cannot see another process at all
# (a spinning process on the other core read as 3e-11 cores around a 1 ms inference unit).
MIN_RUN_S = 0.05


def _busy_seconds() -> float:
    """CPU seconds all processes have spent busy (every core), from the kernel's counters."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _own_seconds(process: psutil.Process, workers: tuple[int, ...] = ()) -> float:
    """This process's CPU seconds, those of ``workers`` (the bench's worker processes'
    pids) included."""
    t = process.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for pid in workers:
        try:
            c = psutil.Process(pid).cpu_times()
        except psutil.Error:  # exited in between
            continue
        total += c.user + c.system
    return total


class CompetingLoad:
    """Context manager: ``cores``, the average number of cores that *other* processes kept
    busy while it was open (the machine's busy time less this process's own and its
    ``workers'``)."""

    def __init__(self, workers: tuple[int, ...] = ()):
        self._process = psutil.Process(os.getpid())
        self._workers = tuple(workers)
        self.cores = 0.0

    def __enter__(self) -> CompetingLoad:
        self._start = (time.perf_counter(), _busy_seconds(),
                       _own_seconds(self._process, self._workers))
        return self

    def __exit__(self, *exc) -> None:
        wall, busy, own = self._start
        wall = time.perf_counter() - wall
        busy = _busy_seconds() - busy
        own = _own_seconds(self._process, self._workers) - own
        self.cores = max(0.0, busy - own) / wall if wall > 0 else 0.0


def warm_up(unit: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Run ``unit`` once (compilation, autotuning, first-touch allocation): its seconds."""
    start = time.perf_counter()
    unit()
    sync()
    return time.perf_counter() - start


Runner = Callable[[int], float]  # runs a unit ``count`` times, results waited for: seconds


def local_runner(unit: Callable[[], Any], sync: Callable[[], None]) -> Runner:
    """A unit and its wait-for-results, timed in this process."""
    def run(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            unit()
        sync()
        return time.perf_counter() - start

    return run


def timed_interleaved(units: dict[str, tuple[Callable[[], Any], Callable[[], None]] | Runner],
                      repeats: int, warm_up_first: bool = True,
                      workers: tuple[int, ...] = ()) -> dict[str, dict[str, Any]]:
    """``units``: name -> (run once, wait for its results), or a :data:`Runner` (which may
    time its unit in another process: bench.hosts). Each is warmed up once (unless
    ``warm_up_first`` is False), then timed ``repeats`` times in turn, A B C A B C ...

    Returns, per name: median, min and max seconds, ``times_s``, the warm-up's excess over
    the median (``compile_s``: compilation, autotuning, first-touch allocation),
    ``spread`` (max / min), ``load_before``/``load_after`` (1-minute load average around each
    timed run), ``competing_cores`` (other processes' CPU use while the units ran; the
    ``workers``, pids of processes timing units for this one, count as its own) and
    ``unstable`` (a list of reasons, empty when the measurement is trusted); a unit shorter
    than ``MIN_RUN_S`` is run ``runs_per_timing`` times per timed run and its time divided."""
    runners = {name: local_runner(*u) if isinstance(u, tuple) else u
               for name, u in units.items()}
    warmup = {name: run(1) if warm_up_first else 0.0 for name, run in runners.items()}
    # runs of each unit per timed run: enough to last MIN_RUN_S (one untimed run measures it)
    count = {name: max(1, math.ceil(MIN_RUN_S / max(run(1), 1e-9)))
             for name, run in runners.items()}
    times = {name: [] for name in runners}
    loads = {name: [] for name in runners}
    with CompetingLoad(workers) as competing:
        for _ in range(repeats):
            for name, run in runners.items():
                before = os.getloadavg()[0]
                times[name].append(run(count[name]) / count[name])
                loads[name].append((before, os.getloadavg()[0]))
    results = {}
    for name, t in times.items():
        median = statistics.median(t)
        spread = max(t) / min(t) if min(t) > 0 else float("inf")
        unstable = []
        if spread > SPREAD_LIMIT:
            unstable.append(f"spread {spread:.2f} > {SPREAD_LIMIT}")
        if competing.cores > COMPETING_LIMIT:
            unstable.append(f"other processes used {competing.cores:.2f} cores "
                            f"> {COMPETING_LIMIT}")
        results[name] = {
            "median_s": median, "min_s": min(t), "max_s": max(t), "times_s": t,
            "compile_s": max(0.0, warmup[name] - median),
            "spread": spread, "load_before": [b for b, _ in loads[name]],
            "load_after": [a for _, a in loads[name]], "competing_cores": competing.cores,
            "unstable": unstable, "runs_per_timing": count[name],
        }
    return results


def timed(unit: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> dict[str, Any]:
    """One unit: warm-up once, then ``repeats`` timed runs (:func:`timed_interleaved`)."""
    return timed_interleaved({"unit": (unit, sync)}, repeats)["unit"]


def set_threads() -> dict[str, Any]:
    """Both frameworks on the same number of threads: PyTorch's intra-op pool set to the
    cores this process may run on, the size XLA:CPU's own pool takes. Returns the counts
    as read back."""
    import torch

    available = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count() or 1)
    torch.set_num_threads(available)
    return {"torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "jax_cpu_threads": available, "xla_flags": os.environ.get("XLA_FLAGS", "")}
