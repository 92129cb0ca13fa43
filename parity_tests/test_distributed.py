"""Data parallel, N devices proven equal to one: JAX's SPMD on 2 host devices (one process,
in a subprocess: the device count is fixed when JAX starts) and PyTorch DDP with gloo on 2
processes (torchrun's environment contract). Every subprocess has a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from parity_tests.conftest import FASHION_DIR, REPO

pytestmark = pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="needs real Fashion-MNIST")

# float64: 100 steps on 2 devices against 1 differ by ~4e-16 in the weights (measured; the
# gradient all-reduce sums in another order); the bound 1e-10 leaves room for more
# steps and other machines. float32, one step: ~4e-9 measured, bound 1e-6.
FLOAT64_BOUND, FLOAT32_BOUND = 1e-10, 1e-6


@pytest.fixture(scope="module")
def jax_two_devices():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "parity_tests" / "distributed_jax.py"),
                           "2"], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=420)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_one_device_mesh_equals_plain_jit_bit_for_bit(jax_two_devices):
    diff = jax_two_devices["mesh1_vs_plain"]
    assert diff["step_loss"] == diff["weights"] == diff["final_loss"] == 0.0, diff


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_jax_two_devices_equal_one_float64_100_steps(jax_two_devices, model):
    # 201 examples in batches of 2: 100 full steps, and a last batch of one example that
    # only one of the two devices holds (odd-sized last batch: the one-device result)
    diff = jax_two_devices[f"{model}_float64"]
    assert diff["steps"] == 101
    assert max(diff["step_loss"], diff["weights"], diff["final_loss"]) <= FLOAT64_BOUND, diff


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_jax_two_devices_equal_one_float32_one_step(jax_two_devices, model):
    diff = jax_two_devices[f"{model}_float32"]
    assert diff["steps"] == 1
    assert max(diff["step_loss"], diff["weights"], diff["final_loss"]) <= FLOAT32_BOUND, diff
