"""Both frameworks' numerics for one block of work, set on entry and restored on exit.

:func:`numerics` is ``jaxnets.numerics.jax_numerics`` plus PyTorch's settings: TF32 off for
CUDA matmuls and cuDNN convolutions (PyTorch allows TF32 in cuDNN by default, so a float32
convolution on a recent GPU is not float32), and optionally the CPU thread count. The CLI and
the library (parity, bench, compare) run inside it; reports record :func:`read_numerics`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from jaxnets.errors import JaxnetsError
from jaxnets.numerics import jax_numerics, read_jax_numerics


def torch_device(device: str) -> torch.device:
    """PyTorch's name for a device: "gpu" is "cuda" in PyTorch, "cpu" is "cpu" in both."""
    return torch.device("cuda" if device == "gpu" else "cpu")


@contextmanager
def torch_numerics(device: str = "cpu", threads: int | None = None) -> Iterator[None]:
    """Inside the block: TF32 off for CUDA matmuls and cuDNN, and ``threads`` CPU threads
    (None: as they are). Everything changed is restored on exit."""
    if device == "gpu" and not torch.cuda.is_available():
        raise JaxnetsError("--device gpu: PyTorch sees no GPU here (a CUDA build of torch "
                           "on a machine with one)")
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32, torch.get_num_threads()
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved[:2]
        if threads is not None:
            torch.set_num_threads(saved[2])


@contextmanager
def numerics(dtype: str = "float32", device: str = "cpu", threads: int | None = None
             ) -> Iterator[None]:
    """JAX's and PyTorch's numerics for the block (:func:`jax_numerics`, :func:`torch_numerics`),
    both on ``device`` ("cpu" or "gpu")."""
    with torch_numerics(device, threads), jax_numerics(dtype, device):
        yield


def read_torch_numerics() -> dict[str, Any]:
    """PyTorch's settings as PyTorch reports them now."""
    return {"cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available()}


def read_numerics() -> dict[str, dict[str, Any]]:
    """Both frameworks' settings, read back, for a report."""
    return {"jax": read_jax_numerics(), "torch": read_torch_numerics()}


def tf32_summary(read: dict[str, dict[str, Any]]) -> str:
    """One phrase for a report: whether TF32 was allowed anywhere, from the values read back."""
    torch_read, jax_read = read["torch"], read["jax"]
    allowed = [name for name, on in (
        ("torch matmul", torch_read["cuda_matmul_allow_tf32"]),
        ("cuDNN", torch_read["cudnn_allow_tf32"]),
        ("jax matmul", jax_read["matmul_precision"] != "highest")) if on]
    return ("off (read back: torch matmul and cuDNN allow_tf32 False, jax matmul precision "
            "highest)" if not allowed else "allowed in " + ", ".join(allowed))
