"""The benchmark's bookkeeping (what it counts, flags and writes), not its speed: tests never
time."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from bench import measure, report, timing
from jaxnets.config import load_config
from jaxnets.data import load_generated


def test_forward_flops_from_the_architecture():
    # 784-512-512-10: 2 (784*512 + 512*512 + 512*10) multiply-adds x 2
    assert measure.forward_flops(load_config("mlp_fashion")) == 2 * (784 * 512 + 512 * 512
                                                                     + 512 * 10)
    # LeNet: conv1 28*28 positions x 6*1*3*3, conv2 10*10 x 16*6*5*5, then 400-120-84-10
    lenet = [2 * 28 * 28 * 6 * 9, 2 * 10 * 10 * 16 * 150, 2 * 400 * 120, 2 * 120 * 84,
             2 * 84 * 10]
    assert measure.forward_flops(load_config("lenet_mnist")) == sum(lenet)
    # training: forward, weight gradients, and input gradients of all but the first layer
    assert measure.training_flops(load_config("lenet_mnist")) == 2 * sum(lenet) + sum(lenet[1:])


def test_bench_writes_results(tmp_path):
    cfg = load_config("spiral_relu")
    data = load_generated("spiral", cfg["data"]["seed"])
    rows = measure.bench_config(cfg, data, repeats=2, steps=5,
                                modes=("jit_step", "scan", "stream", "eager"),
                                echo=lambda _: None)
    assert {(r["mode"], r["phase"]) for r in rows} == {
        (m, p) for m in ("jit_step", "scan", "stream", "eager") for p in ("train", "infer")}
    for r in rows:
        assert r["samples_per_s"] > 0 and math.isfinite(r["gflops"]) and r["repeats"] == 2
        assert r["samples_per_s_min"] <= r["samples_per_s"] <= r["samples_per_s_max"]
        assert r["peak_rss_mb"] > 0 and r["compile_s"] >= 0
        assert r["spread"] >= 1.0 and len(r["load_before"]) == len(r["load_after"]) == 2
        assert r["competing_cores"] >= 0 and isinstance(r["unstable"], list)
    assert next(r for r in rows if r["phase"] == "train")["examples"] == 5 * 3000
    threads = timing.set_threads()
    machine = report.machine_info("cpu", {"jax_gflops": 10.0, "torch_gflops": 20.0,
                                          "matmul_peak_gflops": 20.0}, threads)
    report.write(tmp_path, machine, rows, "jaxnets bench spiral_relu")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["machine"]["matmul_peak_gflops"] == 20.0
    assert results["machine"]["torch_threads"] == threads["jax_cpu_threads"]
    assert all(r["peak_fraction"] == r["gflops"] / 20.0 for r in results["results"])
    text = (tmp_path / "results.md").read_text()
    assert "| spiral_relu | scan" in text and "XLA:CPU threads" in text
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"


def test_matmul_peak_is_the_best_size_of_either_framework(monkeypatch):
    monkeypatch.setitem(measure.MATMUL_SIZES, "cpu", (64, 256))
    peak = measure.matmul_peak(repeats=2)
    by_size = peak["matmul_gflops_by_size"]
    assert set(by_size) == {"64", "256"}
    for framework in ("jax", "torch"):
        best = max(by_size, key=lambda n: by_size[n][framework])
        assert peak[f"{framework}_matmul_size"] == int(best)
        assert peak[f"{framework}_gflops"] == by_size[best][framework] > 0
    assert peak["matmul_peak_gflops"] == max(g for f in by_size.values() for g in f.values())
    text = report.markdown(report.machine_info("cpu", peak), [], "jaxnets bench")
    assert (f"JAX {peak['jax_gflops']:.1f} at {peak['jax_matmul_size']}^3" in text
            and "the best median of 64^3, 256^3 matmuls" in text)


def test_flops_for_every_layer_type():
    # resnet_gelu_fashion by hand, one example: stem 3x3 1->8 at 28x28; block1 two 3x3 8->8
    # at 28x28, its add; block2 3x3 8->16 stride 2 and 3x3 16->16 at 7x7, the 1x1 8->16
    # projection at 7x7, its add; avg pool 2x2 to 14x14x8; GELU one per element
    cfg = load_config("resnet_gelu_fashion")
    by_name = {name: flops for name, _, flops in measure.flops_by_layer(cfg)}
    assert by_name["stem"] == 2 * 9 * 1 * 8 * 28 * 28
    assert by_name["block1"] == 2 * (2 * 9 * 8 * 8 * 28 * 28) + 8 * 28 * 28 + 8 * 28 * 28
    assert by_name["block2"] == (2 * 9 * 8 * 16 * 49 + 16 * 49 + 2 * 9 * 16 * 16 * 49
                                 + 16 * 49 + 2 * 8 * 16 * 49)
    assert by_name["avgpool_4"] == 4 * 8 * 14 * 14 and by_name["gelu_1"] == 8 * 28 * 28
    assert by_name["global_avgpool_7"] == 16 * 49 and by_name["norm"] == 5 * 16
    assert by_name["fc"] == 2 * 16 * 10
    assert measure.layer_flops(cfg) == [by_name["stem"], 2 * 9 * 8 * 8 * 784,
                                        2 * 9 * 8 * 8 * 784, 2 * 9 * 8 * 16 * 49,
                                        2 * 9 * 16 * 16 * 49, 2 * 8 * 16 * 49, by_name["fc"]]
    kinds = {kind for _, kind, _ in measure.flops_by_layer(load_config("vgg_bn_fashion"))}
    assert {"batchnorm", "dropout", "maxpool", "conv2d", "linear"} <= kinds


def _row(mode, per_s, unstable=()):
    return {"config": "c", "framework": "jax" if mode in measure.JAX_MODES else "torch",
            "mode": mode, "phase": "train", "samples_per_s": per_s, "samples_per_s_min": per_s,
            "samples_per_s_max": per_s, "gflops": 1.0, "peak_fraction": 0.1, "spread": 1.0,
            "competing_cores": 0.0, "compile_s": 0.0, "peak_rss_mb": 1.0,
            "unstable": list(unstable)}


def test_unstable_modes_are_left_out_of_the_ratios():
    rows = [_row("scan", 300.0), _row("jit_step", 900.0, ["spread 2.00 > 1.3"]),
            _row("eager", 100.0), _row("compile", 50.0, ["other processes used 1.0 cores"])]
    assert report.best_jax(rows, "c", "train")["mode"] == "scan"  # jit_step is unstable
    table = "\n".join(report._ratio_table(rows, ["c"], "train"))
    # best JAX (scan) / eager = 3.00x; / compile left out; jit_step / eager left out
    assert "| c | scan | 3.00x | - | 3.00x | - | - |" in table
    machine = {"platform": "p", "cpu_count": 2, "torch_threads": 2, "jax_devices": ["cpu"],
               "versions": {}, "matmul_peak_gflops": 1.0, "jax_gflops": 1.0,
               "torch_gflops": 1.0, "matmul_peak_unstable": ["spread 1.50 > 1.3"]}
    text = report.markdown(machine, rows, "cmd")
    assert "| c | jit_step (!) |" in text and "- c compile train: other processes" in text
    assert "PyTorch 1.0; the best median of 2048^3 matmuls), unstable: spread 1.50 > 1.3." in text


def test_a_competing_process_flags_the_measurement():
    """A busy process on one core while the modes run: every mode is flagged unstable, with
    the other processes' CPU use as the reason (no speed is asserted)."""
    cfg = load_config("spiral_relu")
    data = load_generated("spiral", cfg["data"]["seed"])
    busy = subprocess.Popen(  # spins for at most 120 s even if never killed
        [sys.executable, "-c", "import time\nend = time.time() + 120\nwhile time.time() < end: "
         "pass"])
    messages = []
    try:
        rows = measure.bench_config(cfg, data, repeats=2, steps=40, modes=("scan", "eager"),
                                    echo=messages.append)
    finally:
        busy.kill()
        busy.wait(timeout=30)
    assert len(rows) == 4
    for r in rows:
        assert r["competing_cores"] > timing.COMPETING_LIMIT, r
        assert any("other processes used" in reason for reason in r["unstable"]), r
    assert sum("unstable" in m and "left out of the ratios" in m for m in messages) == 4


