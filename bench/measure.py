"""What ``jaxnets bench`` measures, and how.

Every measurement times a fixed unit of work (``steps`` training steps, or one pass of
inference over the test set) after a warm-up run of the same unit; the warm-up's extra time
over the steady-state median is reported as ``compile_s``. The modes of a config are timed
interleaved, their spread and the machine's load recorded (``bench.timing``). Results are
synchronised: JAX results are copied to the host (which waits for the device) and CUDA work
is followed by ``torch.cuda.synchronize()``. Peak memory is the process's host RSS sampled
every 5 ms while a mode is built and warmed up (modes built earlier stay alive, so it is
cumulative).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import threading
from collections.abc import Callable
from typing import Any

import psutil

from bench.hosts import JAX_MODES, Hosts, framework_of
from bench.timing import timed_interleaved
from jaxnets.data import Dataset

__all__ = ["JAX_MODES", "bench_config", "matmul_peak"]

# the square matmuls whose best is the peak a fraction compares against (matmul_peak)
MATMUL_SIZES = {"cpu": (512, 1024, 2048), "gpu": (2048, 4096, 8192)}
# JAX_MODES (bench.hosts): jit_step, a jitted call per step, batches gathered on the
# device; scan, an epoch per call; stream, a jitted call per step on batches gathered on
# the host, prefetched two ahead


class PeakRSS:
    """Context manager: the largest resident set size of this process while it is open."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._process = psutil.Process(os.getpid())

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def matmul_peak(repeats: int, device: str = "cpu",
                hosts: Hosts | None = None) -> dict[str, Any]:
    """float32 GFLOP/s of square matmuls in each framework, in the framework's own worker
    process (``hosts``, as the modes are timed; default a fresh isolated pair), the two timed
    in turn (A B A B) at each size of ``MATMUL_SIZES[device]``; a framework's figure is its
    best size's median and the machine's peak the larger of the two.

    Why several sizes: one size is not the peak everywhere. On a 2-core EPYC VM (JAX,
    medians of 7) 512^3 ran at 208, 1024^3 at 206, 2048^3 at 198 and 4096^3 at 178
    GFLOP/s, and a bench run whose only peak was 2048^3 (189) printed the seed MLP's
    inference, a (1000, 784) x (784, 512) matmul, at 106 % of it. Why the workers: the
    modes run there, under the bench's settings (JAX's CPU dispatch, the thread pools), so the
    peak is measured as they are; timed in the coordinating process, with both frameworks
    loaded, JAX's 512^3 ran at 159 GFLOP/s against 169-180 in its worker in later runs (and
    192-208 alone in a process of its own, "sync" and "async" dispatch)."""
    if hosts is None:
        with Hosts(device) as own:
            return matmul_peak(repeats, device, own)
    by_size, unstable = {}, {"jax": {}, "torch": {}}
    for n in MATMUL_SIZES[device]:
        runners = {}
        for framework in ("jax", "torch"):
            host = hosts.for_framework(framework)
            runners[framework] = functools.partial(host.run, host.build_matmul(framework, n),
                                                   "train")
        timings = timed_interleaved(runners, repeats, warm_up_first=False,
                                    workers=hosts.worker_pids())
        by_size[n] = {f: 2 * n**3 / t["median_s"] / 1e9 for f, t in timings.items()}
        for f, t in timings.items():
            unstable[f][n] = [f"{f} {n}^3: {reason}" for reason in t["unstable"]]
    result: dict[str, Any] = {"matmul_gflops_by_size": {str(n): g for n, g in by_size.items()}}
    for f in ("jax", "torch"):
        best = max(by_size, key=lambda n: by_size[n][f])
        result[f"{f}_gflops"], result[f"{f}_matmul_size"] = by_size[best][f], best
    result["matmul_peak_gflops"] = max(result["jax_gflops"], result["torch_gflops"])
    result["matmul_peak_unstable"] = (unstable["jax"][result["jax_matmul_size"]]
                                      + unstable["torch"][result["torch_matmul_size"]])
    return result


def torch_sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "gpu" else (lambda: None)


# FLOPs per output element of the layers without weights (forward pass): an activation or
# dropout is one operation per element; BatchNorm subtracts, divides, scales and shifts;
# LayerNorm also reduces twice; softmax exponentiates, sums and divides.
ELEMENTWISE_FLOPS = {"relu": 1, "tanh": 1, "sigmoid": 1, "silu": 1, "gelu": 1,
                     "leaky_relu": 1, "dropout": 1, "softmax": 3, "log_softmax": 3,
                     "batchnorm": 4, "layernorm": 5, "flatten": 0}


def _flops(layer) -> int:
    """One example's forward FLOPs of one layer (its branch included), multiply-adds x 2 for
    the weighted layers (biases not counted)."""
    out = math.prod(layer.out_shape)
    if layer.type == "linear":
        return 2 * layer.in_shape[0] * layer.options["out"]
    if layer.type == "conv2d":
        o = layer.options
        return 2 * layer.in_shape[0] // o["groups"] * o["kernel"][0] * o["kernel"][1] * out
    if layer.type in ("maxpool", "avgpool"):
        return math.prod(layer.options["kernel"]) * out
    if layer.type == "global_avgpool":
        return math.prod(layer.in_shape)
    if layer.type == "residual":
        return sum(_flops(inner) for inner in layer.layers) + out + _projection_flops(layer)
    return ELEMENTWISE_FLOPS[layer.type] * out


def _projection_flops(layer) -> int:
    return 0 if not layer.projection else 2 * layer.in_shape[0] * math.prod(layer.out_shape)


