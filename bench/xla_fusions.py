"""XLA:CPU's library fusions (``train.xla_cpu_fusions``) measured per config: the scanned
training step and one evaluation pass, with XLA's default fusions and with none, interleaved
in one process (best of ``--repeats``). The figures behind ``jaxnets.train.xla_cpu_options``
and the configs that set "none".

    python bench/xla_fusions.py convnet_mnist lenet_mnist --repeats 5
"""

from __future__ import annotations

import argparse
import time

from bench.measure import bench_unit
from jaxnets.config import load_config
from jaxnets.data import load_dataset
from jaxnets.train import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    for name in args.configs:
        units = {}
        for setting in ("default", "none"):
            cfg = load_config(name, [f'train.xla_cpu_fusions="{setting}"'])
            data = load_dataset({**cfg["data"], "valid_size": 0, "train_limit": 0})
            unit_cfg, unit_data, epochs = bench_unit(cfg, data, args.steps)
            trainer = Trainer(unit_cfg, unit_data)
            evaluator = Trainer(cfg, data.head(1, len(data.test_x)))
            units[setting] = (
                lambda t=trainer, e=epochs: t.train_epochs(e, progress=False, scan=True),
                evaluator.evaluate)
            for unit in units[setting]:
                unit()  # compile
        best = {(s, phase): float("inf") for s in units for phase in (0, 1)}
        for _ in range(args.repeats):
            for setting, pair in units.items():
                for phase, unit in enumerate(pair):
                    start = time.perf_counter()
                    unit()
                    best[setting, phase] = min(best[setting, phase],
                                               time.perf_counter() - start)
        step = {s: best[s, 0] / args.steps * 1e3 for s in units}
        evaluation = {s: best[s, 1] * 1e3 for s in units}
        print(f"{name}: training {step['default']:.2f} / {step['none']:.2f} ms a step, "
              f"evaluation {evaluation['default']:.0f} / {evaluation['none']:.0f} ms a pass "
              "(default / none)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