def test_compile_mode_compiles_every_config_afresh(monkeypatch):
    """Every config's torch model runs the same ``forward``, and dynamo stops compiling a code
    object after ``recompile_limit`` recompilations: a full bench run hit it at the seventh
    config and measured "compile" eagerly from there on. ``bench_config`` resets dynamo per
    config (its torch host's ``reset``); with the limit lowered to what one config needs, two
    configs in a row on one host compile (frames compiled by dynamo counted in each; the host
    is this process, where the counters can be read)."""
    import torch
    from torch._dynamo.utils import counters

    from bench.hosts import Hosts

    # one config compiles 2 graphs (training and evaluation): without the reset the second
    # config compiled none at this limit, with it 2
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    compiled = []
    with Hosts(isolated=False) as hosts:
        for name in ("spiral_linear", "spiral_relu"):
            cfg = load_config(name)
            data = load_generated("spiral", cfg["data"]["seed"])
            before = counters["stats"]["unique_graphs"]
            measure.bench_config(cfg, data, repeats=1, steps=2, modes=("compile",),
                                 echo=lambda _: None, hosts=hosts)
            compiled.append(counters["stats"]["unique_graphs"] - before)
    assert all(count > 0 for count in compiled), compiled


def test_each_framework_is_timed_in_a_process_of_its_own():
    """The default hosts: a JAX worker that never loads PyTorch (whose OpenMP runtime JAX's
    oneDNN convolutions would share: bench.hosts) and a PyTorch worker, neither this
    process; a failure in a worker comes back as one line."""
    import os

    import pytest

    from bench.hosts import Hosts, WorkerError

    cfg = load_config("spiral_relu")
    data = load_generated("spiral", cfg["data"]["seed"])
    with Hosts() as hosts:
        rows = measure.bench_config(cfg, data, repeats=1, steps=2, modes=("scan", "eager"),
                                    echo=lambda _: None, hosts=hosts)
        jax_host, torch_host = hosts.for_framework("jax"), hosts.for_framework("torch")
        assert len({jax_host.pid, torch_host.pid, os.getpid()}) == 3
        assert jax_host.loaded("jaxnets.train") and not jax_host.loaded("torch")
        assert torch_host.loaded("torch")
        assert len(rows) == 4 and all(r["samples_per_s"] > 0 for r in rows)
        with pytest.raises(WorkerError, match=r"^KeyError: 'nope'$"):
            jax_host.run("nope", "train", 1)
        assert jax_host.loaded("jaxnets.train")  # the worker is still serving


