"""Each weights file records which framework's names and layouts it holds, and `predict` reads
that record instead of guessing from parameter names (a guess normalisation layers defeat)."""

from __future__ import annotations

import numpy as np
import pytest

import jaxnets.predict
from conftest import FASHION_DIR
from jaxnets.config import load_config
from jaxnets.convert import read_safetensors, weights_framework, write_safetensors
from jaxnets.data import load_dataset
from jaxnets.predict import predict
from jaxnets.runner import fit
from jaxnets.train import Trainer as JaxTrainer
from torchref.train import Trainer as TorchTrainer

T10K = FASHION_DIR / "t10k-images-idx3-ubyte.gz"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One short training run per framework: {framework: run directory}."""
    if not FASHION_DIR.is_dir():
        pytest.skip("real Fashion-MNIST is missing")
    cfg = load_config("mlp_fashion", ["data.train_limit=200", "train.epochs=1"])
    dataset = load_dataset(cfg["data"]).head(200, 200)
    dirs = {}
    for Trainer in (JaxTrainer, TorchTrainer):
        out = tmp_path_factory.mktemp(Trainer.framework)
        fit(Trainer(cfg, dataset), cfg, out, progress=False, echo=lambda _line: None)
        dirs[Trainer.framework] = out
    return dirs


@pytest.fixture
def no_name_guess(monkeypatch):
    def refuse(arrays):
        raise AssertionError("predict guessed the framework from parameter names")

    monkeypatch.setattr(jaxnets.predict, "weights_layout", refuse)


def test_each_run_records_the_framework_of_its_weights(runs):
    for framework, run_dir in runs.items():
        assert weights_framework(run_dir / f"weights_{framework}.safetensors") == framework


@pytest.mark.parametrize("trained", ["jax", "torch"])
@pytest.mark.parametrize("runs_in", ["jax", "torch"])
def test_predict_reads_the_record_not_the_names(runs, trained, runs_in, no_name_guess,
                                                tmp_path):
    result = predict(runs[trained], T10K, limit=50, framework=runs_in,
                     out=tmp_path / "p.csv")
    assert result["framework"] == runs_in and len(result["rows"]) == 50
    assert result["note"] == ""


def test_older_files_without_the_record(runs, tmp_path):
    """A run from before the record: its file's name (weights_jax.safetensors, written by
    jaxnets) says whose it is. A loose file without the record: the old guess from the names,
    said in a note."""
    old_run = tmp_path / "old"
    old_run.mkdir()
    arrays = read_safetensors(runs["jax"] / "weights_jax.safetensors")
    (old_run / "report.json").write_text((runs["jax"] / "report.json").read_text())
    write_safetensors(arrays, old_run / "weights_jax.safetensors")  # no record
    assert weights_framework(old_run / "weights_jax.safetensors") is None
    reference = predict(runs["jax"], T10K, limit=50, out=tmp_path / "a.csv")
    from_old = predict(old_run, T10K, limit=50, out=tmp_path / "b.csv")
    assert from_old["note"] == "" and from_old["framework"] == "jax"
    assert from_old["rows"] == reference["rows"]
    loose = tmp_path / "loose.safetensors"
    write_safetensors(arrays, loose)
    guessed = predict(runs["torch"], T10K, limit=50, weights=str(loose),
                      out=tmp_path / "c.csv")
    assert "does not record which framework wrote it; taken as jax" in guessed["note"]
    assert np.mean([a["predicted"] == b["predicted"] for a, b in
                    zip(guessed["rows"], reference["rows"], strict=True)]) == 1.0
