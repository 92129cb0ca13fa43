"""``jaxnets predict``: a trained model (either framework) labels images from IDX files or PNGs.

The run directory is one ``jaxnets train`` or ``compare`` wrote (its ``report.json`` holds the
config), or a checkpoint. Weights are read only from safetensors files, or from a ``.pt`` file
through ``torch.load(weights_only=True)``; nothing in a weights file is ever executed.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxnets import checkpoint
from jaxnets.config import config_from_dict
from jaxnets.convert import (
    flax_to_torch,
    read_safetensors,
    read_torch_file,
    torch_to_flax,
    weights_framework,
)
from jaxnets.data import IMAGE_DATASETS, Dataset, load_idx_pair, read_idx_images
from jaxnets.errors import ConfigError, DataError
from jaxnets.figures import labels_from_outputs
from jaxnets.plots import CLASS_NAMES

IMAGE_SIZE = (28, 28)


def run_config(run_dir: Path) -> dict[str, Any]:
    """The config a run directory (``report.json``) or checkpoint (``meta.json``) was trained
    with."""
    for meta in (run_dir / "report.json", run_dir / "meta.json"):
        if meta.is_file():
            try:
                raw = json.loads(meta.read_text(encoding="utf-8"))["config"]
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{meta}: no readable config in it ({exc})") from None
            return config_from_dict(raw, origin=str(meta))
    if (run_dir / "checkpoints" / "latest").is_file():
        return run_config(checkpoint.find(run_dir))
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    raise ConfigError(f"{run_dir}: not a run directory (no report.json, meta.json or "
                      f"checkpoints/); give the --out directory of `jaxnets train` or `compare`")


def weights_layout(arrays: dict[str, np.ndarray]) -> str:
    """A guess from the names, for a weights file that does not record its framework:
    "jax" (``*.kernel``) or "torch" (``*.weight``). Normalisation layers defeat it."""
    if any(k.endswith(".kernel") for k in arrays):
        return "jax"
    if any(k.endswith(".weight") for k in arrays):
        return "torch"
    raise ConfigError("the weights record no framework and hold neither PyTorch (.weight) nor "
                      "Flax (.kernel) names")


def find_weights(run_dir: Path, framework: str | None, weights: str | None
                 ) -> tuple[dict[str, np.ndarray], str, str]:
    """``(arrays, layout, note)``: the weights to use (``framework``'s own where the run has
    both), the framework whose names and layouts they are in, as the file or the run records
    it, and a note where nothing recorded it."""
    if weights is not None:
        if os.path.splitext(weights)[1].lower() in (".pt", ".pth"):
            return read_torch_file(weights), "torch", ""  # torch.save's format: PyTorch's
        arrays = read_safetensors(weights)
        recorded = weights_framework(weights)
        if recorded:
            return arrays, recorded, ""
        guess = weights_layout(arrays)
        return arrays, guess, (f"{weights} does not record which framework wrote it; taken as "
                               f"{guess} from its parameter names")
    for fw in ((framework,) if framework else ("jax", "torch")):
        path = run_dir / f"weights_{fw}.safetensors"
        if path.is_file():  # a run before the record: the file's name says whose it is
            return read_safetensors(path), weights_framework(path) or fw, ""
    if (run_dir / "meta.json").is_file() or (run_dir / "checkpoints").is_dir():
        saved = checkpoint.load(run_dir)
        return saved.weights, saved.meta["framework"], ""
    raise ConfigError(f"{run_dir}: no weights_jax.safetensors, weights_torch.safetensors or "
                      f"checkpoint; pass --weights FILE")


def _png(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    if pixels.shape != IMAGE_SIZE:
        raise DataError(f"{path}: the image is {pixels.shape[1]}x{pixels.shape[0]} pixels; the "
                        f"model takes {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} grey images")
    return pixels


def _labels_beside(images_path: Path) -> Path | None:
    """The labels file lying beside an IDX image file, if there is one
    (``t10k-images-idx3-ubyte.gz`` -> ``t10k-labels-idx1-ubyte.gz``)."""
    name = images_path.name.replace("images-idx3", "labels-idx1")
    candidate = images_path.with_name(name)
    return candidate if name != images_path.name and candidate.is_file() else None


def read_images(source: str | os.PathLike, limit: int = 0
                ) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """``(images uint8 (N, 28, 28), names, labels or None)`` from an IDX file, a PNG or a
    directory of PNGs."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise DataError(f"{path}: no .png images in this directory")
        files = files[:limit] if limit else files
        return np.stack([_png(p) for p in files]), [p.name for p in files], None
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() == ".png":
        return _png(path)[None], [path.name], None
    labels_path = _labels_beside(path)
    if labels_path is None:
        images, labels = read_idx_images(path), None
    else:  # the pair's checks: counts agree, labels are bytes in 0-9
        images, labels = load_idx_pair(path, labels_path)
    n = min(limit, len(images)) if limit else len(images)
    return (images[:n], [f"{path.name}[{i}]" for i in range(n)],
            None if labels is None else labels[:n])


def make_trainer(cfg: dict[str, Any], framework: str, arrays: dict[str, np.ndarray],
                 layout: str, images: np.ndarray):
    """A trainer of ``framework`` holding ``arrays``, which are in ``layout``'s names and
    layouts (converted when that is the other framework)."""
    tiny = Dataset("predict", "images to label", images[:1], np.zeros(1, np.int64), images,
                   np.zeros(len(images), np.int64))
    if framework == "torch":
        from torchref.train import Trainer
    else:
        from jaxnets.train import Trainer
    trainer = Trainer(cfg, tiny)
    if layout != framework:
        arrays = torch_to_flax(arrays) if framework == "jax" else flax_to_torch(arrays)
    trainer.load_weights(arrays)
    return trainer


def predict(run_dir: str | os.PathLike, images_source: str | os.PathLike, limit: int = 0,
            framework: str | None = None, weights: str | None = None,
            out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Label the images; write ``predictions.csv`` (into ``out`` or the run directory)."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if cfg["data"]["dataset"] not in IMAGE_DATASETS:
        raise ConfigError(f"{run_dir}: this model was trained on {cfg['data']['dataset']!r} "
                          f"data, not images; predict labels images")
    arrays, layout, note = find_weights(run_dir, framework, weights)
    framework = framework or layout
    images, names, labels = read_images(images_source, limit)
    trainer = make_trainer(cfg, framework, arrays, layout, images)
    outputs = trainer.predict(images)
    metric = cfg["train"]["metric"]
    predicted = labels_from_outputs(outputs, metric)
    classes = CLASS_NAMES.get(cfg["data"]["dataset"], tuple(map(str, range(10))))
    if metric == "accuracy":
        shifted = np.exp(outputs - outputs.max(axis=-1, keepdims=True))
        confidence = (shifted / shifted.sum(axis=-1, keepdims=True)).max(axis=-1)
    else:
        confidence = np.full(len(outputs), np.nan)
    rows = [{"image": n, "predicted": int(p),
             "class": classes[p] if 0 <= p < len(classes) else "?",
             "confidence": round(float(c), 6), "true": None if labels is None else int(t)}
            for n, p, c, t in zip(names, predicted, confidence,
                                  labels if labels is not None else [None] * len(names),
                                  strict=True)]
    target = Path(out) if out else run_dir / "predictions.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    accuracy = None if labels is None else float(np.mean(predicted == labels))
    return {"framework": framework, "rows": rows, "accuracy": accuracy, "csv": str(target),
            "note": note}
