"""Figures for the README and the run reports: training curves, decision regions, regression fits
and image prediction grids. Matplotlib only, through ``Figure`` objects: no pyplot, no backend."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple(str(d) for d in range(10)),
    "spiral": ("class 0", "class 1", "class 2"),
}
FRAMEWORK_COLORS = {"jax": "tab:blue", "torch": "tab:orange"}
_PALETTE = colormaps["tab10"].colors


def _color(name: str, index: int) -> str | tuple:
    """A framework's fixed colour; any other name gets the palette from green on."""
    return FRAMEWORK_COLORS.get(name, _PALETTE[(index + 2) % len(_PALETTE)])


def curves_figure(epochs: dict[str, list[dict]], title: str) -> Figure:
    """Loss (left) and accuracy in percent (right) per epoch, a train and a test line per framework.

    Test lines only have the epochs where the test values are not None. When no row holds an
    accuracy (regression), the figure has the loss axes alone. The loss axis is logarithmic when
    the largest loss is more than 100 times the smallest.
    """
    rows = [row for fw_rows in epochs.values() for row in fw_rows]
    has_acc = any(row.get(k) is not None for row in rows
                  for k in ("train_accuracy", "test_accuracy"))
    fig = Figure(figsize=(10, 4) if has_acc else (6, 4), layout="constrained")
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)[0]
    panels = [(axes[0], "loss", "loss", 1.0)]
    if has_acc:
        panels.append((axes[1], "accuracy", "accuracy (%)", 100.0))
    for i, (fw, fw_rows) in enumerate(epochs.items()):
        color = _color(fw, i)
        for ax, key, _, scale in panels:
            for split, style in (("train", {"linestyle": "-"}),
                                 ("test", {"linestyle": "--", "marker": "o", "markersize": 3})):
                points = [(r["epoch"], scale * r[f"{split}_{key}"]) for r in fw_rows
                          if r.get(f"{split}_{key}") is not None]
                if not points:
                    continue
                if "marker" in style:  # at most ~40 markers, even over 1000 epochs
                    style["markevery"] = max(1, len(points) // 40)
                ax.plot(*zip(*points, strict=True), color=color, label=f"{fw} {split}", **style)
    losses = [r[k] for r in rows for k in ("train_loss", "test_loss") if r.get(k) is not None]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 100:
        axes[0].set_yscale("log")
    for ax, name, ylabel, _ in panels:
        ax.set(title=name, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return fig


def decision_regions_figure(points: np.ndarray, labels: np.ndarray,
                            predict: dict[str, Callable[[np.ndarray], np.ndarray]], title: str,
                            resolution: int = 200) -> Figure:
    """Each framework's predicted class over the plane (one panel each), with the labelled points.

    ``predict[fw]`` maps float32 points (M, 2) to logits or probabilities (M, C); the panel title
    gives its accuracy on ``points``.
    """
    points, labels = np.asarray(points, np.float32), np.asarray(labels).astype(int)
    lo, hi = points.min(axis=0), points.max(axis=0)
    margin = 0.1 * np.maximum(hi - lo, 1e-6)
    xs, ys = (np.linspace(lo[d] - margin[d], hi[d] + margin[d], resolution) for d in (0, 1))
    xx, yy = np.meshgrid(xs, ys)
    grid = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float32)
    fig = Figure(figsize=(4.5 * len(predict) + 0.5, 4.5), layout="constrained")
    axes = fig.subplots(1, len(predict), squeeze=False)[0]
    for ax, (fw, fn) in zip(axes, predict.items(), strict=True):
        scores = np.asarray(fn(grid))
        regions = scores.argmax(axis=1).reshape(xx.shape)
        accuracy = float(np.mean(np.asarray(fn(points)).argmax(axis=1) == labels))
        classes = max(scores.shape[1], int(labels.max()) + 1)
        colors = [_PALETTE[c % len(_PALETTE)] for c in range(classes)]
        ax.contourf(xx, yy, regions, levels=np.arange(classes + 1) - 0.5, colors=colors,
                    alpha=0.3)
        ax.scatter(points[:, 0], points[:, 1], c=[colors[c] for c in labels], s=12,
                   edgecolors="0.15", linewidths=0.5)
        ax.set_title(f"{fw}: accuracy {accuracy:.1%}")
        ax.set_aspect("equal")
        ax.locator_params(nbins=5)
    fig.suptitle(title)
    return fig


def regression_figure(x: np.ndarray, y: np.ndarray, grid: np.ndarray,
                      predictions: dict[str, np.ndarray], title: str) -> Figure:
    """The data as points and each prediction over ``grid`` as a line.

    A prediction of shape (G,) or (G, 1) is one line; (members, G) or (members, G, 1) with more
    than one member is drawn as the members' mean with a mean ± std band.
    """
    return ensembles_figure(x, y, grid, {"": predictions}, title)


def ensembles_figure(x: np.ndarray, y: np.ndarray, grid: np.ndarray,
                     panels: dict[str, dict[str, np.ndarray]], title: str) -> Figure:
    """One axes per panel (e.g. "ReLU", "Tanh"), each drawn as :func:`regression_figure`
    draws its predictions; the panel's name titles its axes."""
    grid = np.asarray(grid, np.float64).ravel()
    fig = Figure(figsize=(6 * len(panels), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    for ax, (name, predictions) in zip(axes, panels.items(), strict=True):
        ax.scatter(np.ravel(x), np.ravel(y), s=10, color="0.5", label="data")
        for i, (label, pred) in enumerate(predictions.items()):
            pred = np.asarray(pred, np.float64)
            if pred.size % len(grid):
                raise ValueError(f"{label}: prediction of shape {pred.shape} does not fit a "
                                 f"grid of {len(grid)} points")
            members = pred.reshape(-1, len(grid))
            color = _color(label, i)
            if len(members) == 1:
                ax.plot(grid, members[0], color=color, label=label)
                continue
            mean, std = members.mean(axis=0), members.std(axis=0)
            ax.plot(grid, mean, color=color, label=f"{label} mean of {len(members)}")
            ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.2,
                            label=f"{label} ± std")
        ax.set(xlabel="x", ylabel="y", title=name)
        ax.legend()
    fig.suptitle(title)
    return fig


def _short(name: str, width: int = 10) -> str:
    """A class name short enough for a tile title: "T-shirt/top" -> "T-shirt"."""
    name = name.split("/")[0]
    return name if len(name) <= width else name[: width - 1] + "."


def prediction_grid_figure(images: np.ndarray, labels: np.ndarray,
                           predictions: dict[str, np.ndarray], class_names: Sequence[str],
                           title: str, columns: int = 8) -> Figure:
    """A grid of images titled with the predicted and the true class.

    A tile where any framework is wrong has a red title and a red frame, and gid ``"wrong"``
    (``"right"`` otherwise), so that tests can find it.
    """
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[..., 0] if images.shape[-1] == 1 else images[:, 0]
    labels = np.asarray(labels).astype(int)
    preds = {fw: np.asarray(p).astype(int).ravel() for fw, p in predictions.items()}
    n = len(images)
    rows = max(1, math.ceil(n / columns))
    tile = 1.3 if len(preds) == 1 else 1.7
    fig = Figure(figsize=(columns * tile, rows * 1.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    wrong_count = 0
    for i, ax in enumerate(axes):
        if i >= n:
            ax.set_visible(False)
            continue
        ax.imshow(images[i], cmap="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        wrong = any(p[i] != labels[i] for p in preds.values())
        wrong_count += wrong
        if len(preds) == 1:
            line = f"pred {_short(class_names[next(iter(preds.values()))[i]])}"
        else:
            line = " · ".join(f"{fw} {_short(class_names[p[i]])}" for fw, p in preds.items())
        ax.set_title(f"{line}\ntrue {_short(class_names[labels[i]])}", fontsize=7,
                     color="red" if wrong else "black")
        ax.set_gid("wrong" if wrong else "right")
        if wrong:
            for spine in ax.spines.values():
                spine.set_color("red")
                spine.set_linewidth(2)
    fig.suptitle(f"{title}: {wrong_count} of {n} wrong")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Save ``fig`` as a PNG at ``path`` atomically (a temporary file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a figure is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
