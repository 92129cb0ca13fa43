"""Minimal reproduction: an XLA:CPU loop fusion that holds a transcendental (exp, tanh,
logistic) or a division and a broadcast scalar runs 3-7x slower than the same fusion with the
scalar given as a full array, and than the transcendental alone: ``exp(x) + 1`` takes ~7x
``exp(x)`` and ~3.5x ``exp(x) + ones`` with ``ones`` an input array. ``jax.nn.silu``,
``jax.nn.sigmoid`` and ``tanh(x / 2)`` are such fusions.

Self-contained (JAX only), for a report to the JAX/XLA projects::

    python bench/xla_broadcast_exp.py [--repeats 30]

prints the best milliseconds of each variant on a float32 (1000, 14, 14, 8) array (the
stride-2 CNN's SiLU input over one evaluation batch), the variants timed interleaved in this
one process, then the optimized HLO of ``exp(x) + 1`` (one kLoop fusion with the broadcast
inside) and of ``exp(x) + ones``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPE = (1000, 14, 14, 8)

# (name, function of (x, ones)); ``ones`` is an input array of ones, never a broadcast
VARIANTS = (
    ("exp(x)", lambda x, ones: jnp.exp(x)),
    ("exp(x) * x", lambda x, ones: jnp.exp(x) * x),
    ("exp(x) + ones  [ones an input]", lambda x, ones: jnp.exp(x) + ones),
    ("exp(x) + 1", lambda x, ones: jnp.exp(x) + 1),
    ("exp(x) * 2", lambda x, ones: jnp.exp(x) * 2),
    ("tanh(x)", lambda x, ones: jnp.tanh(x)),
    ("tanh(x * 0.5)", lambda x, ones: jnp.tanh(x * 0.5)),
    ("x / (x * x + x)", lambda x, ones: x / (x * x + x)),
    ("x / (x * x + 1)", lambda x, ones: x / (x * x + 1)),
    ("x / (ones + exp(-x))  [SiLU, ones an input]", lambda x, ones: x / (ones + jnp.exp(-x))),
    ("x / (1 + exp(-x))  [SiLU]", lambda x, ones: x / (1 + jnp.exp(-x))),
    ("jax.nn.silu", lambda x, ones: jax.nn.silu(x)),
    ("jax.nn.sigmoid", lambda x, ones: jax.nn.sigmoid(x)),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(SHAPE, np.float32) * 3)
    ones = jnp.ones(SHAPE, jnp.float32)
    compiled = {name: jax.jit(f).lower(x, ones).compile() for name, f in VARIANTS}
    for run in compiled.values():
        run(x, ones).block_until_ready()
    best = dict.fromkeys(compiled, float("inf"))
    for _ in range(args.repeats):  # interleaved: A B C ... A B C ...
        for name, run in compiled.items():
            start = time.perf_counter()
            run(x, ones).block_until_ready()
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, float32 {SHAPE}, "
          f"best of {args.repeats}:")
    for name, seconds in best.items():
        print(f"  {name:<46} {seconds * 1e3:7.2f} ms")
    for name in ("exp(x) + 1", "exp(x) + ones  [ones an input]"):
        text = compiled[name].as_text()
        fused = text[text.index("%fused_computation"):text.index("ENTRY")].strip()
        print(f"\noptimized HLO of {name}:\n{fused}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