def flops_by_layer(cfg: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(name, type, forward FLOPs of one example) for every top-level layer."""
    from jaxnets.spec import data_input_shape, model_layers

    return [(layer.name, layer.type, _flops(layer))
            for layer in model_layers(cfg["model"], data_input_shape(cfg))]


def layer_flops(cfg: dict[str, Any]) -> list[int]:
    """Multiply-adds x 2 of one example's forward pass through each weighted layer (linear,
    conv2d, a residual's 1x1 projection), in order, residual branches included: weights W
    applied at P output positions cost 2 W P. The matmul work a peak fraction compares
    against; :func:`flops_by_layer` counts every layer."""
    from jaxnets.spec import data_input_shape, model_layers

    def weighted(layers):
        for layer in layers:
            if layer.type in ("linear", "conv2d"):
                yield _flops(layer)
            elif layer.type == "residual":
                yield from weighted(layer.layers)
                if layer.projection:
                    yield _projection_flops(layer)

    return list(weighted(model_layers(cfg["model"], data_input_shape(cfg))))


def forward_flops(cfg: dict[str, Any]) -> int:
    return sum(layer_flops(cfg))


def training_flops(cfg: dict[str, Any]) -> int:
    """One example's training step: the forward pass, the weight gradients (as many FLOPs
    again) and the input gradients of every layer but the first (its input is the data)."""
    flops = layer_flops(cfg)
    return 2 * sum(flops) + sum(flops[1:])


def bench_unit(cfg: dict[str, Any], dataset: Dataset, steps: int) -> tuple[dict, Dataset, range]:
    """The unit of training work: ``steps`` steps, as one epoch over ``steps`` batches or, for
    the full-batch toys, ``steps`` one-step epochs."""
    cfg = copy.deepcopy(cfg)
    bs = cfg["train"]["batch_size"]
    n = len(dataset.train_x)
    if bs >= n:  # full batch: one step per epoch
        return cfg, dataset, range(steps)
    limit = min(n, steps * bs)
    cfg["train"]["shuffle"] = True
    return cfg, dataset.head(limit), range(1)


def unit_examples(unit_cfg: dict[str, Any], unit_data: Dataset, epochs: range,
                  steps: int) -> int:
    """Training examples in one unit of :func:`bench_unit`'s (``steps`` steps)."""
    return len(epochs) * min(len(unit_data.train_x), steps * unit_cfg["train"]["batch_size"])


def bench_config(cfg: dict[str, Any], dataset: Dataset, repeats: int, steps: int,
                 device: str = "cpu", modes: tuple[str, ...] = ("jit_step", "scan", "stream",
                                                                 "eager", "compile"),
                 echo: Callable[[str], None] = print,
                 hosts: Hosts | None = None) -> list[dict[str, Any]]:
    """Train and inference measurements for every mode of one config. Every mode is built
    and warmed up first, each framework in its own worker process (``hosts``, default a
    fresh isolated pair: bench.hosts says why); then the modes are timed in turn within each
    repeat (A B C A B C ...), training first, then inference
    (:func:`bench.timing.timed_interleaved`)."""
    if hosts is None:
        with Hosts(device) as own:
            return bench_config(cfg, dataset, repeats, steps, device, modes, echo, own)
    unit_cfg, unit_data, epochs = bench_unit(cfg, dataset, steps)
    flops = {"train": training_flops(cfg), "infer": forward_flops(cfg)}
    for framework in {framework_of(m) for m in modes}:
        hosts.for_framework(framework)
    for host in hosts.active():
        host.reset()
    rows, built = [], {}
    for mode in modes:
        host = hosts.for_framework(framework_of(mode))
        try:
            built[mode] = host.build(mode, unit_cfg, unit_data, epochs)
        except Exception as exc:  # torch.compile needs a working C++ toolchain, for one
            echo(f"  {cfg['name']} {mode}: failed ({type(exc).__name__}: "
                 f"{str(exc).splitlines()[0] if str(exc) else ''})")
            rows.append({"config": cfg["name"], "framework": framework_of(mode), "mode": mode,
                         "error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
    train_examples = unit_examples(unit_cfg, unit_data, epochs, steps)
    for phase in ("train", "infer"):
        runners = {mode: functools.partial(hosts.for_framework(framework_of(mode)).run, mode,
                                           phase) for mode in built}
        results = timed_interleaved(runners, repeats, warm_up_first=False,
                                    workers=hosts.worker_pids())
        for mode, result in results.items():
            examples = train_examples if phase == "train" else built[mode]["test_examples"]
            warmup_s = built[mode]["warm"][phase]
            per_s = examples / result["median_s"]
            rows.append({
                "config": cfg["name"], "framework": framework_of(mode),
                "mode": mode, "phase": phase, "samples_per_s": per_s,
                "samples_per_s_min": examples / result["max_s"],
                "samples_per_s_max": examples / result["min_s"],
                "gflops": per_s * flops[phase] / 1e9,
                "compile_s": max(0.0, warmup_s - result["median_s"]), "repeats": repeats,
                "median_s": result["median_s"], "examples": examples,
                "peak_rss_mb": built[mode]["peak_rss"] / 2**20,
                **{k: result[k] for k in ("spread", "load_before", "load_after",
                                          "competing_cores", "unstable", "times_s")},
            })
    for mode in built:
        train, infer = (next(r for r in rows if r.get("phase") == phase and r["mode"] == mode)
                        for phase in ("train", "infer"))
        echo(f"  {cfg['name']:<18} {mode:<8} train {train['samples_per_s']:>10,.0f}/s  "
             f"infer {infer['samples_per_s']:>11,.0f}/s  compile {train['compile_s']:.1f} s")
        for row in (train, infer):
            if row["unstable"]:
                echo(f"  warning: {cfg['name']} {mode} {row['phase']} is unstable "
                     f"({'; '.join(row['unstable'])}): left out of the ratios")
    return rows
