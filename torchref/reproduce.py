"""``jaxnets reproduce``: every seed experiment at full length in both frameworks, one table.

Each experiment is a ``jaxnets compare`` run into ``OUT/<config>/`` (its report, pictures and
log). ``OUT/results.json`` and ``OUT/results.md`` gather the final figures beside the source's
reported result, and are rewritten after every experiment, so an interrupted run keeps what it
finished; ``--resume`` continues it without running those again. MNIST experiments run on
MNIST (``jaxnets download mnist`` puts it in the data cache); where it cannot be had, on
Fashion-MNIST, and the table says so. A second table gives every image experiment's test
accuracy after each epoch in integer percent, the form the PyTorch CNN notes report.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from jaxnets.config import available_configs, data_overrides, load_config
from jaxnets.data import IMAGE_DATASETS, load_dataset, load_images
from jaxnets.errors import DataError
from jaxnets.figures import ensemble_bands
from jaxnets.report import pct, write_json
from torchref.compare import compare

METRICS = {"accuracy": "test accuracy %", "rounded_accuracy": "rounded-digit test accuracy %",
           "none": "test MSE"}


def plan(names: list[str], dataset: str | None, data_dir: str | None
         ) -> list[tuple[dict[str, Any], str]]:
    """The configs to run, each with a note on the data it uses (MNIST is tried once; where it
    cannot be loaded, the MNIST configs run on Fashion-MNIST)."""
    runs, mnist_missing = [], None
    for name in names or list(available_configs()):
        cfg = load_config(name)
        if cfg["data"]["dataset"] not in IMAGE_DATASETS:
            runs.append((cfg, ""))
            continue
        cfg, note = load_config(name, data_overrides(dataset, data_dir)), ""
        if cfg["data"]["dataset"] == "mnist" and dataset is None:
            if mnist_missing is None:
                try:
                    load_images("mnist", cfg["data"]["data_dir"] or None)
                    mnist_missing = ""
                except DataError as exc:
                    mnist_missing = f"MNIST unavailable, Fashion-MNIST used instead: {exc}"
            if mnist_missing:
                cfg = load_config(name, data_overrides("fashion_mnist", data_dir))
                note = mnist_missing
        runs.append((cfg, note))
    return runs


def result_row(cfg: dict[str, Any], report: dict[str, Any], note: str) -> dict[str, Any]:
    final, metric = report["final"], cfg["train"]["metric"]
    row = {"experiment": cfg["name"], "dataset": report["dataset"],
           "data_source": report["data_source"], "note": note,
           "epochs": cfg["train"]["epochs"], "metric": METRICS[metric],
           "jax_train_seconds": final["jax_train_seconds"],
           "torch_train_seconds": final["torch_train_seconds"],
           "jax_test_loss": final["jax_test_loss"], "torch_test_loss": final["torch_test_loss"],
           "jax_test_accuracy": final["jax_test_accuracy"],
           "torch_test_accuracy": final["torch_test_accuracy"],
           "source": cfg["source"], "source_reported": cfg["reported_result"]}
    for fw in ("jax", "torch"):  # every evaluated epoch, as the CNN notes print them
        row[f"{fw}_epoch_test_accuracy"] = [e[fw]["test_accuracy"] for e in report["epochs"]
                                            if e[fw]["test_accuracy"] is not None]
    if "ensemble" in report:  # the members' mean, and their summed training time
        ens = report["ensemble"]
        row["metric"] = f"test MSE, mean of {len(ens['members'])}"
        row["jax_test_loss"], row["torch_test_loss"] = (ens["jax_test_loss_mean"],
                                                        ens["torch_test_loss_mean"])
        for fw in ("jax", "torch"):
            row[f"{fw}_train_seconds"] = sum(m[f"{fw}_train_seconds"] for m in ens["members"])
    return row


def _value(row: dict[str, Any], fw: str) -> str:
    if row[f"{fw}_test_accuracy"] is None:
        return f"{row[f'{fw}_test_loss']:.5f}"
    return pct(row[f"{fw}_test_accuracy"]).strip()


def markdown(rows: list[dict[str, Any]], command: str, seconds: float,
             kept: list[str] | tuple[str, ...] = ()) -> str:
    """The results table; ``kept``: experiments taken from an earlier run (their time is not
    in ``seconds``)."""
    when = (f"{seconds / 60:.1f} minutes in all" if not kept else
            f"{len(kept)} of them kept from an earlier run into the same directory (their "
            f"time is not counted), {seconds / 60:.1f} minutes for the rest")
    lines = [
        "# jaxnets reproduce",
        "",
        f"`{command}`: {len(rows)} experiments, {when}. Both "
        "frameworks start from the same weights and see the same batches; seconds are "
        "training time (JAX compilation excluded).",
        "",
        "| experiment | data | epochs | metric | jax | torch | jax s | torch s | source's "
        "reported result |",
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['experiment']} | {_data(r)} | {r['epochs']} | {r['metric']} | "
            f"{_value(r, 'jax')} | {_value(r, 'torch')} | {r['jax_train_seconds']:.1f} | "
            f"{r['torch_train_seconds']:.1f} | {r['source_reported']} ({r['source']}) |")
    per_epoch = [r for r in rows if r["dataset"] in IMAGE_DATASETS
                 and r["metric"] == METRICS["accuracy"]]
    if per_epoch:
        lines += ["", "Test accuracy after each epoch, in integer percent (as the PyTorch CNN "
                  "notes print it, `{:.0f}%`):", "",
                  "| experiment | data | jax | torch | source's reported result |",
                  "|---|---|---|---|---|"]
        for r in per_epoch:
            jax, torch = (", ".join(f"{100 * a:.0f}" for a in r[f"{fw}_epoch_test_accuracy"])
                          for fw in ("jax", "torch"))
            lines.append(f"| {r['experiment']} | {_data(r)} | {jax} | {torch} | "
                         f"{r['source_reported']} |")
    return "\n".join(lines) + "\n"


def _data(row: dict[str, Any]) -> str:
    return row["dataset"] + (" (MNIST unavailable)" if row["note"] else "")


def finished(cfg: dict[str, Any], out: Path) -> dict[str, Any] | None:
    """The report of an experiment already run into ``out`` with this very config, if any
    (``compare`` writes ``report.json`` last, so its presence means the run finished)."""
    path = out / cfg["name"] / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if report.get("config") == json.loads(json.dumps(cfg)) else None


def reproduce(names: list[str], out: Path, dataset: str | None = None,
              data_dir: str | None = None, progress: bool = True, resume: bool = False
              ) -> list[dict[str, Any]]:
    """Run the experiments; write ``out/results.{json,md}``; return the table's rows.

    ``resume``: keep the experiments an earlier, interrupted run finished in ``out`` with the
    same config, and run only the others."""
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(names, dataset, data_dir)
    command = " ".join(["jaxnets", *sys.argv[1:]])
    rows, reports, kept, start = [], {}, [], time.perf_counter()
    bar = tqdm(runs, desc="reproduce", unit="experiment", disable=not progress)
    for cfg, note in bar:
        bar.set_postfix_str(cfg["name"])
        report = finished(cfg, out) if resume else None
        if report is not None:
            kept.append(cfg["name"])
        else:
            with open(out / f"{cfg['name']}.log", "w", encoding="utf-8") as log:
                report = compare(cfg, out / cfg["name"], progress=False,
                                 echo=lambda line, log=log: print(line, file=log, flush=True))
        reports[cfg["name"]] = report
        rows.append(result_row(cfg, report, note))
        seconds = time.perf_counter() - start
        line = (f"{cfg['name']}: jax {_value(rows[-1], 'jax')}, torch {_value(rows[-1], 'torch')}"
                + (" (kept from the earlier run)" if kept and kept[-1] == cfg["name"] else ""))
        if progress:
            bar.write(line)
        else:
            print(line)
        write_json(out / "results.json", {"command": command, "seconds": seconds,
                                          "kept_from_earlier_run": kept, "experiments": rows})
        (out / "results.md").write_text(markdown(rows, command, seconds, kept),
                                           encoding="utf-8")
    bands = {label: reports[name] for label, name in (("ReLU", "regression_relu"),
                                                      ("Tanh", "regression_tanh"))
             if name in reports}
    if bands:
        cubic = load_dataset(next(iter(bands.values()))["config"]["data"])
        ensemble_bands(out, bands, cubic)
    print(f"results: {out / 'results.md'}, {out / 'results.json'} "
          f"({(time.perf_counter() - start) / 60:.1f} minutes)")
    return rows
