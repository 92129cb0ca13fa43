"""JAX's CPU dispatch (``jaxnets.numerics.set_cpu_dispatch``) measured per config: every JAX
mode's training unit and evaluation pass, with "async" (JAX's default) and "sync" dispatch,
each setting in a bench worker process of its own (the setting belongs to the CPU client),
the units interleaved (A B A B ...) as ``jaxnets bench`` times them. Samples/s, medians; the
figures behind the dispatch ``jaxnets`` uses.

    python bench/cpu_dispatch.py regression_linear mlp_mnist --repeats 5
"""

from __future__ import annotations

import argparse

from bench.hosts import JAX_MODES, WorkerHost
from bench.measure import bench_unit, unit_examples
from bench.timing import timed_interleaved
from jaxnets.config import load_config
from jaxnets.data import load_dataset
from jaxnets.numerics import CPU_DISPATCHES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--modes", default=",".join(JAX_MODES))
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    hosts = {d: WorkerHost("jax", "cpu", d) for d in CPU_DISPATCHES}
    try:
        for name in args.configs:
            cfg = load_config(name)
            unit_cfg, unit_data, epochs = bench_unit(cfg, load_dataset(cfg["data"]), args.steps)
            for host in hosts.values():
                host.reset()
            built = {(d, m): host.build(m, unit_cfg, unit_data, epochs)
                     for d, host in hosts.items() for m in modes}
            train_examples = unit_examples(unit_cfg, unit_data, epochs, args.steps)
            for phase in ("train", "infer"):
                runners = {key: (lambda count, k=key, p=phase: hosts[k[0]].run(k[1], p, count))
                           for key in built}
                results = timed_interleaved(runners, args.repeats, warm_up_first=False,
                                            workers=tuple(h.pid for h in hosts.values()))
                for mode in modes:
                    per_s = {}
                    for d in CPU_DISPATCHES:
                        r = results[d, mode]
                        examples = (train_examples if phase == "train"
                                    else built[d, mode]["test_examples"])
                        per_s[d] = (examples / r["median_s"],
                                    " (!)" if r["unstable"] else "")
                    (a, fa), (s, fs) = per_s["async"], per_s["sync"]
                    print(f"{name:<20} {mode:<8} {phase:<5} async {a:>12,.0f}/s{fa:<4} "
                          f"sync {s:>12,.0f}/s{fs:<4} sync/async {s / a:.2f}", flush=True)
    finally:
        for host in hosts.values():
            host.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
