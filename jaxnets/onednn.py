"""2-D float32 convolutions through oneDNN (the library PyTorch's CPU convolutions use), as
XLA FFI calls: the CPU float32 path of ``model.conv = "auto"``.

Why. XLA:CPU (jaxlib 0.10) has no oneDNN path left, and its Eigen/YNNPACK convolutions are
slow on the small CNNs' layers, their backward passes above all. Measured on a quiet 2-core
Xeon (AVX-512) with ``python bench/xla_conv_fallback.py --compare --repeats 5``, one training
step of each seed CNN layer inside a ``lax.scan``, oneDNN against the canonical Eigen path
(jaxnets.conv): LeNet conv1 0.52 against 2.01 ms, conv2 1.56 against 2.67; SimpleNet conv1
2.05 against 7.04, conv2 6.57 against 12.85; ConvNet conv1 0.86 against 3.12, conv2 1.87
against 3.61. XLA's forward with oneDNN's two backward passes was slower than all three in
oneDNN on every layer (1.42 to 8.01 ms), so training runs all three through oneDNN. The
forward alone at batch 1000 (inference): oneDNN 2.6 to 23.8 ms against XLA's 6.0 to 49.2.
Whole models' inference (``jaxnets bench``, three repeats), oneDNN for every forward against
XLA's forward wherever a layer has more than one input channel: ConvNet 75,160 against
67,267 samples/s, ResNet 18,221 against 12,954, the stride-2 CNN 126,986 against 123,927,
SimpleNet 15,923 against 18,517; so every forward is oneDNN's (SimpleNet's 20->20 5x5 the
one layer measured slower there).

The kernel is C++ (``jaxnets/native/onednn_conv.cc``) built against Debian's ``libdnnl-dev``
by ``python -m jaxnets.onednn build`` (``make`` runs it). The same library holds
:func:`transposed_copy` (``jaxnets/native/transpose.cc``, no oneDNN in it), the thin weight
gradients' path of :func:`jaxnets.layers.linear_dot_general`. Without the built library,
``available()`` is False and "auto" keeps the canonical Eigen path (jaxnets.conv). PyTorch's
wheel ships its own ``libgomp.so.1``, which this oneDNN then shares: ``jaxnets bench`` times
each framework in its own process for that reason (bench/hosts.py).
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
    "transposed_copy",
    "unavailable_reason",
    "version",
]

NATIVE = Path(__file__).with_name("native")
SOURCE = NATIVE / "onednn_conv.cc"
SOURCES = (SOURCE, NATIVE / "transpose.cc")
LIBRARY = NATIVE / "libjaxnets_onednn.so"
HEADER = Path("/usr/include/dnnl.hpp")
TARGETS = ("Forward", "ForwardBias", "BackwardData", "BackwardWeights", "BackwardWeightsBias")


def compile_command() -> list[str]:
    """The one command that builds LIBRARY (g++ and Debian's libdnnl-dev)."""
    return ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-Wno-attributes",
            "-Wno-return-type", f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o",
            str(LIBRARY), "-ldnnl"]


def build() -> None:
    """Compile the FFI library (raises CalledProcessError with the compiler's output)."""
    subprocess.run(compile_command(), check=True, timeout=600)


@functools.cache
def unavailable_reason() -> str | None:
    """None when the library is loaded and its targets registered; else why not."""
    if not LIBRARY.exists():
        return (f"{LIBRARY} is not built (needs libdnnl-dev: apt-get install libdnnl-dev; "
                "then python -m jaxnets.onednn build, or make)")
    for source in SOURCES:
        if source.exists() and source.stat().st_mtime > LIBRARY.stat().st_mtime:
            return (f"{LIBRARY} is older than {source.name}: rebuild with "
                    "python -m jaxnets.onednn build")
    try:
        lib = ctypes.cdll.LoadLibrary(str(LIBRARY))
    except OSError as err:
        return f"{LIBRARY} does not load: {err}"
    for name in TARGETS:
        jax.ffi.register_ffi_target(f"jaxnets_onednn_conv_{name}",
                                    jax.ffi.pycapsule(getattr(lib, f"JaxnetsOnednnConv{name}")),
                                    platform="cpu")
    jax.ffi.register_ffi_target("jaxnets_transpose", jax.ffi.pycapsule(lib.JaxnetsTranspose),
                                platform="cpu")
    return None


def available() -> bool:
    return unavailable_reason() is None


class _DnnlVersion(ctypes.Structure):  # dnnl_version_t, <dnnl_types.h>
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint),
                ("gpu_runtime", ctypes.c_uint)]


