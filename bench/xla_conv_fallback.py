"""Minimal reproduction: XLA:CPU runs ``lax.conv``'s gradient convolutions through its naive
loop ("Falling back to unoptimized convolution") when the training step is inside a
``lax.scan``, but through Eigen when the same step is its own ``jit``.

Self-contained (JAX only), for a report to the JAX/XLA projects::

    TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=thunk_emitter=2 python bench/xla_conv_fallback.py

prints, for one 20->20 5x5 convolution (batch 100, 14x14, float32; SimpleNet's second layer),
the milliseconds per training step of ``lax.conv``'s autodiff and of the same convolution
with a custom VJP whose gradients are written as canonical NHWC/HWIO convolutions
(``jaxnets.conv.conv_canonical`` does this for the project), each as one jitted call per step
and inside a ``lax.scan``, plus the non-canonical convolutions of each compiled program.
``--compare`` adds ``jaxnets``' own paths (lax, canonical, im2col, auto, and oneDNN where it
is built) for every seed network convolution, timed interleaved (A B C A B C ...) in this one
process; ``--models`` the seed CNNs whole, per ``model.conv``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

NHWC = ("NHWC", "HWIO", "NHWC")
IMPLS = ("lax", "canonical", "im2col", "auto")
STEPS = 10


def lax_conv(x, w, pad):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)),
                                        dimension_numbers=NHWC)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def canonical_conv(x, w, pad):
    return lax_conv(x, w, pad)


def _fwd(x, w, pad):
    return lax_conv(x, w, pad), (x, w)


def _bwd(pad, res, dy):
    x, w = res
    k = w.shape[0]
    # input gradient: dy padded by k-1-p, the kernel flipped in space with in/out swapped
    w_t = jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3)
    dx = lax_conv(dy, w_t, k - 1 - pad)
    # kernel gradient: x as (C, H, W, N) "batch" with dy as (H', W', N, O) "kernel"
    dw = jax.lax.conv_general_dilated(jnp.transpose(x, (3, 1, 2, 0)),
                                      jnp.transpose(dy, (1, 2, 0, 3)), (1, 1),
                                      ((pad, pad), (pad, pad)), dimension_numbers=NHWC)
    return dx, jnp.transpose(dw, (1, 2, 0, 3))


canonical_conv.defvjp(_fwd, _bwd)


def programs(conv, pad, input_gradient=True):
    """One training step of a layer, as a jitted step and as a scanned epoch; the input
    gradient is computed (and used) as a later layer's would be."""
    def loss(w, x):
        return jnp.sum(jax.nn.relu(conv(x, w, pad)) ** 2)

    def step(w, x):
        if not input_gradient:
            return w - 1e-6 * jax.grad(loss)(w, x)
        dw, dx = jax.grad(loss, argnums=(0, 1))(w, x)
        return w - 1e-6 * dw - 1e-9 * jnp.mean(dx)

    def epoch(w, xs):
        return jax.lax.scan(lambda w, x: (step(w, x), None), w, xs)[0]

    return jax.jit(step), jax.jit(epoch)


def non_canonical(compiled_text: str) -> list[str]:
    return [re.search(r"dim_labels=\S+", line).group(0)
            for line in compiled_text.splitlines()
            if " convolution(" in line and "dim_labels=b01f_01io->b01f" not in line]


def time_interleaved(units: dict[str, callable], repeats: int) -> dict[str, float]:
    """Each unit run once to warm up, then A B C A B C ...: the median seconds of each."""
    for unit in units.values():
        jax.block_until_ready(unit())
    times = {name: [] for name in units}
    for _ in range(repeats):
        for name, unit in units.items():
            start = time.perf_counter()
            jax.block_until_ready(unit())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def reproduce(repeats: int) -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((STEPS, 100, 14, 14, 20)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((5, 5, 20, 20)) * 0.05, jnp.float32)
    units = {}
    for name, conv in (("lax.conv autodiff", lax_conv), ("canonical custom VJP", canonical_conv)):
        step, epoch = programs(conv, 2)
        for where, fn, args in (("jit per step", step, (w, x[0])), ("lax.scan", epoch, (w, x))):
            print(f"{name:<22} {where:<13} non-canonical convolutions: "
                  f"{non_canonical(fn.lower(*args).compile().as_text()) or 'none'}")
        units[f"{name:<22} jit per step"] = (
            lambda step=step: [step(w, x[i]) for i in range(STEPS)][-1])
        units[f"{name:<22} lax.scan    "] = lambda epoch=epoch: epoch(w, x)
    for name, seconds in time_interleaved(units, repeats).items():
        print(f"{name}  {1000 * seconds / STEPS:8.2f} ms/step")


def _xla_forward_onednn_backward():
    """XLA's forward with oneDNN's two backward passes: the mix ``jaxnets.onednn`` measured
    against running all three through oneDNN."""
    from jaxnets import onednn

    @partial(jax.custom_vjp, nondiff_argnums=(2,))
    def conv(x, w, pad):
        return lax_conv(x, w, pad)

    def fwd(x, w, pad):
        return lax_conv(x, w, pad), (x, w)

    def bwd(pad, res, dy):
        return onednn._backward((1, 1), ((pad, pad), (pad, pad)), (1, 1), res, dy)

    conv.defvjp(fwd, bwd)
    return conv


