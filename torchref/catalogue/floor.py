"""The figure behind the float32 floor (``torchref.verify.checks.FLOOR_ULPS``): on the
catalogue's correct ports, how many float32 ulps of a row's scale Flax's error needs beyond
``NOISE_MARGIN`` times PyTorch float32's own error.

``python -m torchref.catalogue.floor`` prints the largest need per pair and input seed.
"""

from __future__ import annotations

import sys

from torchref.catalogue import pairs
from torchref.catalogue.bugs import case
from torchref.verify import verify
from torchref.verify.checks import FLOAT32_EPS, NOISE_MARGIN, UNCAPPED


def floor_need(report) -> tuple[float, str]:
    """The largest ``max(0, err(flax32) - NOISE_MARGIN * err(torch32)) / (eps32 * scale)``
    over a float32 report's layer rows (optimizer steps have their own floor), and its row."""
    need, where = 0.0, ""
    for row in report.rows:
        if row.dtype != "float32" or row.check in UNCAPPED or not row.stats["scale"]:
            continue
        ulps = max(0.0, row.error - NOISE_MARGIN * row.torch_error) / (
            FLOAT32_EPS * row.stats["scale"])
        if ulps > need:
            need, where = ulps, f"{row.layer} ({row.check}, {row.mode})"
    return need, where


def measure(pair: str, seed: int) -> tuple[float, str]:
    kwargs = case(pair)
    kwargs["inputs"] = pairs.inputs(pair, seed)
    return floor_need(verify(dtype="float32", **kwargs))


def main(argv: list[str] | None = None) -> int:
    seeds = range(int((argv or sys.argv[1:] or ["3"])[0]))
    for pair in ("convnet", "mixer", "pools", "mlp"):
        for seed in seeds:
            need, where = measure(pair, seed)
            print(f"{pair:<8} seed {seed}: {need:.3g} ulps at {where or '-'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
