"""`jaxnets predict` on real Fashion-MNIST, and untrusted weight files that must never run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import FASHION_DIR, REPO, run_cli
from jaxnets.predict import predict

T10K = FASHION_DIR / "t10k-images-idx3-ubyte.gz"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A LeNet trained briefly on Fashion-MNIST with `jaxnets train` (JAX)."""
    if not FASHION_DIR.is_dir():
        pytest.skip("real Fashion-MNIST is missing")
    out = tmp_path_factory.mktemp("lenet")
    result = run_cli("train", "lenet_mnist", "--dataset", "fashion_mnist", "--epochs", "1",
                     "--train-limit", "3000", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_matches_evaluate(fashion, run_dir, tmp_path):
    """Every one of the 10,000 test images, labelled by `predict`, gives exactly the accuracy
    the training run's `evaluate` reported."""
    report = json.loads((run_dir / "report.json").read_text())
    out = tmp_path / "p.csv"
    result = run_cli("predict", str(run_dir), "--images", str(T10K), "--out", str(out),
                     "--show", "3")
    assert result.returncode == 0, result.stderr
    rows = read_csv(out)
    assert len(rows) == 10000
    assert [int(r["true"]) for r in rows] == fashion.test_y.tolist()
    accuracy = np.mean([r["predicted"] == r["true"] for r in rows])
    assert accuracy == report["final"]["test_accuracy"]
    assert f"accuracy {100 * accuracy:.2f} %" in result.stdout
    assert "by the jax model" in result.stdout


def test_predict_in_the_other_framework(fashion, run_dir):
    """JAX-trained weights run in PyTorch (converted on the fly) label the images alike."""
    jax_rows = predict(run_dir, T10K, limit=500, framework="jax",
                       out=run_dir / "jax.csv")["rows"]
    torch_result = predict(run_dir, T10K, limit=500, framework="torch",
                           out=run_dir / "torch.csv")
    assert torch_result["framework"] == "torch" and len(torch_result["rows"]) == 500
    same = np.mean([a["predicted"] == b["predicted"]
                    for a, b in zip(jax_rows, torch_result["rows"], strict=True)])
    assert same >= 0.998  # float32 rounding may flip a near-tie, nothing more


def test_predict_png_directory(fashion, run_dir, tmp_path):
    from PIL import Image

    for i in range(6):
        Image.fromarray(fashion.test_x[i]).save(tmp_path / f"img{i}.png")
    from_png = predict(run_dir, tmp_path, out=tmp_path / "png.csv")
    from_idx = predict(run_dir, T10K, limit=6, out=tmp_path / "idx.csv")
    assert [r["image"] for r in from_png["rows"]] == [f"img{i}.png" for i in range(6)]
    assert [r["predicted"] for r in from_png["rows"]] == [r["predicted"]
                                                          for r in from_idx["rows"]]
    assert from_png["accuracy"] is None and from_idx["accuracy"] is not None


def test_predict_bad_images_are_one_line(run_dir, tmp_path):
    from PIL import Image

    Image.new("L", (32, 30)).save(tmp_path / "big.png")
    (tmp_path / "text.png").write_text("not an image")
    for target, needle in ((tmp_path / "big.png", "the image is 32x30 pixels"),
                           (tmp_path / "text.png", "not a readable image"),
                           (tmp_path / "none", "file not found")):
        result = run_cli("predict", str(run_dir), "--images", str(target))
        assert result.returncode == 1, result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], lines
    result = run_cli("predict", str(tmp_path), "--images", str(T10K))
    assert result.returncode == 2 and "not a run directory" in result.stderr


EVIL = """
import sys, torch

class Payload:
    def __reduce__(self):
        return (open, (sys.argv[2], "w"))  # loading this creates the marker file

torch.save({"conv1.weight": torch.zeros(6, 1, 3, 3), "extra": Payload()}, sys.argv[1])
"""


@pytest.fixture
def malicious_pt(tmp_path):
    """A .pt file whose unpickling creates ``marker``; shown to work when loaded unsafely."""
    path, marker = tmp_path / "evil.pt", tmp_path / "marker"
    subprocess.run([sys.executable, "-c", EVIL, str(path), str(marker)], check=True, cwd=REPO)
    assert path.exists() and not marker.exists()
    subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], "
                    "weights_only=False)", str(path)], cwd=REPO, check=True)
    assert marker.exists()  # an unsafe load runs the payload: the file really is malicious
    marker.unlink()
    return path, marker


def test_convert_refuses_a_malicious_pickle(malicious_pt, tmp_path):
    path, marker = malicious_pt
    result = run_cli("convert", "--from", "torch", "--to", "jax", str(path),
                     str(tmp_path / "out.safetensors"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"jaxnets: error: {path}: refused: it holds "
                                                   f"a pickled reference to io.open")
    assert "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_predict_refuses_a_malicious_pickle(malicious_pt, run_dir):
    path, marker = malicious_pt
    result = run_cli("predict", str(run_dir), "--images", str(T10K), "--limit", "5",
                     "--weights", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "refused" in lines[0]
    assert not marker.exists()


def test_a_pickle_named_safetensors_is_refused(malicious_pt, run_dir, tmp_path):
    path, marker = malicious_pt
    disguised = tmp_path / "weights.safetensors"
    disguised.write_bytes(path.read_bytes())
    for args in (("convert", "--from", "torch", "--to", "jax", str(disguised),
                  str(tmp_path / "o.safetensors")),
                 ("predict", str(run_dir), "--images", str(T10K), "--weights", str(disguised))):
        result = run_cli(*args)
        assert result.returncode == 1
        assert "not a readable safetensors file" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()
