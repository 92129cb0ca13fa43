"""The command line, run as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli

REPORT_EPOCH_KEYS = {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"}


def test_list():
    result = run_cli("list")
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert "mlp_mnist" in names and "mlp_fashion" in names


def test_short_compare_writes_a_complete_report(fashion, tmp_path):
    out = tmp_path / "D"
    result = run_cli("compare", "mlp_fashion", "--epochs", "1", "--train-limit", "2000",
                     "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "final test accuracy" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["name"] == "mlp_fashion"
    assert report["config"]["data"]["train_limit"] == 2000 and report["num_train"] == 2000
    assert report["dataset"] == "fashion_mnist"
    assert len(report["epochs"]) == 1
    for side in ("jax", "torch"):
        assert set(report["epochs"][0][side]) >= REPORT_EPOCH_KEYS
    assert report["initial_weights_max_abs_diff"] == 0.0
    first = report["first_step_loss"]
    assert abs(first["jax"] - first["torch"]) <= 1e-6
    assert set(report["final"]) >= {"jax_test_accuracy", "torch_test_accuracy",
                                    "accuracy_diff_pp"}
    assert abs(report["final"]["accuracy_diff_pp"]) < 2.0
    assert (out / "report.md").read_text().startswith("# jaxnets compare: mlp_fashion")
    assert sorted(Path(p).name for p in report["figures"]) == ["curves.png", "predictions.png"]
    assert all(Path(p).stat().st_size > 0 for p in report["figures"])
    for framework in ("jax", "torch"):  # the trained models, for `jaxnets predict`
        assert (out / f"weights_{framework}.safetensors").exists()
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["seed"]) for r in log] == [(1, 0)]
    assert log[0]["jax"] == report["epochs"][0]["jax"]


def test_train_each_framework(fashion, tmp_path):
    for framework in ("jax", "torch"):
        out = tmp_path / framework
        result = run_cli("train", "mlp_fashion", "--framework", framework, "--epochs", "1",
                         "--train-limit", "500", "--out", str(out), "--quiet")
        assert result.returncode == 0, result.stderr
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["framework"] == framework
        assert (out / f"weights_{framework}.safetensors").stat().st_size > 669706 * 4


def test_usage_errors_are_one_line():
    for args, needle in ((("train", "mlp_fashion", "--epochs", "x"),
                          "error: train: argument --epochs: invalid int value: 'x'"),
                         (("nosuch",), "invalid choice: 'nosuch'"),
                         (("predict", "somewhere"), "the following arguments are required: "
                                                    "--images")):
        result = run_cli(*args)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jaxnets: error: ") and needle in lines[0]


def test_unwritable_output_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_cli("train", "spiral_linear", "--epochs", "1", "--out", str(blocker / "run"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"jaxnets: error: {blocker / 'run'}")
    assert "Traceback" not in result.stderr


def test_data_dir_error_is_one_line(tmp_path):
    result = run_cli("train", "mlp_fashion", "--data-dir", str(tmp_path / "none"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"jaxnets: error: data directory {tmp_path / 'none'} does not exist"]
