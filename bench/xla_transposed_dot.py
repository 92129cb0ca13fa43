"""A JAX-only reproduction for XLA:CPU: a dot whose operand is transposed (``x.T @ g``, the
weight gradient of a linear layer) is several times slower when x's rows are a multiple of
1 KB apart (256, 512, 768, 1024 float32 features) than the same product on a row-major copy
of ``x.T``, and than at neighbouring widths (500, 640, 784). Each product runs 20 times
inside a ``lax.scan``, as in a training epoch; the row-major operand is passed in already
transposed, which XLA keeps row-major (made inside the computation, XLA folds the transpose
into the dot and takes the slow path again: docs/xla-transposed-dot.md).

    python bench/xla_transposed_dot.py                  # the table of docs/xla-transposed-dot.md
    python bench/xla_transposed_dot.py --batch 100 --fan-in 512 --out 10
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import timed_interleaved

STEPS = 20  # products per scan


def _scan_of(product):
    def epoch(xs, gs):
        def body(acc, xg):
            return acc + product(*xg), None

        total = jnp.zeros(jax.eval_shape(product, xs[0], gs[0]).shape, jnp.float32)
        return jax.lax.scan(body, total, (xs, gs))[0]

    return jax.jit(epoch)


def transposed_dot(x, g):
    return x.T @ g  # x (batch, in): XLA's dot with its lhs contracted over rows


def row_major_dot(x_t, g):
    return x_t @ g  # x_t (in, batch), row-major: the same product


def microseconds(xs, xs_t, gs, repeats: int) -> dict[str, float]:
    """One product's time inside the scan, us, both forms timed in turn (medians)."""
    units = {}
    for name, product, x in (("transposed", transposed_dot, xs), ("row-major", row_major_dot,
                                                                    xs_t)):
        run = _scan_of(product).lower(x, gs).compile()
        units[name] = (lambda run=run, x=x: run(x, gs).block_until_ready(), lambda: None)
    timings = timed_interleaved(units, repeats)
    return {name: t["median_s"] / STEPS * 1e6 for name, t in timings.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 256])
    parser.add_argument("--fan-in", type=int, nargs="+",
                        default=[256, 500, 512, 640, 768, 784, 1024])
    parser.add_argument("--out", type=int, nargs="+", default=[1, 10, 32])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; us per product, medians of "
          f"{args.repeats}, the two forms timed in turn")
    print("| batch | in | out | x.T @ g | row-major copy @ g | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch, fan_in, out in itertools.product(args.batch, args.fan_in, args.out):
        xs = rng.standard_normal((STEPS, batch, fan_in), np.float32)
        gs = jnp.asarray(rng.standard_normal((STEPS, batch, out), np.float32))
        us = microseconds(jnp.asarray(xs), jnp.asarray(xs.transpose(0, 2, 1).copy()), gs,
                          args.repeats)
        slow, fast = us["transposed"], us["row-major"]
        print(f"| {batch} | {fan_in} | {out} | {slow:.1f} | {fast:.1f} | {slow / fast:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
