"""``jaxnets bench`` output: ``results.json``, ``results.md`` (with JAX/PyTorch ratios, the
fraction of the measured matmul peak, and the unstable measurements left out of the ratios)
and ``throughput.png``."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.timing import COMPETING_LIMIT, SPREAD_LIMIT
from jaxnets.report import write_json

MODES = ("jit_step", "scan", "stream", "eager", "compile")
JAX_MODES = ("jit_step", "scan", "stream")


def _at_size(machine: dict[str, Any], framework: str) -> str:
    size = machine.get(f"{framework}_matmul_size")
    return f" at {size}^3" if size else ""


def _sizes(machine: dict[str, Any]) -> str:
    """The square sizes the peak was measured at (results from before several sizes had
    2048 only)."""
    return ", ".join(f"{n}^3" for n in machine.get("matmul_gflops_by_size", {"2048": 0}))


def machine_info(device: str, peak: dict[str, float],
                 threads: dict[str, Any] | None = None) -> dict[str, Any]:
    """The machine, versions, thread counts (``bench.timing.set_threads``' read-back) and
    the matmul peak."""
    import flax
    import jax
    import optax
    import psutil
    import torch

    from jaxnets import onednn
    from torchref.numerics import read_numerics

    info = {
        "device": device, "platform": platform.platform(), "processor": platform.machine(),
        "cpu_count": psutil.cpu_count(logical=True), "torch_threads": torch.get_num_threads(),
        **(threads or {}),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "flax": flax.__version__, "optax": optax.__version__,
                     "torch": torch.__version__,
                     # what JAX's float32 CPU convolutions run through (jaxnets.onednn)
                     "onednn (JAX CPU convolutions)": onednn.version() or "not built"},
        **peak,
    }
    info["numerics"] = read_numerics()  # as both frameworks report them, inside the run
    if device == "gpu":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _row(rows, config, mode, phase, stable_only=False):
    for r in rows:
        if (r["config"], r["mode"], r.get("phase")) == (config, mode, phase):
            return None if stable_only and r.get("unstable") else r
    return None


def add_peak_fraction(rows: list[dict], peak_gflops: float) -> None:
    for r in rows:
        if "gflops" in r:
            r["peak_fraction"] = r["gflops"] / peak_gflops


def best_jax(rows: list[dict], config: str, phase: str) -> dict | None:
    """The fastest stable JAX mode of a config and phase."""
    candidates = [r for m in JAX_MODES if (r := _row(rows, config, m, phase, True))]
    return max(candidates, key=lambda r: r["samples_per_s"], default=None)


def _ratio(a: dict | None, b: dict | None) -> str:
    return f"{a['samples_per_s'] / b['samples_per_s']:.2f}x" if a and b else "-"


def _ratio_table(rows: list[dict], configs: list[str], phase: str) -> list[str]:
    lines = ["| config | best JAX mode | best JAX / eager | best JAX / compile | scan / eager "
             "| jit_step / eager | stream / jit_step |", "|---|---|---:|---:|---:|---:|---:|"]
    for config in configs:
        def stable(mode, config=config):
            return _row(rows, config, mode, phase, stable_only=True)

        best = best_jax(rows, config, phase)
        lines.append(f"| {config} | {best['mode'] if best else '-'} | "
                     f"{_ratio(best, stable('eager'))} | {_ratio(best, stable('compile'))} | "
                     f"{_ratio(stable('scan'), stable('eager'))} | "
                     f"{_ratio(stable('jit_step'), stable('eager'))} | "
                     f"{_ratio(stable('stream'), stable('jit_step'))} |")
    return lines


def markdown(machine: dict[str, Any], rows: list[dict], command: str) -> str:
    configs = list(dict.fromkeys(r["config"] for r in rows))
    threads = (f"torch threads {machine['torch_threads']}"
               + (f" (inter-op {machine['torch_interop_threads']}), XLA:CPU threads "
                  f"{machine['jax_cpu_threads']}" if "jax_cpu_threads" in machine else "")
               + (f", XLA_FLAGS `{machine['xla_flags']}`" if machine.get("xla_flags") else "")
               + (f", JAX CPU dispatch {machine['jax_cpu_dispatch']}"
                  if "jax_cpu_dispatch" in machine else ""))
    lines = [
        "# jaxnets bench", "",
        f"`{command}`", "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} logical CPUs, {threads}, "
        f"JAX devices {', '.join(machine['jax_devices'])}"
        + (f", GPU {machine['gpu']}" if "gpu" in machine else "") + ". Versions: "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()) + ".",
        f"Measured float32 matmul peak: {machine['matmul_peak_gflops']:.1f} GFLOP/s "
        f"(JAX {machine['jax_gflops']:.1f}{_at_size(machine, 'jax')}, PyTorch "
        f"{machine['torch_gflops']:.1f}{_at_size(machine, 'torch')}; the best median of "
        f"{_sizes(machine)} matmuls)"
        + (f", unstable: {'; '.join(machine['matmul_peak_unstable'])}."
           if machine.get("matmul_peak_unstable") else "."), "",
        "Samples/s are medians over the repeats (min-max in brackets), the modes of a config "
        "timed in turn within each repeat (A B C A B C ...); spread is the slowest repeat "
        "over the fastest; other cores is the CPU that other processes used while the modes "
        "ran. A measurement whose spread exceeds "
        f"{SPREAD_LIMIT} or during which other processes used more than {COMPETING_LIMIT} "
        "of a core is marked unstable (!) and left out of the ratios. Compile is the warm-up "
        "run's excess over the median; % peak is achieved GFLOP/s over the matmul peak; "
        "a training step counts forward + weight gradients + input gradients of all layers "
        "but the first. JAX inference is the same jitted evaluation in every JAX mode.", "",
    ]
    for phase in ("train", "infer"):
        lines += [f"## {'Training' if phase == 'train' else 'Inference'}", "",
                  "| config | mode | samples/s | GFLOP/s | % peak | spread | other cores "
                  "| compile s | peak RSS MB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for config in configs:
            for mode in MODES:
                r = _row(rows, config, mode, phase)
                if r is None:
                    continue
                flag = " (!)" if r.get("unstable") else ""
                lines.append(
                    f"| {config} | {mode}{flag} | {r['samples_per_s']:,.0f} "
                    f"({r['samples_per_s_min']:,.0f}-{r['samples_per_s_max']:,.0f}) | "
                    f"{r['gflops']:.2f} | {100 * r['peak_fraction']:.1f} | "
                    f"{r.get('spread', float('nan')):.2f} | "
                    f"{r.get('competing_cores', float('nan')):.2f} | "
                    f"{r['compile_s']:.2f} | {r['peak_rss_mb']:.0f} |")
        lines += ["", *_ratio_table(rows, configs, phase), ""]
    unstable = [r for r in rows if r.get("unstable")]
    if unstable:
        lines += ["## Unstable measurements (left out of the ratios)", ""] + [
            f"- {r['config']} {r['mode']} {r['phase']}: {'; '.join(r['unstable'])}"
            for r in unstable] + [""]
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["## Failed modes", ""] + [f"- {r['config']} {r['mode']}: {r['error']}"
                                             for r in errors]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(MODES)
    for ax, phase in zip(axes, ("train", "infer"), strict=True):
        for i, mode in enumerate(MODES):
            values = [(_row(rows, c, mode, phase) or {}).get("samples_per_s", 0) for c in configs]
            ax.bar([k + i * width for k in range(len(configs))], values, width, label=mode)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(configs))], configs, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("samples/s (median)")
        ax.set_title("training" if phase == "train" else "inference")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, machine: dict[str, Any], rows: list[dict], command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    add_peak_fraction(rows, machine["matmul_peak_gflops"])
    write_json(out / "results.json", {"machine": machine, "command": command, "results": rows})
    (out / "results.md").write_text(markdown(machine, rows, command), encoding="utf-8")
    chart([r for r in rows if "error" not in r], out / "throughput.png")
