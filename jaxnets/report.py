"""Framework-neutral results: per-epoch statistics, the console table and report files."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxnets.errors import TrainingError


@dataclass
class EpochStats:
    """One training epoch. ``step_losses``: the loss of every step, in order."""

    step_losses: np.ndarray
    loss: float
    accuracy: float | None  # None where the config's metric is "none"
    seconds: float
    test_loss: float | None = None  # None: not evaluated after this epoch (eval_every)
    test_accuracy: float | None = None
    skipped: int = 0  # steps skipped for a non-finite loss or gradient (on_nonfinite skip)

    def as_dict(self) -> dict[str, float]:
        return {
            "train_loss": self.loss,
            "train_accuracy": self.accuracy,
            "test_loss": self.test_loss,
            "test_accuracy": self.test_accuracy,
            "seconds": self.seconds,
            "skipped_steps": self.skipped,
        }


def eval_blocks(epochs: int, every: int) -> list[range]:
    """Epoch indices in blocks of ``every``, evaluated at each block's end: (10, 4) ->
    [range(0, 4), range(4, 8), range(8, 10)]."""
    return [range(start, min(start + every, epochs)) for start in range(0, epochs, every)]


def describe(epochs: range) -> str:
    """``range(4, 5)`` -> "epoch 5"; ``range(0, 100)`` -> "epochs 1-100" (1-based, as shown)."""
    if len(epochs) == 1:
        return f"epoch {epochs.start + 1}"
    return f"epochs {epochs.start + 1}-{epochs.stop}"


def split_epochs(step_losses: np.ndarray, step_correct: np.ndarray,
                 plan: list[tuple[np.ndarray, np.ndarray | None]], seconds: float,
                 metric: str, step_skipped: np.ndarray | None = None) -> list[EpochStats]:
    """Per-step results of consecutive epochs -> one :class:`EpochStats` per epoch.

    ``plan``: each epoch's ``(full, rest)`` index batches (``jaxnets.data.epoch_batches``).
    The epoch's loss and accuracy are averaged over examples (the loss over the steps whose
    loss is finite: the others were skipped); the seconds are shared out in proportion to the
    steps. ``step_skipped``: which steps ``on_nonfinite = "skip"`` left without an update (a
    non-finite loss or gradient); None: the steps whose loss is not finite.
    """
    stats, offset = [], 0
    total_steps = sum(len(full) + (rest is not None) for full, rest in plan)
    for full, rest in plan:
        sizes = np.array([full.shape[1]] * len(full) + ([len(rest)] if rest is not None else []))
        steps = len(sizes)
        losses = np.asarray(step_losses[offset:offset + steps], np.float32)
        correct = np.asarray(step_correct[offset:offset + steps])
        finite = np.isfinite(losses)
        skipped = ~finite if step_skipped is None else np.asarray(
            step_skipped[offset:offset + steps], bool)
        offset += steps
        stats.append(EpochStats(
            step_losses=losses,
            loss=float(np.sum(losses[finite].astype(np.float64) * sizes[finite])
                       / sizes[finite].sum()) if finite.any() else float("nan"),
            accuracy=None if metric == "none" else float(correct.sum() / sizes.sum()),
            seconds=seconds * steps / total_steps,
            skipped=int(np.sum(skipped)),
        ))
    return stats


def check_finite(step_losses: np.ndarray, plan: list[tuple[np.ndarray, np.ndarray | None]],
                 epochs: range, framework: str) -> None:
    """Raise :class:`TrainingError` naming the first step whose loss is NaN or Inf.

    ``plan`` and ``epochs`` as for :func:`split_epochs`; epochs and steps are 1-based."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(step_losses)))
    if not len(bad):
        return
    ends = np.cumsum([len(full) + (rest is not None) for full, rest in plan])
    which = int(np.searchsorted(ends, bad[0], side="right"))  # the epoch holding that step
    step = int(bad[0]) - (int(ends[which - 1]) if which else 0)
    raise TrainingError(
        f"{framework}: the loss is {float(step_losses[bad[0]])} at epoch {epochs[which] + 1}, "
        f"step {step + 1}; training stopped (train.on_nonfinite = \"stop\"; set it to \"skip\" "
        f"to skip such steps, or lower optimizer.learning_rate)")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: a temporary file, fsync, rename, and the
    directory fsynced, so a crash leaves the old file or the new one, never half of either."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON atomically (:func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def num(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.4f}"


def pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:6.2f}"


def single_header() -> str:
    return f"{'epoch':>5} | {'train loss':>10} {'train acc':>9} | {'test loss':>9} " \
           f"{'test acc':>8} | {'seconds':>7}"


def single_row(epoch: int, s: EpochStats) -> str:
    return (f"{epoch:>5} | {s.loss:>10.4f} {pct(s.accuracy):>9} | {num(s.test_loss, 9)} "
            f"{pct(s.test_accuracy):>8} | {s.seconds:>7.1f}")


def compare_header() -> str:
    top = f"{'':>5} | {'train loss':^19} | {'train acc %':^15} | {'test loss':^19} | " \
          f"{'test acc %':^15} | {'seconds':^13} | {'step loss':>9}"
    sub = f"{'epoch':>5} | {'jax':>9} {'torch':>9} | {'jax':>7} {'torch':>7} | {'jax':>9} " \
          f"{'torch':>9} | {'jax':>7} {'torch':>7} | {'jax':>6} {'torch':>6} | {'max diff':>9}"
    return f"{top}\n{sub}\n{'-' * len(sub)}"


def compare_row(epoch: int, j: EpochStats, t: EpochStats, step_diff: float,
                jax_seconds: float, torch_seconds: float) -> str:
    """A row of the side-by-side table: epoch ``epoch``'s metrics, the seconds and the largest
    per-step loss difference of the block of epochs that ends there."""
    return (f"{epoch:>5} | {j.loss:>9.4f} {t.loss:>9.4f} | {pct(j.accuracy):>7} "
            f"{pct(t.accuracy):>7} | {num(j.test_loss, 9)} {num(t.test_loss, 9)} | "
            f"{pct(j.test_accuracy):>7} {pct(t.test_accuracy):>7} | {jax_seconds:>6.1f} "
            f"{torch_seconds:>6.1f} | {step_diff:>9.2e}")


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
        f"- devices, as each framework reports them: jax {report['devices']['jax']}, torch "
        f"{report['devices']['torch']}",
        f"- seconds: jax, {report['timing']['jax']}; torch, {report['timing']['torch']}",
        "",
        "| epoch | train loss jax | train loss torch | test loss jax | test loss torch "
        "| test acc jax % | test acc torch % | seconds jax | seconds torch | max step-loss diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in report["epochs"]:
        j, t = e["jax"], e["torch"]
        if j["test_loss"] is None:
            continue  # epochs inside an evaluation block: shown at the block's end
        lines.append(
            f"| {e['epoch']} | {j['train_loss']:.4f} | {t['train_loss']:.4f} | "
            f"{j['test_loss']:.4f} | {t['test_loss']:.4f} | {pct(j['test_accuracy'])} | "
            f"{pct(t['test_accuracy'])} | {j['seconds']:.2f} | {t['seconds']:.2f} | "
            f"{e['step_loss_max_abs_diff']:.2e} |"
        )
    accuracy = (
        f"Final test accuracy: jax {pct(final['jax_test_accuracy']).strip()} %, torch "
        f"{pct(final['torch_test_accuracy']).strip()} % (difference "
        f"{final['accuracy_diff_pp']:+.2f} percentage points). "
        if final["jax_test_accuracy"] is not None else "")
    lines += [
        "",
        f"{accuracy}Final test loss: jax {final['jax_test_loss']:.6f}, torch "
        f"{final['torch_test_loss']:.6f}. Training time: jax "
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
    if report.get("dtype", "float32") != "float32":
        lines += ["", f"This run trained both frameworks in {report['dtype']} (`--dtype`)."]
    return "\n".join(lines) + "\n"
