"""Which pictures a run gets, drawn with :mod:`jaxnets.plots` and written as PNGs.

Every run: loss and accuracy per epoch (``curves.png``). Then by dataset: the spiral's
decision regions (``decision_regions.png``), the cubic regression's fit or ensemble band
(``regression.png``), or a grid of test images with their predictions (``predictions.png``).
``predict`` maps a framework to its models' prediction functions (one per ensemble member),
each taking raw examples as a :class:`~jaxnets.data.Dataset` holds them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxnets import plots
from jaxnets.data import Dataset

Predict = Callable[[np.ndarray], np.ndarray]
GRID_IMAGES = 32


def labels_from_outputs(outputs: np.ndarray, metric: str) -> np.ndarray:
    """Class predictions: the argmax of logits, or the rounded value of a regressed digit."""
    if metric == "rounded_accuracy":
        return np.rint(np.asarray(outputs).reshape(len(outputs))).astype(np.int64)
    return np.asarray(outputs).argmax(axis=-1)


def regression_grid(dataset: Dataset, points: int = 200) -> np.ndarray:
    """Evenly spaced inputs over twice the data's range (to show how each model extrapolates),
    (points, 1) float32."""
    x = np.concatenate([dataset.train_x, dataset.test_x]).reshape(-1)
    centre, half = (x.max() + x.min()) / 2, x.max() - x.min()
    return np.linspace(centre - half, centre + half, points, dtype=np.float32)[:, None]


def run_figures(out: Path, cfg: dict[str, Any], dataset: Dataset,
                epochs: dict[str, list[dict[str, Any]]], predict: dict[str, list[Predict]]
                ) -> list[Path]:
    """Draw and save a run's pictures into ``out``; returns their paths."""
    name = cfg["name"]
    paths = [plots.save_figure(plots.curves_figure(epochs, f"{name}: loss and accuracy"),
                               out / "curves.png")]
    if dataset.name == "spiral":
        fig = plots.decision_regions_figure(
            dataset.test_x, dataset.test_y, {fw: fns[0] for fw, fns in predict.items()},
            f"{name}: decision regions over the test points")
        paths.append(plots.save_figure(fig, out / "decision_regions.png"))
    elif dataset.name == "cubic":
        grid = regression_grid(dataset)
        fig = plots.regression_figure(
            dataset.train_x, dataset.train_y, grid,
            {fw: np.stack([f(grid) for f in fns]) for fw, fns in predict.items()},
            f"{name}: fit to the training data")
        paths.append(plots.save_figure(fig, out / "regression.png"))
    elif dataset.name in plots.CLASS_NAMES and cfg["train"]["metric"] != "none":
        images, labels = dataset.test_x[:GRID_IMAGES], dataset.test_y[:GRID_IMAGES]
        fig = plots.prediction_grid_figure(
            images, labels,
            {fw: labels_from_outputs(fns[0](images), cfg["train"]["metric"])
             for fw, fns in predict.items()},
            plots.CLASS_NAMES[dataset.name], f"{name}: first {len(images)} test images")
        paths.append(plots.save_figure(fig, out / "predictions.png"))
    return paths


def ensemble_bands(out: Path, reports: dict[str, dict[str, Any]], dataset: Dataset
                   ) -> Path:
    """The ReLU vs Tanh ensembles as mean +- std bands: ``reports`` maps a label to a compare
    report holding ``regression_grid`` (written by ``jaxnets compare`` for the cubic data)."""
    panels, grid = {}, None
    for label, report in reports.items():
        saved = report["regression_grid"]
        grid = np.asarray(saved["x"], np.float32)
        panels[label] = {fw: np.asarray(saved[fw], np.float32) for fw in ("jax", "torch")}
    fig = plots.ensembles_figure(dataset.train_x, dataset.train_y, grid, panels,
                                 "ensembles of 10 models: " + " vs ".join(reports))
    return plots.save_figure(fig, out / "ensembles.png")
