"""Numerics set in one scoped place and reported as read back (jaxnets.numerics,
torchref.numerics), and `train`/`compare` on a chosen device with the same set-up as parity."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
import torch

from jaxnets.cli import main
from jaxnets.config import load_config


@pytest.fixture
def caller_settings():
    """A caller whose own settings differ from jaxnets' (TF32 allowed in PyTorch, JAX's default
    precision, x64 off); put back as found after the test."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = True
    yield
    matmul.allow_tf32, cudnn.allow_tf32 = saved


def test_jax_numerics_sets_and_restores():
    from jaxnets.numerics import jax_numerics, read_jax_numerics

    before = read_jax_numerics()
    assert before["x64"] is False and before["default_float"] == "float32"
    with jax_numerics("float64", "cpu"):
        inside = read_jax_numerics()
        assert jnp.zeros(2).dtype == jnp.float64  # x64 really on, not only reported
    assert inside["x64"] is True and inside["default_float"] == "float64"
    assert inside["matmul_precision"] == "highest" and inside["device"] == "cpu:0"
    assert read_jax_numerics() == before and jax.config.jax_default_matmul_precision is None


def test_torch_numerics_sets_and_restores(caller_settings):
    from torchref.numerics import numerics, read_numerics

    threads = torch.get_num_threads()
    with numerics("float32", "cpu", threads=1):
        inside = read_numerics()
    assert inside["torch"]["cuda_matmul_allow_tf32"] is False
    assert inside["torch"]["cudnn_allow_tf32"] is False and inside["torch"]["threads"] == 1
    after = read_numerics()["torch"]
    assert after["cuda_matmul_allow_tf32"] and after["cudnn_allow_tf32"]
    assert after["threads"] == threads