def compare(repeats: int) -> None:
    """jaxnets' paths for the seed networks' convolutions: training steps in a scan, and the
    forward alone at the training batch and at the evaluation batch (1000). With oneDNN
    built: its own rows, the XLA-forward/oneDNN-backward mix, and oneDNN's forward (what
    ``jaxnets.onednn`` chose from)."""
    from jaxnets import onednn
    from jaxnets.conv import conv_for

    def path(impl):
        conv = conv_for(impl)

        def layer(x, w, pad):
            return conv(x, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=NHWC)

        return layer

    trains = {impl: path(impl) for impl in IMPLS}
    forwards = dict(trains)
    if onednn.available():
        trains["onednn"] = path("onednn")
        trains["xla fwd + onednn bwd"] = _xla_forward_onednn_backward()
        forwards["onednn"] = lambda x, w, pad: onednn._onednn_forward(
            x, w, (1, 1), ((pad, pad), (pad, pad)), (1, 1))
    # (name, batch, size, in, out, kernel, padding)
    layers = [("lenet.conv1", 64, 28, 1, 6, 3, 1), ("lenet.conv2", 64, 14, 6, 16, 5, 0),
              ("simplenet.conv1", 100, 28, 1, 20, 5, 2), ("simplenet.conv2", 100, 14, 20, 20, 5, 2),
              ("convnet.conv1", 64, 28, 1, 10, 5, 0), ("convnet.conv2", 64, 12, 10, 20, 5, 0)]
    rng = np.random.default_rng(0)
    for name, n, size, c, o, k, pad in layers:
        x = jnp.asarray(rng.standard_normal((STEPS, n, size, size, c)), jnp.float32)
        big = jnp.asarray(rng.standard_normal((1000, size, size, c)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, k, c, o)) * 0.05, jnp.float32)
        units = {}
        for impl, layer in trains.items():
            # the first layer's input gradient is never needed (its input is the data)
            _, epoch = programs(layer, pad, input_gradient=c > 1)
            units[impl] = lambda epoch=epoch, x=x, w=w: epoch(w, x)
        for impl, layer in forwards.items():
            forward = jax.jit(lambda x, w, layer=layer, pad=pad: layer(x, w, pad))
            units[f"{impl} forward"] = lambda f=forward, x=x, w=w: f(x[0], w)
            units[f"{impl} forward 1000"] = lambda f=forward, w=w, big=big: f(big, w)
        result = time_interleaved(units, repeats)
        print(f"{name:<16} train ms/step: " + ", ".join(
            f"{impl} {1000 * result[impl] / STEPS:.2f}" for impl in trains))
        print(f"{'':<16} forward ms (batch {n} / 1000): " + ", ".join(
            f"{impl} {1000 * result[f'{impl} forward']:.2f} / "
            f"{1000 * result[f'{impl} forward 1000']:.2f}" for impl in forwards))


def compare_models(repeats: int, steps: int = 50) -> None:
    """The seed CNNs whole, per ``model.conv`` path, interleaved: ``steps`` scanned training
    steps on Fashion-MNIST and inference over its 10,000 test images, samples/s."""
    from bench.measure import bench_unit
    from bench.timing import timed_interleaved
    from jaxnets.config import data_overrides, load_config
    from jaxnets.data import load_dataset
    from jaxnets.train import Trainer

    for name in ("convnet_mnist", "simplenet_mnist", "lenet_mnist"):
        overrides = data_overrides("fashion_mnist", None)
        data = load_dataset(load_config(name, overrides)["data"])
        units, examples = {}, {}
        for impl in ("im2col", "canonical", "auto", "lax"):
            cfg, unit_data, epochs = bench_unit(
                load_config(name, [*overrides, f"model.conv={impl}"]), data, steps)
            trainer = Trainer(cfg, unit_data)
            units[f"{impl} train"] = (
                lambda t=trainer, e=epochs: t.train_epochs(e, progress=False), lambda: None)
            units[f"{impl} infer"] = (trainer.evaluate, lambda: None)
            examples[f"{impl} train"] = steps * cfg["train"]["batch_size"]
            examples[f"{impl} infer"] = len(trainer.test_x)
        for unit, r in timed_interleaved(units, repeats).items():
            print(f"{name} {unit:<13} {examples[unit] / r['median_s']:>9,.0f}/s  spread "
                  f"{r['spread']:.2f}, other processes {r['competing_cores']:.2f} cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare", action="store_true",
                        help="also time jaxnets' conv paths on every seed convolution")
    parser.add_argument("--models", action="store_true",
                        help="also time the seed CNNs whole per model.conv path")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()}")
    reproduce(args.repeats)
    if args.compare:
        compare(args.repeats)
    if args.models:
        compare_models(args.repeats)


if __name__ == "__main__":
    main()
