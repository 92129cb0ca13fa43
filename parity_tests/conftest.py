"""Shared fixtures. The tests use real Fashion-MNIST from Debian's ``dataset-fashion-mnist``
package (``.ci/run`` installs it); without it they skip locally and fail under CI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxnets.config import load_config
from jaxnets.data import DEBIAN_DIRS, load_idx_dir

FASHION_DIR = DEBIAN_DIRS["fashion_mnist"]
REPO = Path(__file__).resolve().parent.parent


def assert_allclose(actual, expected, atol: float, what: str = "") -> None:
    """max-abs comparison with an explicit tolerance (rtol 0), as Keras 3's tests do."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    assert diff <= atol, f"{what}: max-abs difference {diff:.3g} > {atol:g}"


@pytest.fixture(scope="session")
def fashion():
    if not FASHION_DIR.is_dir():
        message = (f"real Fashion-MNIST is missing: {FASHION_DIR} "
                   f"(sudo apt-get install dataset-fashion-mnist)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return load_idx_dir(FASHION_DIR, "fashion_mnist")


@pytest.fixture
def small_cfg():
    """``mlp_fashion`` on the first N images, with extra ``key=value`` overrides."""

    def make(limit: int = 200, *overrides: str):
        return load_config("mlp_fashion", [f"data.train_limit={limit}", *overrides])

    return make


def run_cli(*args: str, env: dict | None = None):
    import subprocess

    return subprocess.run([sys.executable, "-m", "jaxnets", *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=600)
