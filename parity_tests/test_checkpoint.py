"""Checkpoints: resume reaches an uninterrupted run's weights bit for bit, a kill never costs a
finished checkpoint, a changed file is refused, and a non-finite loss leaves the last good
checkpoint alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import REPO, run_cli
from jaxnets import checkpoint
from jaxnets.config import load_config
from jaxnets.convert import read_safetensors
from jaxnets.errors import CheckpointError, TrainingError
from jaxnets.runner import fit, train_blocks


def trainer_class(framework: str):
    if framework == "torch":
        from torchref.train import Trainer
    else:
        from jaxnets.train import Trainer
    return Trainer


def quiet(_line: str) -> None:
    pass


def assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k} differs"


def test_train_blocks_have_absolute_boundaries():
    assert train_blocks(5, 1) == [range(i, i + 1) for i in range(5)]
    assert train_blocks(10, 4, 3) == [range(0, 3), range(3, 4), range(4, 6), range(6, 8),
                                      range(8, 9), range(9, 10)]
    # resumed at epoch 6: the same blocks as the uninterrupted run from there on
    assert train_blocks(10, 4, 3, start=6) == train_blocks(10, 4, 3)[3:]


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("config", ["mlp_fashion", "convnet_mnist", "vgg_bn_fashion"])
def test_resume_is_bit_exact(fashion, tmp_path, framework, config):
    """Train 1 epoch and stop; later resume to 3: the weights, optimizer state and per-step
    losses equal those of a 3-epoch run without a stop (vgg_bn_fashion: BatchNorm's running
    statistics and dropout's draw counters too)."""
    overrides = ["data.train_limit=500", 'data.dataset="fashion_mnist"', "train.epochs=3"]
    cfg = load_config(config, overrides)
    data = fashion.head(500, 200)
    Trainer = trainer_class(framework)

    whole = Trainer(cfg, data)
    full = fit(whole, cfg, tmp_path / "whole", progress=False, echo=quiet, save_every=1)

    first_cfg = {**cfg, "train": {**cfg["train"], "epochs": 1}}
    fit(Trainer(first_cfg, data), first_cfg, tmp_path / "split", progress=False, echo=quiet,
        save_every=1)
    saved = checkpoint.load(tmp_path / "split")
    assert saved.epoch == 1 and saved.meta["framework"] == framework
    resumed = Trainer(cfg, data)
    again = fit(resumed, cfg, tmp_path / "split", progress=False, echo=quiet, save_every=1,
                resume=saved)

    assert_same_weights(whole.weights(), resumed.weights())
    assert_same_weights(whole.optimizer_arrays(), resumed.optimizer_arrays())
    losses = [[r["train_loss"] for r in run["epochs"]] for run in (full, again)]
    assert losses[0] == losses[1]
    log = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert checkpoint.load(tmp_path / "split").epoch == 3


def _wait_for(path, proc, seconds=300.0):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_killed_training_resumes_to_the_uninterrupted_weights(fashion, tmp_path):
    """SIGKILL a `jaxnets train` after its first checkpoint, `--resume` it, and compare with
    a run that was never interrupted."""
    args = ["train", "mlp_fashion", "--train-limit", "10000", "--epochs", "8", "--save-every",
            "1", "--quiet"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "jaxnets", *args, "--out", str(killed)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for(killed / "checkpoints" / "latest", proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stopped_at = checkpoint.load(killed).epoch
    assert stopped_at < 8, "the run finished before it was killed"

    result = run_cli("train", "--resume", str(killed), "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"resuming from {killed / 'checkpoints'}" in result.stdout

    whole = tmp_path / "whole"
    result = run_cli(*args, "--out", str(whole))
    assert result.returncode == 0, result.stderr
    assert_same_weights(read_safetensors(whole / "weights_jax.safetensors"),
                        read_safetensors(killed / "weights_jax.safetensors"))


SAVER = textwrap.dedent("""
    import sys
    import numpy as np
    from jaxnets import checkpoint

    out = sys.argv[1]
    meta = {"framework": "jax", "step": 1, "config": {}, "epochs": []}
    checkpoint.save(out, {"w": np.ones(10, np.float32)}, {}, {**meta, "epoch": 1})
    print("saved", flush=True)
    big = {"w": np.random.default_rng(0).random((32, 1024, 1024), dtype=np.float32)}
    epoch = 2
    while True:
        checkpoint.save(out, big, big, {**meta, "epoch": epoch})
        epoch += 1
""")


def test_sigkill_while_saving_keeps_the_previous_checkpoint(tmp_path):
    """Kill a process in the middle of writing a checkpoint (its temporary directory exists):
    the checkpoint ``latest`` names still loads and verifies."""
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saved", proc.stderr.read()
        root = tmp_path / "checkpoints"
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".tmp-") for p in root.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.002)
        time.sleep(0.05)  # well inside the 256 MB write
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".tmp-") for p in root.iterdir()), "killed between saves"
    survivor = checkpoint.load(tmp_path)  # verifies the checksums
    assert survivor.epoch >= 1
    assert np.array_equal(checkpoint.load(root / "epoch-0001").weights["w"], np.ones(10))


