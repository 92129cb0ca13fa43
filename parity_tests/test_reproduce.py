"""`jaxnets reproduce` and the pictures `compare` draws, on the full-length spiral runs."""

from __future__ import annotations

import json

from matplotlib.image import imread

from torchref.reproduce import reproduce


def test_reproduce_spiral_linear(tmp_path):
    """The linear model cannot separate the spiral (about 0.5, as the course's 0.504), in both
    frameworks; the run writes its table, report and decision-region picture."""
    rows = reproduce(["spiral_linear"], tmp_path, progress=False)
    assert [r["experiment"] for r in rows] == ["spiral_linear"]
    row = rows[0]
    assert row["epochs"] == 1000 and row["dataset"] == "spiral" and row["note"] == ""
    for fw in ("jax", "torch"):
        assert 0.45 <= row[f"{fw}_test_accuracy"] <= 0.55
        assert row[f"{fw}_train_seconds"] > 0
    assert "0.504" in row["source_reported"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiments"] == json.loads(json.dumps(rows))
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0] == "# jaxnets reproduce"
    assert any(line.startswith("| spiral_linear | spiral | 1000 | test accuracy % | ")
               for line in table)
    report = json.loads((tmp_path / "spiral_linear" / "report.json").read_text())
    names = sorted(p.rsplit("/", 1)[-1] for p in report["figures"])
    assert names == ["curves.png", "decision_regions.png"]
    picture = imread(tmp_path / "spiral_linear" / "decision_regions.png")
    assert picture.ndim == 3 and picture.shape[1] > picture.shape[0]  # two panels side by side
    assert (tmp_path / "spiral_linear.log").read_text().count("final test accuracy") == 1

    # an interrupted run continued with resume=True keeps what was finished, runs the rest
    (tmp_path / "spiral_linear.log").unlink()
    again = reproduce(["spiral_linear"], tmp_path, progress=False, resume=True)
    assert again == json.loads(json.dumps(rows))
    assert not (tmp_path / "spiral_linear.log").exists()  # not run again
    assert json.loads((tmp_path / "results.json").read_text())["kept_from_earlier_run"] == [
        "spiral_linear"]
    assert "1 experiments, 1 of them kept from an earlier run" in (
        tmp_path / "results.md").read_text()