def test_parity_from_python_sets_and_reports_what_it_read_back(caller_settings, tmp_path,
                                                               monkeypatch):
    """Called as a library (no CLI), parity runs its checks with TF32 off, reports the flags
    as read back inside the run, and leaves the caller's settings as they were."""
    import torchref.parity
    from torchref.numerics import read_numerics

    seen = []  # the settings while the checks run (the checks themselves are parity's tests)
    monkeypatch.setattr(torchref.parity, "check_config",
                        lambda *args, **kwargs: seen.append(read_numerics()) or [])
    monkeypatch.setattr(torchref.parity, "load_dataset", lambda *args, **kwargs: None)
    report = torchref.parity.run_parity([load_config("regression_linear")], tmp_path, steps=2,
                                        echo=lambda _line: None)
    assert seen == [report["numerics"]]
    read = report["numerics"]
    assert read["torch"]["cuda_matmul_allow_tf32"] is False
    assert read["torch"]["cudnn_allow_tf32"] is False
    assert read["jax"]["matmul_precision"] == "highest" and read["jax"]["x64"] is False
    assert report["tf32"].startswith("off (read back")
    assert report["devices"]["torch"] == "cpu"
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_compare_records_devices_and_numerics_read_back(caller_settings, tmp_path):
    """`compare --device cpu`: both sides' data on the CPU as each framework reports it, TF32
    off in both, and how the seconds were measured."""
    code = main(["compare", "regression_linear", "--device", "cpu", "--epochs", "2",
                 "--out", str(tmp_path), "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["devices"]["torch"] == "cpu"
    assert report["devices"]["jax"] == "cpu:0"
    assert report["numerics"]["torch"]["cuda_matmul_allow_tf32"] is False
    assert report["numerics"]["jax"]["matmul_precision"] == "highest"
    assert "compilation timed apart" in report["timing"]["jax"]
    assert "devices, as each framework reports them" in (tmp_path / "report.md").read_text()
    assert torch.backends.cuda.matmul.allow_tf32  # the caller's setting is back


def test_train_records_device_read_back(tmp_path):
    for framework in ("jax", "torch"):
        out = tmp_path / framework
        assert main(["train", "regression_linear", "--framework", framework, "--device",
                     "cpu", "--epochs", "2", "--out", str(out), "--quiet"]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["device"] == {"jax": "cpu:0", "torch": "cpu"}[framework]
        assert "numerics" in report and report["timing"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
@pytest.mark.parametrize("command", ["train", "compare"])
def test_device_gpu_without_a_gpu_is_one_line(command, tmp_path, capsys):
    code = main([command, "regression_linear", "--device", "gpu", "--epochs", "1",
                 "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "sees no GPU" in lines[0], err
    assert not (tmp_path / "report.json").exists()


def test_compare_in_float64_trains_both_frameworks_in_float64(tmp_path):
    """`compare --dtype float64`: both sides' weights in float64 and agreeing as float64 does
    (measured 3.5e-18; the same run in float32 gives 1.2e-10, so the bound 1e-12 tells them
    apart); x64 mode is off again afterwards."""
    import numpy as np
    from safetensors.numpy import load_file

    assert main(["compare", "regression_linear", "--dtype", "float64", "--epochs", "2",
                 "--out", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dtype"] == "float64"
    assert report["final"]["final_weights_max_abs_diff"] <= 1e-12
    for framework in ("jax", "torch"):
        weights = load_file(tmp_path / f"weights_{framework}.safetensors")
        assert {w.dtype for w in weights.values()} == {np.dtype(np.float64)}, framework
    assert "trained both frameworks in float64" in (tmp_path / "report.md").read_text()
    assert not jax.config.jax_enable_x64


CALLING_THREAD = """
import os, sys, threading
import jax, jax.numpy as jnp
from jaxnets.numerics import read_cpu_dispatch, set_cpu_dispatch
if sys.argv[1] != "default":
    set_cpu_dispatch(sys.argv[1])

def cpu_ticks():  # (this thread's, every thread's) CPU time in clock ticks
    me, mine, total = threading.get_native_id(), 0, 0
    for tid in os.listdir("/proc/self/task"):
        fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        total += ticks
        mine += ticks if int(tid) == me else 0
    return mine, total

# a serial loop (one thread runs it whatever the pool), tens of ms a call, over the 1,000
# FLOPs of XLA:CPU's cost estimate under which a call runs inline whatever the setting
f = jax.jit(lambda c: jax.lax.fori_loop(0, 100_000, lambda i, c: c * 0.999999 + 1e-6, c).sum())
x = jnp.ones((2000,), jnp.float32)
float(f(x))
mine0, total0 = cpu_ticks()
for _ in range(10):
    float(f(x))
mine1, total1 = cpu_ticks()
print(read_cpu_dispatch(), round((mine1 - mine0) / max(total1 - total0, 1), 2))
"""


@pytest.mark.parametrize("dispatch, expected", [("default", "async"), ("async", "async"),
                                                ("sync", "sync")])
def test_cpu_dispatch_decides_which_thread_runs_a_call(dispatch, expected):
    """JAX's default (async) runs each jitted call on a client thread while the caller waits;
    "sync" (jaxnets' CLI default, jaxnets.numerics.set_cpu_dispatch) runs it on the calling
    thread: the caller's share of the process's CPU time over ten calls of a serial loop
    (measured 0.0-0.1 async, 1.0 sync, in nine runs). Each in a fresh process: the setting
    belongs to JAX's CPU client."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CALLING_THREAD, dispatch],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    reported, caller_share = done.stdout.split("\n")[-2].split()
    assert reported == expected
    assert float(caller_share) > 0.7 if expected == "sync" else float(caller_share) < 0.3


def test_cpu_dispatch_after_jax_started_is_one_line_or_kept():
    from jaxnets.errors import JaxnetsError
    from jaxnets.numerics import read_cpu_dispatch, set_cpu_dispatch

    jnp.zeros(()).block_until_ready()  # JAX's backends have started
    now = read_cpu_dispatch()
    other = "sync" if now == "async" else "async"
    with pytest.raises(JaxnetsError, match="already started"):
        set_cpu_dispatch(other)
    assert set_cpu_dispatch(other, strict=False) == now == read_cpu_dispatch()
    assert set_cpu_dispatch(now) == now
    with pytest.raises(JaxnetsError, match="choose one of async, sync"):
        set_cpu_dispatch("eager")
