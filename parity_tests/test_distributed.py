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
def jax_two_devices(tmp_path_factory):
    """The figures, and in "mlp_reference" the MLP's float64 run on 2 devices (an .npz)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reference = tmp_path_factory.mktemp("jax") / "mlp_two_devices.npz"
    done = subprocess.run([sys.executable, str(REPO / "parity_tests" / "distributed_jax.py"),
                           "2", str(reference)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=420)
    assert done.returncode == 0, done.stderr[-2000:]
    print(done.stdout.strip().splitlines()[-1])  # the figures, shown with pytest -s
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "mlp_reference": reference}


def test_one_device_mesh_equals_plain_jit_bit_for_bit(jax_two_devices):
    diff = jax_two_devices["mesh1_vs_plain"]
    assert diff["step_loss"] == diff["weights"] == diff["final_loss"] == 0.0, diff


@pytest.mark.parametrize("model", ["mlp", "cnn", "bn"])
def test_jax_two_devices_equal_one_float64_100_steps(jax_two_devices, model):
    # 201 examples in batches of 2: 100 full steps, and a last batch of one example that
    # only one of the two devices holds (odd-sized last batch: the one-device result)
    diff = jax_two_devices[f"{model}_float64"]
    assert diff["steps"] == 101  # bn: 100 steps of 4, then 3
    assert max(diff["step_loss"], diff["weights"], diff["final_loss"]) <= FLOAT64_BOUND, diff


@pytest.mark.parametrize("model", ["mlp", "cnn", "bn"])
def test_jax_two_devices_equal_one_float32_one_step(jax_two_devices, model):
    diff = jax_two_devices[f"{model}_float32"]
    assert diff["steps"] == 1
    assert max(diff["step_loss"], diff["weights"], diff["final_loss"]) <= FLOAT32_BOUND, diff


@pytest.fixture(scope="module")
def torch_two_processes(tmp_path_factory):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "parity_tests" / "distributed_torch.py"),
                           str(tmp_path_factory.mktemp("ddp"))], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=420)
    assert done.returncode == 0, done.stderr[-2000:]
    print(done.stdout.strip().splitlines()[-1])  # the figures, shown with pytest -s
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["mlp", "cnn", "bn"])
def test_ddp_two_processes_equal_one_float64_100_steps(torch_two_processes, model):
    # measured: ~4e-16 (losses), ~7e-17 (weights); bn (BatchNorm and dropout, Adam): ~9e-15
    # and ~3e-14; the last batch of one example leaves rank 1 without rows
    diff = torch_two_processes[f"{model}_float64"]
    assert diff["steps"] == 101
    assert max(diff["step_loss"], diff["weights"]) <= FLOAT64_BOUND, diff


@pytest.mark.parametrize("model", ["mlp", "cnn", "bn"])
def test_ddp_two_processes_equal_one_float32_one_step(torch_two_processes, model):
    diff = torch_two_processes[f"{model}_float32"]  # measured ~1e-7 (loss), <=6e-8 (weights)
    assert diff["steps"] == 1
    assert max(diff["step_loss"], diff["weights"]) <= FLOAT32_BOUND, diff


@pytest.mark.parametrize("naive", ["per_rank_batchnorm", "per_rank_dropout"])
def test_naive_ddp_ports_of_batchnorm_and_dropout_differ_from_one_device(torch_two_processes,
                                                                         naive):
    """Each rank's own BatchNorm statistics, or its own dropout mask, is not one device's
    training (measured, 2 steps in float64: losses differ by 0.26 and 0.16); the global
    statistics (torchref.ddp_layers.global_batchnorm) and the sliced global masks of the
    same network agree to 1e-10 above (bn_float64)."""
    diff = torch_two_processes[naive]
    assert diff["steps"] == 2 and diff["step_loss"] > 1e-2, diff


@pytest.mark.parametrize("case", ["mlp_float64", "cnn_float64", "cnn_float32", "bn_float64",
                                  "per_rank_batchnorm"])
def test_ddp_ranks_hold_identical_parameters_after_every_step(torch_two_processes, case):
    assert torch_two_processes[case]["rank_param_max_diff"] == 0.0


def _workers_of(out) -> list[int]:
    """Process ids whose command line names ``out`` (the launched workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if str(out).encode() in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def test_a_killed_ddp_worker_ends_the_run_with_one_line_and_no_orphans(tmp_path):
    import threading
    import time

    from jaxnets.config import load_config
    from jaxnets.errors import TrainingError
    from torchref.ddp import launch

    cfg = load_config("mlp_fashion", ["data.train_limit=20000", "train.batch_size=2"])
    caught = []

    def run():
        try:
            launch(cfg, tmp_path, 2, timeout=120)
        except TrainingError as exc:
            caught.append(str(exc))

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 90
    while len(_workers_of(tmp_path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # let them join the process group
    os.kill(_workers_of(tmp_path)[-1], 9)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert len(caught) == 1 and "\n" not in caught[0] and "exited with code -9" in caught[0]
    assert _workers_of(tmp_path) == []


def test_a_hanging_ddp_run_stops_at_its_timeout_with_no_orphans(tmp_path):
    from jaxnets.config import load_config
    from jaxnets.errors import TrainingError
    from torchref.ddp import launch

    cfg = load_config("mlp_fashion", ["data.train_limit=20000", "train.batch_size=2"])
    with pytest.raises(TrainingError, match="passed its timeout of 5 s"):
        launch(cfg, tmp_path, 2, timeout=5)
    assert _workers_of(tmp_path) == []


def test_more_host_devices_than_a_started_jax_has_is_one_line():
    """Through JAX's public ``jax_num_cpu_devices`` option, refused once JAX has started."""
    import jax

    from jaxnets.errors import JaxnetsError
    from jaxnets.parallel import request_host_devices

    have = len(jax.devices())  # JAX started in this process
    request_host_devices(have)  # as many as it has: nothing to do
    with pytest.raises(JaxnetsError, match=f"JAX has already started with {have} device"):
        request_host_devices(have + 1)


def test_devices_below_one_and_torch_train_on_devices_are_one_line_usage_errors(capsys):
    from jaxnets.cli import main
    from parity_tests.conftest import run_cli

    # --devices 0 is refused before anything starts: in this process
    assert main(["train", "mlp_fashion", "--devices", "0"]) == 2
    assert capsys.readouterr().err == "jaxnets: error: --devices 0: give 1 or more\n"
    # asking for 2 host devices changes this process's environment: in a subprocess
    done = run_cli("train", "mlp_fashion", "--framework", "torch", "--devices", "2",
                   "--train-limit", "10")
    assert done.returncode == 2 and "torchrun --nproc-per-node 2" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_compare_on_two_devices_reports_each_framework_against_one_device(tmp_path):
    from parity_tests.conftest import run_cli

    done = run_cli("compare", "mlp_fashion", "--devices", "2", "--epochs", "1",
                   "--train-limit", "200", "--set", "model.hidden=[32]", "--quiet",
                   "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    parallel = report["parallel"]
    assert parallel["devices"] == 2 and parallel["processes"] == {"jax": 1, "torch": 2}
    assert parallel["threads_per_torch_process"] == report["numerics"]["torch"]["threads"] == 1
    # float32, 2 steps of batch 100: measured ~1e-7 (losses) and ~1e-6 (weights) against the
    # one-device run of the same framework; jax vs torch as on one device (~1e-4 after Adam)
    for key in ("jax_vs_one_device", "torch_vs_one_device"):
        assert parallel[key]["step_loss"] <= 1e-5 and parallel[key]["weights"] <= 1e-4, key
    assert parallel["jax_vs_torch"]["step_loss"] <= 1e-3
    assert "## Data parallel on 2 devices" in (tmp_path / "report.md").read_text()


def test_jax_two_processes_equal_one_process_on_two_devices(jax_two_devices, tmp_path):
    """jax.distributed on localhost: 2 processes x 1 CPU device against 1 process x 2
    devices (the fixture's run), the MLP in float64 over 101 steps (measured: bit for bit)."""
    import numpy as np

    from torchref.ddp import free_port

    script = str(REPO / "parity_tests" / "distributed_processes.py")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    coordinator = f"127.0.0.1:{free_port()}"
    _run_together([([sys.executable, script, str(tmp_path / "two.npz"), coordinator, "2",
                     str(i)], env) for i in range(2)])
    two, one = np.load(tmp_path / "two.npz"), np.load(jax_two_devices["mlp_reference"])
    assert (int(two["processes"]), int(two["devices"])) == (2, 2)
    assert len(two["step_losses"]) == 101
    assert set(two.files) - {"processes", "devices"} == set(one.files)
    for key in one.files:  # step losses and every weight
        assert np.array_equal(two[key], one[key]), key


def _run_together(commands: list[tuple[list[str], dict]], timeout: float = 240
                  ) -> list[str]:
    """Start every (command, environment) at once and wait for all; their stdouts. Any
    failure shows each one's stderr; none is left running, whatever happened."""
    workers = [subprocess.Popen(c, env=e, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for c, e in commands]
    try:
        outputs = [w.communicate(timeout=timeout) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert [w.returncode for w in workers] == [0] * len(workers), [
        err[-1500:] for _, err in outputs]
    return [out for out, _ in outputs]


def test_jaxnets_train_on_two_processes_writes_the_one_process_run(tmp_path):
    """`jaxnets train --devices 2` as 2 processes x 1 CPU device (the JAXNETS_* environment)
    and as 1 process x 2 devices, side by side: process 0 alone writes the run, and its
    weights, checkpoint (optimizer state too) and metrics equal the one process's bit for bit."""
    import numpy as np
    from safetensors.numpy import load_file

    from torchref.ddp import free_port

    train = [sys.executable, "-m", "jaxnets", "train", "mlp_fashion", "--devices", "2",
             "--train-limit", "400", "--epochs", "1", "--quiet", "--out"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    joined = {**env, "JAXNETS_COORDINATOR": f"127.0.0.1:{free_port()}",
              "JAXNETS_NUM_PROCESSES": "2"}
    scratch = tmp_path / "process1_tmp"  # process 1's TMPDIR: its scratch run directory
    scratch.mkdir()
    stdouts = _run_together(
        [([*train, str(tmp_path / "two")], {**joined, "JAXNETS_PROCESS_ID": "0"}),
         ([*train, str(tmp_path / "two")], {**joined, "JAXNETS_PROCESS_ID": "1",
                                            "TMPDIR": str(scratch)}),
         ([*train, str(tmp_path / "one")], env)])
    assert "weights:" in stdouts[0] and "weights:" not in stdouts[1]
    assert list(scratch.glob("jaxnets-process-*")) == []  # its scratch run is gone
    two, one = tmp_path / "two", tmp_path / "one"
    reports = [json.loads((d / "report.json").read_text()) for d in (two, one)]
    assert [(r["parallel"]["devices"], r["parallel"]["processes"]) for r in reports] == [
        (2, 2), (2, 1)]
    for name in ("weights_jax.safetensors", "checkpoints/epoch-0001/weights.safetensors",
                 "checkpoints/epoch-0001/optimizer.safetensors"):
        a, b = load_file(two / name), load_file(one / name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
    # every metric row (train and test loss and accuracy) the same, but its seconds
    rows = [[{k: v for k, v in row.items() if k != "seconds"} for row in r["epochs"]]
            for r in reports]
    assert rows[0] == rows[1]


def test_train_devices_not_a_multiple_of_the_processes_is_one_line(capsys):
    from jaxnets.cli import main

    # refused before JAX starts or a coordinator is reached: in this process
    assert main(["train", "mlp_fashion", "--devices", "3", "--num-processes", "2",
                 "--process-id", "0", "--coordinator", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxnets: error: --devices 3 on a CPU over 2 processes") and \
        err.count("\n") == 1, err
