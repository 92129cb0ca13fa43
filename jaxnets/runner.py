"""Train one framework for a config's epochs: a table row per evaluation, a JSON-lines log,
checkpoints, pictures, a report and the final weights (safetensors) in the output directory.
Works with ``jaxnets.train.Trainer`` and ``torchref.train.Trainer`` alike."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxnets import checkpoint
from jaxnets.convert import write_safetensors
from jaxnets.errors import TrainingError
from jaxnets.report import single_header, single_row, write_json, write_text_atomic


def train_blocks(epochs: int, eval_every: int, save_every: int = 0, start: int = 0
                 ) -> list[range]:
    """Epoch indices from ``start`` in blocks that end where the run evaluates (every
    ``eval_every`` epochs), saves a checkpoint (every ``save_every``) or stops. The boundaries
    are absolute, so a resumed run trains in the same blocks as an uninterrupted one."""
    stops = [e for e in range(start + 1, epochs + 1)
             if e % eval_every == 0 or (save_every and e % save_every == 0) or e == epochs]
    return [range(a, b) for a, b in zip([start, *stops[:-1]], stops, strict=True)]


def fit(trainer, cfg: dict[str, Any], out: Path, progress: bool = True,
        echo: Callable[[str], None] = print, save_every: int = 0,
        resume: checkpoint.Checkpoint | None = None,
        figures: Callable[[Path, list[dict[str, Any]]], list[Path]] | None = None
        ) -> dict[str, Any]:
    """Train ``trainer`` for ``cfg['train']['epochs']`` epochs into ``out``.

    A checkpoint is saved every ``save_every`` epochs (0: only at the end) and after the last
    epoch. ``resume``: continue from that checkpoint, through the same batches the
    uninterrupted run would have seen. ``figures(out, rows)`` draws the run's pictures."""
    out.mkdir(parents=True, exist_ok=True)
    note = checkpoint.prepare(out, resume)
    if note:
        echo(f"note: {note}")
    total = cfg["train"]["epochs"]
    rows, start, step = [], 0, 0
    if resume is not None:
        trainer.restore(resume.weights, resume.optimizer)
        rows, start, step = list(resume.meta["epochs"]), resume.epoch, int(resume.meta["step"])
        echo(f"resuming from {resume.path} (epoch {start}, step {step})")
    echo(f"{cfg['name']} in {trainer.framework}: {trainer.num_train} training examples, "
         f"{total} epochs")
    # a resumed run drops the rows past its checkpoint
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    echo(single_header())
    last_saved = resume.path if resume is not None else None
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as log:
        for block in train_blocks(total, cfg["train"]["eval_every"], save_every, start):
            try:
                stats = trainer.train_epochs(block, progress)
            except TrainingError as exc:
                kept = (f"the last checkpoint, {last_saved}, is untouched" if last_saved
                        else "no checkpoint was saved before it")
                raise TrainingError(f"{exc}; {kept}") from None
            if block.stop % cfg["train"]["eval_every"] == 0 or block.stop == total:
                stats[-1].test_loss, stats[-1].test_accuracy = trainer.evaluate()
            for epoch, s in zip(block, stats, strict=True):
                step += len(s.step_losses)
                row = {"epoch": epoch + 1, "framework": trainer.framework, "step": step,
                       **s.as_dict()}
                rows.append(row)
                log.write(json.dumps(row) + "\n")
            log.flush()
            if stats[-1].test_loss is not None:
                echo(single_row(block.stop, stats[-1]))
            if (save_every and block.stop % save_every == 0) or block.stop == total:
                last_saved = checkpoint.save(
                    out, trainer.weights(), trainer.optimizer_arrays(),
                    {"framework": trainer.framework, "epoch": block.stop, "step": step,
                     "config": cfg, "epochs": rows})
    weights = out / f"weights_{trainer.framework}.safetensors"
    write_safetensors(trainer.weights(), weights, framework=trainer.framework)
    skipped = sum(r["skipped_steps"] for r in rows)
    report = {"config": cfg, "framework": trainer.framework, "epochs": rows,
              "final": {"test_accuracy": rows[-1]["test_accuracy"],
                        "test_loss": rows[-1]["test_loss"],
                        "train_seconds": sum(r["seconds"] for r in rows),
                        "skipped_steps": skipped},
              "weights": str(weights), "checkpoint": str(last_saved),
              # as the framework reports them, not as asked for
              "device": trainer.data_device(), "numerics": trainer.numerics(),
              "parallel": trainer.parallel(),  # devices and processes
              "timing": trainer.timing}
    if figures is not None:
        report["figures"] = [str(p) for p in figures(out, rows)]
    write_json(out / "report.json", report)
    if skipped:
        echo(f"{skipped} steps skipped for a non-finite loss or gradient "
             f"(train.on_nonfinite = \"skip\")")
    echo(f"weights: {weights}; checkpoint: {last_saved}; report: {out / 'report.json'}")
    return report
