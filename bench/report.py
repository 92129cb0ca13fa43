"""``jaxnets bench`` output: ``results.json``, ``results.md`` (with JAX/PyTorch ratios and the
fraction of the measured matmul peak) and ``throughput.png``."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from jaxnets.report import write_json

MODES = ("jit_step", "scan", "stream", "eager", "compile")


def machine_info(device: str, peak: dict[str, float]) -> dict[str, Any]:
    import flax
    import jax
    import optax
    import psutil
    import torch

    from torchref.numerics import read_numerics

    info = {
        "device": device, "platform": platform.platform(), "processor": platform.machine(),
        "cpu_count": psutil.cpu_count(logical=True), "torch_threads": torch.get_num_threads(),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "flax": flax.__version__, "optax": optax.__version__,
                     "torch": torch.__version__},
        **peak,
    }
    info["numerics"] = read_numerics()  # as both frameworks report them, inside the run
    if device == "gpu":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _row(rows, config, mode, phase):
    for r in rows:
        if (r["config"], r["mode"], r.get("phase")) == (config, mode, phase):
            return r
    return None


def add_peak_fraction(rows: list[dict], peak_gflops: float) -> None:
    for r in rows:
        if "gflops" in r:
            r["peak_fraction"] = r["gflops"] / peak_gflops


def markdown(machine: dict[str, Any], rows: list[dict], command: str) -> str:
    configs = list(dict.fromkeys(r["config"] for r in rows))
    lines = [
        "# jaxnets bench", "",
        f"`{command}`", "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} logical CPUs, torch threads "
        f"{machine['torch_threads']}, JAX devices {', '.join(machine['jax_devices'])}"
        + (f", GPU {machine['gpu']}" if "gpu" in machine else "") + ". Versions: "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()) + ".",
        f"Measured float32 matmul peak ({2048}^3): {machine['matmul_peak_gflops']:.1f} GFLOP/s "
        f"(JAX {machine['jax_gflops']:.1f}, PyTorch {machine['torch_gflops']:.1f}).", "",
        "Samples/s are medians over the repeats (min-max in brackets); compile is the warm-up "
        "run's excess over the median; % peak is achieved GFLOP/s over the matmul peak; "
        "a training step counts forward + weight gradients + input gradients of all layers "
        "but the first. JAX inference is the same "
        "jitted evaluation in both JAX modes.", "",
    ]
    for phase in ("train", "infer"):
        lines += [f"## {'Training' if phase == 'train' else 'Inference'}", "",
                  "| config | mode | samples/s | GFLOP/s | % peak | compile s | peak RSS MB |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for config in configs:
            for mode in MODES:
                r = _row(rows, config, mode, phase)
                if r is None:
                    continue
                lines.append(
                    f"| {config} | {mode} | {r['samples_per_s']:,.0f} "
                    f"({r['samples_per_s_min']:,.0f}-{r['samples_per_s_max']:,.0f}) | "
                    f"{r['gflops']:.2f} | {100 * r['peak_fraction']:.1f} | "
                    f"{r['compile_s']:.2f} | {r['peak_rss_mb']:.0f} |")
        lines += ["", "| config | scan / eager | jit_step / eager | stream / jit_step | "
                  "scan / compile |", "|---|---:|---:|---:|---:|"]
        for config in configs:
            def ratio(a, b, config=config, phase=phase):
                ra, rb = _row(rows, config, a, phase), _row(rows, config, b, phase)
                return f"{ra['samples_per_s'] / rb['samples_per_s']:.2f}x" if ra and rb else "-"
            lines.append(f"| {config} | {ratio('scan', 'eager')} | {ratio('jit_step', 'eager')}"
                         f" | {ratio('stream', 'jit_step')} | {ratio('scan', 'compile')} |")
        lines.append("")
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
