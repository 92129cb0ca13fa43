"""The detection table: every catalogue bug through :func:`torchref.verify.verify` in float64
and float32, and what the engine said. ``docs/catalogue.md`` and ``docs/catalogue.json``.

Per bug and dtype: caught or not, the check and mode of the row behind the verdict, the layer
named and whether it is the expected one, and the margin (observed difference / bound). A bug
float32 misses is classified by the float64 run: when the bug's effect on the row that caught it
in float64 is inside float32's bound on that same row, float32 cannot see it (the reason is
given); otherwise the miss is the engine's.

The table carries a fingerprint of the catalogue's and the engine's sources
(:func:`fingerprint`); the test suite compares it with the sources as they are, so a table left
stale by a change to either fails until it is regenerated.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from torchref.catalogue.bugs import CATALOGUE, Bug, case, planted_loss
from torchref.catalogue.optimizers import TORCH_OPTIMIZERS
from torchref.verify import verify
from torchref.verify.checks import Row

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("torchref/catalogue", "torchref/verify", "jaxnets/optim.py", "jaxnets/losses.py",
           "jaxnets/convert.py")
PAIRS = ("convnet", "mixer", "pools", "mlp")


def fingerprint(root: Path = ROOT) -> str:
    """sha256 over the catalogue's and the engine's Python sources (path and content)."""
    digest = hashlib.sha256()
    for source in SOURCES:
        path = root / source
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(file.relative_to(root)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def check_kind(row: Row) -> str:
    """The engine's check behind a row, in the table's words."""
    if row.check == "step":
        return "step" if row.mode == "resynced" else "trajectory"
    if row.check == "loss":
        return "step (loss)" if row.mode == "resynced" else "loss"
    if row.check.startswith("state "):
        return "optimizer state"
    if row.check == "state":
        return "model state"
    if row.check == "proof":
        return "proof (layer alone)"
    base = "gradient" if row.check in ("backward", "params") else "forward"
    return f"{base} (shadow)" if row.mode.startswith("shadow") else base


def verdict_row(report, dtype: str) -> Row | None:
    """The failed row the report's first divergent location rests on (the engine's own
    choice), or the first failed row where the engine names none (a mapping problem)."""
    failed = (r for r in report.rows if r.dtype == dtype and not r.passed)
    return report.divergent_row or next(failed, None)


def right_place(named: str | None, expected: str) -> bool:
    """``named`` is the expected layer, one of its tensors, or a row of the expected step."""
    return bool(named) and (named == expected or named.startswith((expected + ".",
                                                                   expected + ":")))


def run_bug(bug: Bug | None, pair: str, dtype: str, optimizer: str = ""
            ) -> tuple[dict[str, Any], Any]:
    kwargs = case(pair, bug, optimizer)
    started = time.perf_counter()
    with planted_loss(bug.loss if bug else None):
        report = verify(dtype=dtype, **kwargs)
    row = verdict_row(report, dtype)
    named = report.first_divergent_layer
    result = {"caught": not report.passed, "layer": named,
              "right_layer": right_place(named, bug.expected) if bug else None,
              "check": check_kind(row) if row else None, "row": _key(row) if row else None,
              "margin": _finite(row.margin) if row else None,
              "error": _finite(row.error) if row else None,
              "bound": row.bound if row else None,
              "torch_error": row.torch_error if row else None,
              "worst_margin": _finite(max((r.margin for r in report.rows), default=0.0)),
              "seconds": round(time.perf_counter() - started, 1)}
    return result, report


def _key(row: Row) -> dict[str, str]:
    return {"layer": row.layer, "check": row.check, "mode": row.mode}


def _finite(value: float) -> float | str:
    return float(value) if np.isfinite(value) else "inf"


def float32_reason(result64: dict, report32) -> str:
    """Why float32 missed a bug float64 caught: the bug's effect (float64's error on the row
    that caught it) against float32's bound on the same row."""
    key = result64["row"]
    if not key:
        return "not caught in float64 either"
    same = next((r for r in report32.rows if _key(r) == key), None)
    if same is None:
        return "float32 has no row where float64 caught it"
    effect = result64["error"]
    effect = float("inf") if effect == "inf" else effect
    if effect <= same.bound:
        return (f"below float32 noise: the bug moves {key['layer']} {key['check']} "
                f"({key['mode']}) by {effect:.2g} in float64, float32's bound there is "
                f"{same.bound:.2g}")
    return (f"engine miss: the bug moves {key['layer']} {key['check']} ({key['mode']}) by "
            f"{effect:.2g} in float64, above float32's bound {same.bound:.2g}, yet float32 "
            f"passed that row ({same.error:.2g})")


