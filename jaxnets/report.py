"""Framework-neutral results: per-epoch statistics, the console table and report files."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class EpochStats:
    """One training epoch. ``step_losses``: the loss of every step, in order."""

    step_losses: np.ndarray
    loss: float
    accuracy: float
    seconds: float
    test_loss: float = math.nan
    test_accuracy: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {
            "train_loss": self.loss,
            "train_accuracy": self.accuracy,
            "test_loss": self.test_loss,
            "test_accuracy": self.test_accuracy,
            "seconds": self.seconds,
        }


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def pct(value: float) -> str:
    return "   -  " if math.isnan(value) else f"{100 * value:6.2f}"


def single_header() -> str:
    return f"{'epoch':>5} | {'train loss':>10} {'train acc':>9} | {'test loss':>9} " \
           f"{'test acc':>8} | {'seconds':>7}"


def single_row(epoch: int, s: EpochStats) -> str:
    return (f"{epoch:>5} | {s.loss:>10.4f} {pct(s.accuracy):>9} | {s.test_loss:>9.4f} "
            f"{pct(s.test_accuracy):>8} | {s.seconds:>7.1f}")


def compare_header() -> str:
    top = f"{'':>5} | {'train loss':^19} | {'train acc %':^15} | {'test loss':^19} | " \
          f"{'test acc %':^15} | {'seconds':^13} | {'step loss':>9}"
    sub = f"{'epoch':>5} | {'jax':>9} {'torch':>9} | {'jax':>7} {'torch':>7} | {'jax':>9} " \
          f"{'torch':>9} | {'jax':>7} {'torch':>7} | {'jax':>6} {'torch':>6} | {'max diff':>9}"
    return f"{top}\n{sub}\n{'-' * len(sub)}"


def compare_row(epoch: int, j: EpochStats, t: EpochStats, step_diff: float) -> str:
    return (f"{epoch:>5} | {j.loss:>9.4f} {t.loss:>9.4f} | {pct(j.accuracy):>7} "
            f"{pct(t.accuracy):>7} | {j.test_loss:>9.4f} {t.test_loss:>9.4f} | "
            f"{pct(j.test_accuracy):>7} {pct(t.test_accuracy):>7} | {j.seconds:>6.1f} "
            f"{t.seconds:>6.1f} | {step_diff:>9.2e}")


def compare_markdown(report: dict[str, Any]) -> str:
    """The side-by-side report as Markdown."""
    final, first = report["final"], report["first_step_loss"]
    lines = [
        f"# jaxnets compare: {report['config']['name']}",
        "",
        f"- dataset: {report['dataset']} ({report['data_source']}), "
        f"{report['num_train']} training and {report['num_test']} test examples",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- initial weights, max-abs difference after conversion: "
        f"{report['initial_weights_max_abs_diff']:.3g}",
        f"- first step loss: jax {first['jax']:.8f}, torch {first['torch']:.8f} "
        f"(difference {abs(first['jax'] - first['torch']):.3g})",
        "",
        "| epoch | train loss jax | train loss torch | test acc jax % | test acc torch % "
        "| seconds jax | seconds torch | max step-loss diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in report["epochs"]:
        j, t = e["jax"], e["torch"]
        lines.append(
            f"| {e['epoch']} | {j['train_loss']:.4f} | {t['train_loss']:.4f} | "
            f"{100 * j['test_accuracy']:.2f} | {100 * t['test_accuracy']:.2f} | "
            f"{j['seconds']:.1f} | {t['seconds']:.1f} | {e['step_loss_max_abs_diff']:.2e} |"
        )
    lines += [
        "",
        f"Final test accuracy: jax {100 * final['jax_test_accuracy']:.2f} %, torch "
        f"{100 * final['torch_test_accuracy']:.2f} % (difference "
        f"{final['accuracy_diff_pp']:+.2f} percentage points). Training time: jax "
        f"{final['jax_train_seconds']:.1f} s, torch {final['torch_train_seconds']:.1f} s (JAX "
        f"compilation, {final['jax_compile_seconds']:.1f} s, is timed apart). Final weights differ "
        f"by at most {final['final_weights_max_abs_diff']:.3g}.",
        "",
        "Both frameworks start from the same weights (PyTorch's initialisation, converted through "
        "a safetensors file) and see the same batches in the same order. Float32 training "
        "trajectories drift apart slowly through rounding (different kernels sum in different "
        "orders), so per-step losses agree closely at first and the final accuracies agree to "
        "a fraction of a point, not bit for bit.",
    ]
    return "\n".join(lines) + "\n"
