"""Train one framework for a config's epochs: a table row per evaluation, a JSON-lines log, a
report and the final weights (safetensors) in the output directory. Works with
``jaxnets.train.Trainer`` and ``torchref.train.Trainer`` alike."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxnets.convert import write_safetensors
from jaxnets.report import eval_blocks, single_header, single_row, write_json


def fit(trainer, cfg: dict[str, Any], out: Path, progress: bool = True,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    echo(f"{cfg['name']} in {trainer.framework}: {trainer.num_train} training examples, "
         f"{cfg['train']['epochs']} epochs")
    echo(single_header())
    epochs = []
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as log:
        for block in eval_blocks(cfg["train"]["epochs"], cfg["train"]["eval_every"]):
            stats = trainer.train_epochs(block, progress)
            stats[-1].test_loss, stats[-1].test_accuracy = trainer.evaluate()
            for epoch, s in zip(block, stats, strict=True):
                row = {"epoch": epoch + 1, "framework": trainer.framework, **s.as_dict()}
                epochs.append(row)
                log.write(json.dumps(row) + "\n")
            log.flush()
            echo(single_row(block.stop, stats[-1]))
    weights = out / f"weights_{trainer.framework}.safetensors"
    write_safetensors(trainer.weights(), weights)
    report = {"config": cfg, "framework": trainer.framework, "epochs": epochs,
              "final": {"test_accuracy": epochs[-1]["test_accuracy"],
                        "test_loss": epochs[-1]["test_loss"],
                        "train_seconds": sum(e["seconds"] for e in epochs)},
              "weights": str(weights)}
    write_json(out / "report.json", report)
    echo(f"weights: {weights}; report: {out / 'report.json'}")
    return report
