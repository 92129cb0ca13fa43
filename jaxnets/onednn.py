"""2-D float32 convolutions through oneDNN (the library PyTorch's CPU convolutions use), as
XLA FFI calls: the CPU training path of ``model.conv = "auto"``.

Why. XLA:CPU (jaxlib 0.10) has no oneDNN path left, and its Eigen/YNNPACK convolutions are
slow on the small CNNs' layers, in their backward passes above all. Measured on a 2-core
Xeon (AVX-512), one training step of one layer inside a ``lax.scan`` (forward, both
gradients; ``python bench/onednn_conv.py``), oneDNN against the canonical Eigen path:
ConvNet conv1 0.78 against 2.29 ms, conv2 0.98 against 1.69, LeNet conv1 0.99 against 3.29,
SimpleNet's 20->20 5x5 4.9 against 10.5 ms; Eigen's forward with oneDNN's two backward
passes was slower than oneDNN throughout (1.59 to 6.3 ms), so training runs all three
through oneDNN. For inference the forward is chosen per layer (:func:`forward_choice`).

The kernel is C++ (``jaxnets/native/onednn_conv.cc``) built against Debian's ``libdnnl-dev``
by ``python -m jaxnets.onednn build`` (``make`` runs it). Without the built library,
``available()`` is False and "auto" keeps the canonical Eigen path (jaxnets/conv.py).
"""

from __future__ import annotations

import ctypes
import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LIBRARY",
    "SOURCE",
    "available",
    "build",
    "conv_onednn",
    "forward_choice",
    "unavailable_reason",
]

NATIVE = Path(__file__).with_name("native")
SOURCE = NATIVE / "onednn_conv.cc"
LIBRARY = NATIVE / "libjaxnets_onednn.so"
HEADER = Path("/usr/include/dnnl.hpp")
TARGETS = ("Forward", "BackwardData", "BackwardWeights")


def compile_command() -> list[str]:
    """The one command that builds LIBRARY (g++ and Debian's libdnnl-dev)."""
    return ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-Wno-attributes",
            "-Wno-return-type", f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(LIBRARY),
            "-ldnnl"]


def build() -> None:
    """Compile the FFI library (raises CalledProcessError with the compiler's output)."""
    subprocess.run(compile_command(), check=True, timeout=600)


@functools.cache
def unavailable_reason() -> str | None:
    """None when the library is loaded and its targets registered; else why not."""
    if not LIBRARY.exists():
        return (f"{LIBRARY} is not built (needs libdnnl-dev: apt-get install libdnnl-dev; "
                "then python -m jaxnets.onednn build, or make)")
    if SOURCE.exists() and SOURCE.stat().st_mtime > LIBRARY.stat().st_mtime:
        return f"{LIBRARY} is older than {SOURCE.name}: rebuild with python -m jaxnets.onednn build"
    try:
        lib = ctypes.cdll.LoadLibrary(str(LIBRARY))
    except OSError as err:
        return f"{LIBRARY} does not load: {err}"
    for name in TARGETS:
        jax.ffi.register_ffi_target(f"jaxnets_onednn_conv_{name}",
                                    jax.ffi.pycapsule(getattr(lib, f"JaxnetsOnednnConv{name}")),
                                    platform="cpu")
    return None


def available() -> bool:
    return unavailable_reason() is None


def _attrs(strides, padding, dilation) -> dict[str, np.int64]:
    (sh, sw), ((pt, pb), (pl, pr)), (dh, dw) = strides, padding, dilation
    return {k: np.int64(v) for k, v in dict(sh=sh, sw=sw, pt=pt, pb=pb, pl=pl, pr=pr,
                                              dh=dh, dw=dw).items()}


def _call(target: str, shape, *operands, strides, padding, dilation) -> jax.Array:
    return jax.ffi.ffi_call(f"jaxnets_onednn_conv_{target}",
                            jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method="sequential")(
        *operands, **_attrs(strides, padding, dilation))


def _out_shape(x_shape, kernel_shape, strides, padding, dilation) -> tuple[int, ...]:
    spatial = [(size + lo + hi - ((k - 1) * d + 1)) // s + 1 for size, k, s, d, (lo, hi)
               in zip(x_shape[1:3], kernel_shape[:2], strides, dilation, padding, strict=True)]
    return (x_shape[0], *spatial, kernel_shape[-1])


def forward_choice(in_channels: int) -> str:
    """Which forward an inference (undifferentiated) call runs: "onednn" for one input
    channel, "xla" otherwise. Measured with ``python bench/onednn_conv.py`` (2-core Xeon,
    the forward alone inside a ``lax.map``, batch 64 and 1000): for one input channel
    oneDNN took 0.32-0.37 ms against XLA's 1.3-2.0 (batch 64) and 3.7 against 17.7 ms
    (batch 1000); for ConvNet's 10->20 and SimpleNet's 20->20 layers XLA's own forward was
    faster (0.39 against 0.48 ms, 1.78 against 2.33 ms)."""
    return "onednn" if in_channels == 1 else "xla"


def _xla_forward(x, kernel, strides, padding, dilation):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _onednn_forward(x, kernel, strides, padding, dilation):
    return _call("Forward", _out_shape(x.shape, kernel.shape, strides, padding, dilation),
                 x, kernel, strides=strides, padding=padding, dilation=dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_onednn(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                padding: tuple[tuple[int, int], tuple[int, int]],
                dilation: tuple[int, int]) -> jax.Array:
    """x (N, H, W, C) float32, kernel (kh, kw, C, O) -> (N, H', W', O), one group, explicit
    padding pairs. Undifferentiated: the forward :func:`forward_choice` names; under
    differentiation: oneDNN's forward and its two backward passes."""
    if forward_choice(x.shape[-1]) == "onednn":
        return _onednn_forward(x, kernel, strides, padding, dilation)
    return _xla_forward(x, kernel, strides, padding, dilation)


def _forward(x, kernel, strides, padding, dilation):
    return _onednn_forward(x, kernel, strides, padding, dilation), (x, kernel)


def _backward(strides, padding, dilation, residuals, dy):
    x, kernel = residuals
    geometry = dict(strides=strides, padding=padding, dilation=dilation)
    dx = _call("BackwardData", x.shape, dy, kernel, **geometry)
    dk = _call("BackwardWeights", kernel.shape, x, dy, **geometry)
    return dx, dk


conv_onednn.defvjp(_forward, _backward)


def main(argv: list[str]) -> int:
    if argv != ["build"]:
        print("usage: python -m jaxnets.onednn build", file=sys.stderr)
        return 2
    if not HEADER.exists():
        print(f"error: {HEADER} not found: install Debian's libdnnl-dev "
              "(apt-get install libdnnl-dev)", file=sys.stderr)
        return 1
    try:
        build()
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        print(f"error: building {LIBRARY.name} failed: {err}", file=sys.stderr)
        return 1
    print(f"built {LIBRARY}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