def build(names: list[str] | None = None, progress=print) -> dict[str, Any]:
    """Run the correct pairs and every bug (or those ``names``) in float64 then float32."""
    import flax
    import jax
    import optax
    import torch

    started = time.perf_counter()
    entries, correct = [], {}
    runs = [(p, "") for p in PAIRS] + [("mlp", o) for o in TORCH_OPTIMIZERS]
    for pair, optimizer in runs if names is None else ():
        label = f"{pair} + {optimizer}" if optimizer else pair
        correct[label] = {dt: run_bug(None, pair, dt, optimizer)[0]
                          for dt in ("float64", "float32")}
        progress(f"correct {label}: " + ", ".join(
            f"{dt} {'FAILS at ' + str(r['layer']) if r['caught'] else 'passes'}"
            for dt, r in correct[label].items()))
    for bug in CATALOGUE:
        if names is not None and bug.name not in names:
            continue
        result64, _ = run_bug(bug, bug.pair, "float64")
        result32, report32 = run_bug(bug, bug.pair, "float32")
        if result64["caught"] and not result32["caught"]:
            result32["reason"] = float32_reason(result64, report32)
        entries.append({"name": bug.name, "category": bug.category, "pair": bug.pair,
                        "wrote": bug.wrote, "expected": bug.expected, "plant": bug.plant,
                        "float64": result64, "float32": result32})
        progress(f"{bug.name}: " + ", ".join(
            f"{dt} {'caught' if r['caught'] else 'MISSED'} at {r['layer']} ({r['check']}, "
            f"{r['margin']}x)" for dt, r in (("float64", result64), ("float32", result32))))
    return {"fingerprint": fingerprint(), "versions": {
        "torch": torch.__version__, "jax": jax.__version__, "flax": flax.__version__,
        "optax": optax.__version__}, "correct": correct, "bugs": entries,
        "summary": summarise(entries), "seconds": round(time.perf_counter() - started)}


def summarise(entries: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"bugs": len(entries)}
    for dt in ("float64", "float32"):
        caught = [e for e in entries if e[dt]["caught"]]
        right = [e for e in caught if e[dt]["right_layer"]]
        margins = [e[dt]["margin"] for e in caught if isinstance(e[dt]["margin"], float)]
        out[dt] = {"caught": len(caught), "right_layer": len(right),
                   "min_margin": min(margins) if margins else None,
                   "caught_below_10x": sorted(e["name"] for e in caught
                                              if isinstance(e[dt]["margin"], float)
                                              and e[dt]["margin"] < 10)}
    out["float32"]["below_noise"] = sorted(e["name"] for e in entries if "below float32 noise"
                                           in e["float32"].get("reason", ""))
    return out


def write(table: dict[str, Any], out: Path) -> None:
    from jaxnets.report import write_json
    from torchref.catalogue.markdown import markdown

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "catalogue.json", table)
    (out / "catalogue.md").write_text(markdown(table), encoding="utf-8")


def load(out: Path) -> dict[str, Any]:
    return json.loads((out / "catalogue.json").read_text(encoding="utf-8"))