def test_changed_checkpoint_is_refused(tmp_path):
    meta = {"framework": "jax", "epoch": 3, "step": 30, "config": {}, "epochs": []}
    where = checkpoint.save(tmp_path, {"w": np.arange(6, dtype=np.float32)},
                            {"m": np.zeros(6, np.float32)}, meta)
    assert checkpoint.load(tmp_path).epoch == 3
    weights = where / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load(tmp_path)
    result = run_cli("train", "--resume", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"jaxnets: error: {weights}: checksum mismatch (the file changed or is corrupt since it "
        f"was saved); refusing to load it"]


def test_missing_checkpoint_is_one_line(tmp_path):
    result = run_cli("train", "--resume", str(tmp_path))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no checkpoint here" in result.stderr and "Traceback" not in result.stderr


def _explodes(cfg_name: str, mode: str):
    """A learning rate that overflows float32 within a few steps."""
    return load_config(cfg_name, ["train.epochs=6", "train.eval_every=1",
                                  "optimizer.learning_rate=1e30",
                                  f'train.on_nonfinite="{mode}"'])


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, framework):
    from jaxnets.data import load_dataset

    good = load_config("regression_linear", ["train.epochs=2"])
    data = load_dataset(good["data"])
    Trainer = trainer_class(framework)
    fit(Trainer(good, data), good, tmp_path, progress=False, echo=quiet, save_every=1)
    before = checkpoint.find(tmp_path)
    files = {p.name: p.read_bytes() for p in before.iterdir()}

    # resumed with a learning rate that blows up: epoch 3's loss is still finite (the weights
    # are epoch 2's), its update overflows, and epoch 4's loss is not finite
    bad = _explodes("regression_linear", "stop")
    with pytest.raises(TrainingError) as info:
        fit(Trainer(bad, data), bad, tmp_path, progress=False, echo=quiet, save_every=1,
            resume=checkpoint.load(tmp_path))
    message = str(info.value)
    assert message.startswith(f"{framework}: the loss is ")
    assert "at epoch 4, step 1" in message
    last = checkpoint.find(tmp_path)
    assert last.name == "epoch-0003"  # nothing saved from the epoch with the bad loss on
    assert f"the last checkpoint, {last}, is untouched" in message
    assert not (last.parent / "epoch-0004").exists()
    checkpoint.load(tmp_path)  # still verifies
    assert {p.name: p.read_bytes() for p in before.iterdir()} == files


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_nonfinite_steps_can_be_skipped(tmp_path, framework):
    from jaxnets.data import load_dataset

    cfg = _explodes("regression_linear", "skip")
    trainer = trainer_class(framework)(cfg, load_dataset(cfg["data"]))
    report = fit(trainer, cfg, tmp_path, progress=False, echo=quiet)
    losses = np.concatenate([[r["train_loss"]] for r in report["epochs"]])
    skipped = report["final"]["skipped_steps"]
    assert 0 < skipped < 6  # the first step is finite; every later one overflows
    assert all(np.isfinite(w).all() for w in trainer.weights().values())
    assert report["epochs"][0]["skipped_steps"] == 0 and np.isfinite(losses[0])


def test_cli_reports_a_nonfinite_loss_in_one_line(tmp_path):
    result = run_cli("train", "regression_linear", "--epochs", "3", "--set",
                     "optimizer.learning_rate=1e30", "--out", str(tmp_path), "--quiet")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxnets: error: jax: the loss is ")
    assert "no checkpoint was saved before it" in lines[0]
    assert not (tmp_path / "checkpoints").exists()
    assert os.path.exists(tmp_path / "metrics.jsonl")


def test_no_save_replaces_the_checkpoint_latest_names(tmp_path):
    """A second fresh run into the same directory moves the first run's checkpoints aside (they
    still load); resuming from an older checkpoint points ``latest`` at it before saving."""
    from jaxnets.data import load_dataset
    from jaxnets.train import Trainer

    cfg = load_config("regression_linear", ["train.epochs=3"])
    data = load_dataset(cfg["data"])
    fit(Trainer(cfg, data), cfg, tmp_path, progress=False, echo=quiet, save_every=1)
    first = checkpoint.load(tmp_path).weights

    notes = []
    fit(Trainer(cfg, data), cfg, tmp_path, progress=False, echo=notes.append, save_every=1)
    assert any("moved to checkpoints.previous-1" in n for n in notes)
    kept = checkpoint.load(tmp_path / "checkpoints.previous-1")
    assert kept.epoch == 3
    assert_same_weights(kept.weights, first)

    older = checkpoint.load(tmp_path / "checkpoints" / "epoch-0001")
    notes.clear()
    fit(Trainer(cfg, data), cfg, tmp_path, progress=False, echo=notes.append, save_every=1,
        resume=older)
    assert any("now names epoch-0001" in n for n in notes)
    again = checkpoint.load(tmp_path)
    assert again.epoch == 3
    assert_same_weights(again.weights, first)  # and the resumed run is bit-exact