def version() -> str | None:
    """The oneDNN the library runs ("2.6.3"), None where it is not available."""
    if not available():
        return None
    dnnl_version = ctypes.CDLL(str(LIBRARY)).dnnl_version  # found in its libdnnl dependency
    dnnl_version.restype = ctypes.POINTER(_DnnlVersion)
    v = dnnl_version().contents
    return f"{v.major}.{v.minor}.{v.patch}"


def _attrs(strides, padding, dilation) -> dict[str, np.int64]:
    (sh, sw), ((pt, pb), (pl, pr)), (dh, dw) = strides, padding, dilation
    return {k: np.int64(v) for k, v in dict(sh=sh, sw=sw, pt=pt, pb=pb, pl=pl, pr=pr,
                                              dh=dh, dw=dw).items()}


def _call(target: str, shapes, *operands, strides, padding, dilation):
    """One FFI call; ``shapes`` one result shape, or a list of them (a list of results)."""
    results = ([jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
               if isinstance(shapes, list) else jax.ShapeDtypeStruct(shapes, jnp.float32))
    return jax.ffi.ffi_call(f"jaxnets_onednn_conv_{target}", results,
                            vmap_method="sequential")(
        *operands, **_attrs(strides, padding, dilation))


def _out_shape(x_shape, kernel_shape, strides, padding, dilation) -> tuple[int, ...]:
    spatial = [(size + lo + hi - ((k - 1) * d + 1)) // s + 1 for size, k, s, d, (lo, hi)
               in zip(x_shape[1:3], kernel_shape[:2], strides, dilation, padding, strict=True)]
    return (x_shape[0], *spatial, kernel_shape[-1])


def _onednn_forward(x, kernel, bias, strides, padding, dilation):
    shape = _out_shape(x.shape, kernel.shape, strides, padding, dilation)
    geometry = dict(strides=strides, padding=padding, dilation=dilation)
    if bias is None:
        return _call("Forward", shape, x, kernel, **geometry)
    return _call("ForwardBias", shape, x, kernel, bias, **geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def conv_onednn(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]],
                dilation: tuple[int, int]) -> jax.Array:
    """x (N, H, W, C) float32, kernel (kh, kw, C, O), bias (O,) or None -> (N, H', W', O), one
    group, explicit padding pairs; the forward and the gradients are oneDNN's.

    The bias is added inside oneDNN's primitive, not by an XLA add after it: an XLA add is a
    broadcast along the channels, which XLA fuses into the next activation's loop, and such a
    loop with exp/erf/a division runs several times slower on XLA:CPU
    (docs/xla-broadcast-exp.md). Measured on a 2-core EPYC, ``stride2_same_mnist``'s
    evaluation (conv, SiLU, ...): 63.8 ms with the bias added by XLA against 34.8 ms with
    none; ``bench/xla_broadcast_exp.py`` times the fusion alone."""
    return _onednn_forward(x, kernel, bias, strides, padding, dilation)


def _forward(x, kernel, bias, strides, padding, dilation):
    return _onednn_forward(x, kernel, bias, strides, padding, dilation), (x, kernel, bias)


def _backward(strides, padding, dilation, residuals, dy):
    x, kernel, bias = residuals
    geometry = dict(strides=strides, padding=padding, dilation=dilation)
    dx = _call("BackwardData", x.shape, dy, kernel, **geometry)
    if bias is None:
        return dx, _call("BackwardWeights", kernel.shape, x, dy, **geometry), None
    dk, db = _call("BackwardWeightsBias", [kernel.shape, bias.shape], x, dy, **geometry)
    return dx, dk, db


conv_onednn.defvjp(_forward, _backward)


@jax.custom_jvp
def transposed_copy(x: jax.Array) -> jax.Array:
    """``x.T`` of a 2-D float32 array on the CPU, made by an FFI call into a new row-major
    buffer: XLA cannot fold it into the dot that consumes it, as it does ``x.T``
    (jaxnets.layers.linear_dot_general says when that matters). Needs the library."""
    if not available():  # registers the FFI targets on first use
        raise RuntimeError(f"transposed_copy: {unavailable_reason()}")
    return jax.ffi.ffi_call("jaxnets_transpose", jax.ShapeDtypeStruct(x.shape[::-1], x.dtype),
                            vmap_method="sequential")(x)


@transposed_copy.defjvp
def _transposed_copy_jvp(primals, tangents):
    return transposed_copy(primals[0]), tangents[0].T  # linear: the tangent transposes too


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