def test_bench_runs_jax_with_the_cli_cpu_dispatch(tmp_path):
    """The JAX worker makes its CPU client with the coordinator's dispatch (jaxnets'
    "sync" unless --cpu-dispatch says otherwise), and the report records it."""
    from bench.hosts import Hosts

    with Hosts(dispatch="sync") as hosts:
        assert hosts.for_framework("jax").cpu_dispatch() == "sync"
    with Hosts(dispatch="async") as hosts:
        assert hosts.for_framework("jax").cpu_dispatch() == "async"
    for flag, expected in (([], "sync"), (["--cpu-dispatch", "async"], "async")):
        out = tmp_path / expected
        done = subprocess.run(
            [sys.executable, "-m", "jaxnets", *flag, "bench", "spiral_relu", "--repeats", "1",
             "--steps", "2", "--modes", "scan", "--out", str(out)],
            capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"JAX CPU dispatch {expected}" in done.stdout
        machine = json.loads((out / "results.json").read_text())["machine"]
        assert machine["jax_cpu_dispatch"] == expected
        assert f"JAX CPU dispatch {expected}" in (out / "results.md").read_text()


def test_the_transposed_dot_reproduction_prints_both_forms(capsys):
    """``bench/xla_transposed_dot.py`` (the reproduction for XLA): one row per shape with
    both forms' times; no speed is asserted."""
    from bench import xla_transposed_dot

    assert xla_transposed_dot.main(["--batch", "8", "--fan-in", "256", "--out", "1", "3",
                                    "--repeats", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 8 |")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [("256", "1"), ("256", "3")]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
