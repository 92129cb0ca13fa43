"""Operation-level parity, JAX (jax.nn / jnp / Optax / Flax NNX) against PyTorch, on CPU, in
float32 and float64: losses, activations, conv2d and 2x2 max-pool, forward and gradients, and
the conv arithmetic the sources state.

float64: every test runs once per dtype. The JAX side of a float64 run executes inside
``jax.enable_x64(True)``, the scoped context manager of jax 0.10 (``jax.experimental.enable_x64``
no longer exists there), and every JAX result is asserted to really be float64: without x64,
``jnp.asarray(x, jnp.float64)`` silently gives float32. Float32 runs pin ``enable_x64(False)``.

Gradients are vector-Jacobian products with a fixed random cotangent: the gradient of
``sum(f(x) * cotangent)`` (``jax.grad``, or ``jax.vjp`` where the forward value is wanted too)
against ``(f(x) * cotangent).sum().backward()`` in torch. Losses are scalars: plain gradients.

Tolerances (max-abs, rtol 0, ``conftest.assert_allclose``):

* elementwise ops and losses: 1e-6 in float32 (a few ulps at the O(1) magnitudes used; the
  largest difference measured is 7e-7, tanh's gradient), 1e-12 in float64;
* conv2d: 1e-5 in float32, 1e-12 in float64;
* both scaled by the compared tensor's largest magnitude where that exceeds 1
  (``magnitude_tolerance``): a sum of 64 row distances (~270), the total norm (~36) and the
  conv kernel and bias gradients (~250) are too large for an absolute 1e-6 or 1e-5 to be
  reachable in float32, whose ulp at 256 is 3e-5;
* max-pool and the integer conv arithmetic: exact equality.

Findings (CPU, jax 0.10.2, torch 2.13.0), each asserted below:

* Max-pool 2x2 stride 2 (``jaxnets.pooling.max_pool`` = ``nnx.max_pool``, and
  ``F.max_pool2d``), gradient of a window whose maximum is tied:
  BOTH frameworks route the window's whole gradient to the FIRST maximal element in row-major
  window order (top-left, top-right, bottom-left, bottom-right); the other tied elements get
  exactly 0; the gradient is never split and never goes to the last maximum. So the gradients
  are identical, bit for bit, in float32 and float64, eager and jitted: checked on all 81
  windows over {0, 1, 2}^4 (every tie pattern: all four equal, every pair, every triple), on
  raw Fashion-MNIST pixels (53% of the windows of 16 test images are tied, mostly in the zero
  background) and on ReLU(conv 3x3) feature maps of the same images (71% tied).
* Max-pool forward on a tie between -0.0 and +0.0 (equal as numbers): torch returns the first
  element of the window, JAX returns +0.0 whenever the window holds a +0.0 (XLA's max orders
  -0.0 below +0.0). Values compare equal; only the sign bit can differ.
* ReLU at exactly 0: both use the subgradient 0 (gradient 0 at 0.0 and at -0.0). ReLU(-0.0) is
  -0.0 in torch and +0.0 in JAX (equal as numbers).
* |x| at exactly 0: torch's gradient is sign(0) = 0 (``torch.abs``, ``F.l1_loss``); ``jnp.abs``'s
  is 1. ``jaxnets.losses.mae`` is written as ``d * sign(d)`` so that it matches torch.
* Euclidean norm at a zero difference: torch's gradient (``torch.dist``,
  ``torch.linalg.vector_norm``) is 0, ``jnp.linalg.norm``'s is NaN; ``jaxnets.losses.l2_distance``
  masks it to 0 like torch.
* ``nnx.Conv``'s default padding is ``"SAME"`` (torch's is 0): ``Conv(5, 10, 3)`` on 100x100
  gives 100x100 in Flax, 98x98 in torch; the conv2d builder (``jaxnets.layers``) passes
  explicit padding.
* ``nnx.Conv`` is exactly ``lax.conv_general_dilated(NHWC, HWIO) + bias``: bitwise equal.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from conftest import assert_allclose
from jaxnets import layers as jax_layers
from jaxnets import losses, pooling
from jaxnets.spec import infer_shapes, parse_layers

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
# elementwise ops and losses; see the module docstring
TOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
CONV_TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    """The dtype of the test; JAX's x64 mode is on exactly for float64, for the whole test."""
    dt = np.dtype(request.param)
    with jax.enable_x64(dt == np.float64):
        yield dt


def jx(a, dtype) -> jax.Array:
    """A JAX array of ``dtype``, asserting that JAX did not silently downcast it."""
    out = jnp.asarray(np.asarray(a, dtype))
    assert out.dtype == dtype, f"JAX gave {out.dtype}, not {dtype} (x64 off?)"
    return out


def tt(a, dtype, grad: bool = False) -> torch.Tensor:
    return torch.tensor(np.asarray(a, dtype), dtype=TORCH_DTYPES[dtype], requires_grad=grad)


def npy(a, dtype) -> np.ndarray:
    """A JAX or torch result as NumPy, asserting it is of ``dtype``."""
    out = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    assert out.dtype == dtype, f"result is {out.dtype}, not {dtype}"
    return out


def magnitude_tolerance(tol: float, expected) -> float:
    """``tol`` in units of the largest magnitude of ``expected`` when that exceeds 1: a
    relative tolerance for large values, an absolute one for the O(1) values of most tests."""
    return tol * max(1.0, float(np.max(np.abs(np.asarray(expected, np.float64)))))


def check(jax_out, torch_out, dtype, tol: float, what: str) -> None:
    """Both results are of ``dtype`` and agree to ``magnitude_tolerance(tol, torch_out)``."""
    expected = npy(torch_out, dtype)
    assert_allclose(npy(jax_out, dtype), expected, magnitude_tolerance(tol, expected), what)


def nchw(a: np.ndarray) -> np.ndarray:
    return np.transpose(a, (0, 3, 1, 2))


def nhwc(a) -> np.ndarray:
    return np.transpose(np.asarray(a), (0, 2, 3, 1))


# ----------------------------------------------------------------------------- losses


def loss_data(dtype):
    """(64, 10) predictions and targets with exact-zero differences (single elements and one
    whole row), logits with a +-50 row, integer labels and probability targets."""
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(64, 10))
    target = rng.normal(size=(64, 10))
    target[0, :3] = pred[0, :3]  # |d| and its gradient at exactly 0
    target[1] = pred[1]  # a row at distance exactly 0
    logits = rng.normal(0, 3, (64, 10))
    logits[2] = np.linspace(-50, 50, 10)  # exp(50) = 5e21: stable log-sum-exp needed
    logits[3] = -logits[2]
    labels = rng.integers(0, 10, 64)
    labels[2], labels[3] = 0, 0  # the least likely class of row 2, the most likely of row 3
    probs = rng.dirichlet(np.ones(10), 64)
    return [np.asarray(a, dtype) for a in (pred, target, logits, probs)] + [labels]


def loss_pairs():
    """(name, JAX loss(pred, target), torch loss(pred, target), target kind)."""
    return [
        ("mse", losses.mse, F.mse_loss, "real"),
        ("mae", losses.mae, F.l1_loss, "real"),
        ("l2_distance mean of rows", losses.l2_distance,
         lambda p, t: torch.linalg.vector_norm(p - t, dim=1).mean(), "real"),
        ("l2_distance sum of rows", lambda p, t: losses.l2_distance(p, t, "sum"),
         lambda p, t: torch.linalg.vector_norm(p - t, dim=1).sum(), "real"),
        ("l2 total norm", lambda p, t: jnp.linalg.norm((p - t).reshape(-1)), torch.dist,
         "real"),
        ("cross-entropy integer labels", losses.cross_entropy, F.cross_entropy, "labels"),
        ("cross-entropy probabilities",
         lambda z, p: optax.softmax_cross_entropy(z, p).mean(), F.cross_entropy, "probs"),
    ]


@pytest.mark.parametrize("name,jax_loss,torch_loss,kind", loss_pairs(),
                         ids=[p[0] for p in loss_pairs()])
def test_loss_value_and_gradient(dtype, name, jax_loss, torch_loss, kind):
    pred, target, logits, probs, labels = loss_data(dtype)
    if kind == "real":
        x, y = pred, target
    else:
        x, y = logits, (labels if kind == "labels" else probs)
    y_jax = jnp.asarray(y) if kind == "labels" else jx(y, dtype)
    y_torch = torch.tensor(y) if kind == "labels" else tt(y, dtype)

    value, grad = jax.jit(jax.value_and_grad(jax_loss))(jx(x, dtype), y_jax)
    x_torch = tt(x, dtype, grad=True)
    torch_value = torch_loss(x_torch, y_torch)
    torch_value.backward()
    assert value.shape == () and torch_value.shape == ()
    check(value, torch_value, dtype, TOL[dtype], f"{name} value")
    check(grad, x_torch.grad, dtype, TOL[dtype], f"{name} gradient")
    assert np.all(np.isfinite(np.asarray(grad)))


def test_l2_distance_per_row(dtype):
    pred, target, *_ = loss_data(dtype)
    rows = losses.l2_distance(jx(pred, dtype), jx(target, dtype), "none")
    torch_rows = torch.linalg.vector_norm(tt(pred, dtype) - tt(target, dtype), dim=1)
    assert rows.shape == (64,)
    check(rows, torch_rows, dtype, TOL[dtype], "l2_distance per row")
    assert float(rows[1]) == 0.0
    # not F.pairwise_distance: it adds eps=1e-6 to the difference
    assert float(F.pairwise_distance(tt(pred, dtype), tt(target, dtype))[1]) > 0


def test_zero_differences_and_their_gradients(dtype):
    """Exact zeros, where |d| and ||d|| are not differentiable: the documented choices."""
    pred, target, *_ = loss_data(dtype)
    p, t = jx(pred, dtype), jx(target, dtype)
    # |d|' at 0: jnp.abs says 1, torch says 0 (sign); jaxnets.losses.mae follows torch
    assert np.all(npy(jax.grad(lambda v: jnp.abs(v).sum())(jx([0.0, -0.0], dtype)), dtype) == 1)
    z = tt([0.0, -0.0], dtype, grad=True)
    z.abs().sum().backward()
    assert np.all(npy(z.grad, dtype) == 0)
    assert np.all(npy(jax.grad(losses.mae)(p, t), dtype)[0, :3] == 0)
    # ||d||' at d = 0: jnp.linalg.norm gives NaN, torch 0; l2_distance follows torch
    assert np.all(np.isnan(npy(jax.grad(lambda v: jnp.linalg.norm(v - t[1]))(t[1]), dtype)))
    row = tt(target[1], dtype, grad=True)
    torch.dist(row, tt(target[1], dtype)).backward()
    assert np.all(npy(row.grad, dtype) == 0)
    assert np.all(npy(jax.grad(losses.l2_distance)(p, t), dtype)[1] == 0)


def test_one_hot_probability_targets_equal_integer_labels(dtype):
    _, _, logits, _, labels = loss_data(dtype)
    one_hot = np.eye(10, dtype=dtype)[labels]
    check(optax.softmax_cross_entropy(jx(logits, dtype), jx(one_hot, dtype)).mean(),
          F.cross_entropy(tt(logits, dtype), torch.tensor(labels)), dtype, TOL[dtype],
          "one-hot probabilities vs integer labels")


# ----------------------------------------------------------------------------- activations

BIG = [0.0, 50.0, -50.0, 100.0, -100.0, 1000.0, -1000.0, 20.0, -20.0, 1e-8]


def activation_input(dtype) -> np.ndarray:
    """(73, 10): N(0, 3) rows, -50..50, and rows mixing 0 with +-20, +-50, +-100, +-1000, where
    naive formulas overflow (exp(100) is inf in float32, exp(1000) in float64)."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 3, 600), np.linspace(-50, 50, 100), BIG, BIG[::-1],
                        rng.permutation(BIG)])
    x[::37] = 0.0  # exact zeros for ReLU
    return x.reshape(-1, 10).astype(dtype)


ACTIVATIONS = {
    "sigmoid": (jax.nn.sigmoid, torch.sigmoid),
    "tanh": (jnp.tanh, torch.tanh),
    "relu": (jax.nn.relu, torch.relu),
    "softmax": (lambda v: jax.nn.softmax(v, axis=-1), lambda v: torch.softmax(v, dim=-1)),
    "log_softmax": (lambda v: jax.nn.log_softmax(v, axis=-1),
                    lambda v: torch.log_softmax(v, dim=-1)),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_value_and_gradient(dtype, name):
    jax_f, torch_f = ACTIVATIONS[name]
    x = activation_input(dtype)
    cot = np.random.default_rng(2).normal(size=x.shape).astype(dtype)

    @jax.jit
    def value_and_vjp(v, c):
        value, vjp = jax.vjp(jax_f, v)
        return value, vjp(c)[0]

    value, grad = value_and_vjp(jx(x, dtype), jx(cot, dtype))
    x_torch = tt(x, dtype, grad=True)
    torch_value = torch_f(x_torch)
    (torch_value * tt(cot, dtype)).sum().backward()
    check(value, torch_value, dtype, TOL[dtype], f"{name} value")
    check(grad, x_torch.grad, dtype, TOL[dtype], f"{name} gradient")
    for out in (value, grad, torch_value, x_torch.grad):
        assert np.all(np.isfinite(npy(out, dtype))), f"{name}: overflow"


def test_large_inputs_overflow_naive_formulas_but_not_the_frameworks(dtype):
    x = np.asarray(BIG, dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        naive_softmax = np.exp(x) / np.exp(x).sum()
    assert np.isnan(naive_softmax).any()
    for name in ("softmax", "log_softmax"):
        jax_f, torch_f = ACTIVATIONS[name]
        check(jax_f(jx(x, dtype)), torch_f(tt(x, dtype)), dtype, TOL[dtype], name)
    softmax = npy(jax.nn.softmax(jx(x, dtype)), dtype)
    assert softmax[5] == 1.0 and softmax.sum() == 1.0  # all the mass on the 1000
    for f in (jax.nn.sigmoid, torch.sigmoid):
        arg = jx(x, dtype) if f is jax.nn.sigmoid else tt(x, dtype)
        s = npy(f(arg), dtype)
        assert s[5] == 1.0 and s[6] == 0.0 and s[0] == 0.5
    assert np.array_equal(npy(jnp.tanh(jx(x[1:7], dtype)), dtype), np.sign(x[1:7]))
    assert np.array_equal(npy(torch.tanh(tt(x[1:7], dtype)), dtype), np.sign(x[1:7]))


def test_relu_subgradient_at_zero_is_zero_in_both(dtype):
    x = np.asarray([-1.0, -0.0, 0.0, 1.0], dtype)
    grad = npy(jax.grad(lambda v: jax.nn.relu(v).sum())(jx(x, dtype)), dtype)
    x_torch = tt(x, dtype, grad=True)
    torch.relu(x_torch).sum().backward()
    assert np.array_equal(grad, [0, 0, 0, 1])
    assert np.array_equal(npy(x_torch.grad, dtype), [0, 0, 0, 1])
    # the value at -0.0: equal as numbers, only the sign bit differs
    assert np.signbit(npy(torch.relu(tt(x, dtype)), dtype)[1])
    assert not np.signbit(npy(jax.nn.relu(jx(x, dtype)), dtype)[1])


# ----------------------------------------------------------------------------- conv2d

CONV_CASES = [
    # name, in, out, kernel, stride, padding, height = width
    ("LeNet.conv1 3x3 pad 1", 1, 6, 3, 1, 1, 28),
    ("LeNet.conv2 5x5 pad 0", 6, 16, 5, 1, 0, 14),
    ("SimpleNet.conv1 5x5 pad 2", 1, 20, 5, 1, 2, 28),
    ("SimpleNet.conv2 5x5 pad 2", 20, 20, 5, 1, 2, 14),
    ("ConvNet.conv1 5x5 pad 0", 1, 10, 5, 1, 0, 28),
    ("ConvNet.conv2 5x5 pad 0", 10, 20, 5, 1, 0, 12),
    ("3x3 stride 2 pad 0", 4, 8, 3, 2, 0, 15),  # odd size: the last row/column is dropped
]


def jax_conv(x, kernel, bias, stride: int, padding: int):
    """NHWC input, HWIO kernel: what nnx.Conv runs."""
    y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding),) * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv2d_forward_and_gradients(dtype, case):
    name, c_in, c_out, k, stride, pad, size = case
    rng = np.random.default_rng(3)
    bound = 1 / np.sqrt(c_in * k * k)  # torch's default init range
    x = rng.normal(size=(8, c_in, size, size)).astype(dtype)
    w = rng.uniform(-bound, bound, (c_out, c_in, k, k)).astype(dtype)
    b = rng.uniform(-bound, bound, c_out).astype(dtype)
    xt, wt, bt = tt(x, dtype, True), tt(w, dtype, True), tt(b, dtype, True)
    yt = F.conv2d(xt, wt, bt, stride=stride, padding=pad)
    cot = rng.normal(size=yt.shape).astype(dtype)
    (yt * tt(cot, dtype)).sum().backward()

    kernel = jx(np.transpose(w, (2, 3, 1, 0)), dtype)  # OIHW -> HWIO

    @jax.jit
    def value_and_vjp(x_, k_, b_, c_):
        y, vjp = jax.vjp(lambda *a: jax_conv(*a, stride, pad), x_, k_, b_)
        return y, *vjp(c_)

    y, gx, gk, gb = value_and_vjp(jx(nhwc(x), dtype), kernel, jx(b, dtype), jx(nhwc(cot), dtype))

    expected = {"output": nhwc(npy(yt, dtype)), "input gradient": nhwc(npy(xt.grad, dtype)),
                "kernel gradient": np.transpose(npy(wt.grad, dtype), (2, 3, 1, 0)),
                "bias gradient": npy(bt.grad, dtype)}
    out_size = (size + 2 * pad - k) // stride + 1
    assert y.shape == (8, out_size, out_size, c_out)
    # kernel and bias gradients are sums over 8 x H x W positions: magnitudes up to ~250,
    # measured differences up to 4e-4 in float32 and 9e-13 in float64 (2e-6 and 4e-15 relative)
    for what, actual in (("output", y), ("input gradient", gx), ("kernel gradient", gk),
                         ("bias gradient", gb)):
        check(actual, expected[what], dtype, CONV_TOL[dtype], f"{name} {what}")

    # the project's layer (nnx.Conv with explicit padding) is exactly this primitive
    conv = nnx.Conv(c_in, c_out, (k, k), strides=stride, padding=((pad, pad),) * 2,
                    dtype=dtype, param_dtype=dtype, kernel_init=nnx.initializers.zeros_init(),
                    rngs=nnx.Rngs(0))
    conv.kernel[...], conv.bias[...] = kernel, jx(b, dtype)
    assert np.array_equal(npy(conv(jx(nhwc(x), dtype)), dtype), np.asarray(y))


# ----------------------------------------------------------------------------- max-pool


def first_max_routing(x: np.ndarray, cot: np.ndarray) -> np.ndarray:
    """NumPy oracle, NCHW: each 2x2 window's cotangent goes to its first maximal element in
    row-major order (np.argmax returns the first maximum)."""
    n, c, h, w = x.shape
    windows = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    first = windows.reshape(n, c, h // 2, w // 2, 4).argmax(-1)
    grad = np.zeros((n, c, h // 2, w // 2, 4), x.dtype)
    np.put_along_axis(grad, first[..., None], cot[..., None], axis=-1)
    return grad.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(x.shape)


def tied_windows(x: np.ndarray) -> int:
    """How many 2x2 windows attain their maximum more than once. x: NCHW."""
    n, c, h, w = x.shape
    windows = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    windows = windows.reshape(n, c, h // 2, w // 2, 4)
    return int(np.sum(np.sum(windows == windows.max(-1, keepdims=True), -1) > 1))


def _pool_vjp(x, cot):
    return jnp.sum(pooling.max_pool(x, (2, 2), (2, 2)) * cot)


_pool_grad = jax.grad(_pool_vjp)
_pool_grad_jit = jax.jit(_pool_grad)  # module-level: compiled once per shape and dtype


def pool_both(x: np.ndarray, dtype, seed: int = 4):
    """Forward and gradient of the project's two max-pools on the same NCHW input, with the
    same random cotangent (positive, so routing is visible; never 0), JAX eager and jitted."""
    cot = np.random.default_rng(seed).uniform(1, 2, (*x.shape[:2], x.shape[2] // 2,
                                                      x.shape[3] // 2)).astype(dtype)
    jax_in, jax_cot = jx(nhwc(x), dtype), jx(nhwc(cot), dtype)
    y = pooling.max_pool(jax_in, (2, 2), (2, 2))
    grad = _pool_grad(jax_in, jax_cot)
    jitted = _pool_grad_jit(jax_in, jax_cot)
    assert np.array_equal(npy(jitted, dtype), npy(grad, dtype)), "jit changed the routing"
    xt = tt(x, dtype, grad=True)
    yt = F.max_pool2d(xt, 2, 2)
    (yt * tt(cot, dtype)).sum().backward()
    return (nchw(npy(y, dtype)), nchw(npy(grad, dtype)), npy(yt, dtype), npy(xt.grad, dtype),
            cot)


def assert_pools_identical(x: np.ndarray, dtype, what: str) -> None:
    y, grad, yt, grad_t, cot = pool_both(x, dtype)
    assert np.array_equal(y, yt), f"{what}: forward differs"
    oracle = first_max_routing(x, cot)
    assert np.array_equal(grad_t, oracle), f"{what}: torch does not route ties to the first max"
    assert np.array_equal(grad, oracle), f"{what}: JAX does not route ties to the first max"
    assert np.array_equal(grad, grad_t), f"{what}: JAX and torch gradients differ"


def every_tie_pattern(dtype) -> np.ndarray:
    """All 81 windows over {0, 1, 2}^4 tiled into an 18x18 image, and the same windows
    mirrored and transposed in two more channels; batch 2. Contains every tie: four equal,
    every pair of tied maxima (2 2 / 0 1, 2 0 / 1 2, ...), every triple."""
    windows = np.array(list(itertools.product([0.0, 1.0, 2.0], repeat=4))).reshape(9, 9, 2, 2)
    image = windows.transpose(0, 2, 1, 3).reshape(18, 18)
    channels = np.stack([image, image[::-1, ::-1], image.T])
    return np.stack([channels, channels + 5]).astype(dtype)


def test_max_pool_ties_route_to_the_first_maximum(dtype):
    x = every_tie_pattern(dtype)
    # 36 of the 81 have a unique maximum (4 x 2^3 with max 2, 4 with max 1): 45 are tied
    assert tied_windows(x) == 2 * 3 * 45
    assert_pools_identical(x, dtype, "every tie pattern")


@pytest.mark.parametrize("window,first", [
    ([[7, 7], [7, 7]], 0), ([[7, 7], [0, 0]], 0), ([[0, 0], [7, 7]], 2), ([[0, 7], [0, 7]], 1),
    ([[0, 7], [7, 0]], 1), ([[7, 0], [0, 7]], 0), ([[0, 7], [7, 7]], 1), ([[1, 3], [3, 2]], 1),
])
def test_max_pool_tie_examples(dtype, window, first):
    """Spelled out: which element of a tied window gets the gradient, in both frameworks."""
    x = np.asarray(window, dtype)[None, None]
    expected = np.zeros(4, dtype)
    expected[first] = 1.0
    _, grad, _, grad_t, cot = pool_both(x, dtype)
    assert np.array_equal(grad.reshape(4) / cot.item(), expected)
    assert np.array_equal(grad_t.reshape(4) / cot.item(), expected)


def test_max_pool_ties_on_fashion_mnist_pixels(dtype, fashion):
    x = (fashion.test_x[:16].astype(dtype) / 255)[:, None]  # (16, 1, 28, 28), zero background
    windows = 16 * 14 * 14
    assert tied_windows(x) > 0.5 * windows
    assert_pools_identical(x, dtype, "Fashion-MNIST pixels")


def test_max_pool_ties_on_fashion_mnist_relu_features(dtype, fashion):
    """pool(ReLU(conv(x))) as in LeNet/SimpleNet: ReLU makes ties at 0 and the background
    makes ties at relu(bias). The same feature maps go into both pools."""
    rng = np.random.default_rng(6)
    w, b = rng.uniform(-1 / 3, 1 / 3, (6, 1, 3, 3)), rng.uniform(-1 / 3, 1 / 3, 6)  # torch's range
    x = (fashion.test_x[:16].astype(dtype) / 255)[:, None]
    features = npy(torch.relu(F.conv2d(tt(x, dtype), tt(w, dtype), tt(b, dtype), padding=1)),
                   dtype)
    windows = 16 * 6 * 14 * 14
    assert tied_windows(features) > 0.5 * windows
    assert np.mean(features == 0) > 0.2  # ReLU's zeros are among them
    assert_pools_identical(features, dtype, "Fashion-MNIST ReLU(conv) features")


def test_max_pool_signed_zero_tie_values_differ_only_in_sign(dtype):
    """A window -0.0 +0.0 / +0.0 -0.0: torch returns its first element (-0.0), JAX +0.0."""
    x = np.asarray([[-0.0, 0.0], [0.0, -0.0]], dtype)[None, None]
    y, grad, yt, grad_t, _ = pool_both(x, dtype)
    assert y.item() == yt.item() == 0.0
    assert np.signbit(yt.item()) and not np.signbit(y.item())
    assert np.array_equal(grad, grad_t) and grad.reshape(4)[0] != 0


# ----------------------------------------------------------------------------- conv arithmetic

X5 = [[3, 4, 6, 5, 7], [2, 4, 6, 8, 2], [1, 6, 7, 8, 4], [9, 7, 4, 6, 2], [3, 7, 5, 4, 1]]
K3 = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def numpy_cross_correlation(x: np.ndarray, k: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """The oracle, in integers: out[i, j] = sum(x_padded[i*s : i*s+kh, j*s : j*s+kw] * k)."""
    x = np.pad(x, pad)
    kh, kw = k.shape
    oh, ow = (x.shape[0] - kh) // stride + 1, (x.shape[1] - kw) // stride + 1
    return np.array([[np.sum(x[i * stride:i * stride + kh, j * stride:j * stride + kw] * k)
                      for j in range(ow)] for i in range(oh)])


def both_convs(dtype, stride: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The 5x5 example convolved without bias by the 3x3 kernel in both frameworks, (H, W)."""
    x, k = np.asarray(X5, dtype), np.asarray(K3, dtype)
    jax_out = jax.lax.conv_general_dilated(
        jx(x[None, :, :, None], dtype), jx(k[:, :, None, None], dtype), (stride, stride),
        ((pad, pad),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    torch_out = F.conv2d(tt(x[None, None], dtype), tt(k[None, None], dtype), stride=stride,
                         padding=pad)
    return npy(jax_out, dtype)[0, :, :, 0], npy(torch_out, dtype)[0, 0]


def test_conv_example_stride_2_no_padding(dtype):
    jax_out, torch_out = both_convs(dtype, stride=2, pad=0)
    expected = np.array([[211, 262], [251, 169]])
    assert np.array_equal(numpy_cross_correlation(np.array(X5), np.array(K3), 2, 0), expected)
    assert np.array_equal(jax_out, expected) and np.array_equal(torch_out, expected)


def test_conv_example_padding_1_stride_1(dtype):
    jax_out, torch_out = both_convs(dtype, stride=1, pad=1)
    oracle = numpy_cross_correlation(np.array(X5), np.array(K3), 1, 1)
    assert oracle.shape == jax_out.shape == torch_out.shape == (5, 5)
    assert np.array_equal(jax_out, torch_out)
    assert np.array_equal(jax_out, oracle)
    assert oracle[2, 2] == 4 * 1 + 6 * 2 + 8 * 3 + 6 * 4 + 7 * 5 + 8 * 6 + 7 * 7 + 4 * 8 + 6 * 9


def test_conv_shapes_5_to_10_kernel_3_on_100x100(dtype):
    x = np.random.default_rng(5).normal(size=(1, 5, 100, 100)).astype(dtype)
    torch_conv = torch.nn.Conv2d(5, 10, 3, dtype=TORCH_DTYPES[dtype])
    assert tuple(torch_conv.weight.shape) == (10, 5, 3, 3)
    assert tuple(torch_conv(tt(x, dtype)).shape) == (1, 10, 98, 98)
    jax_conv_layer = nnx.Conv(5, 10, (3, 3), padding="VALID", dtype=dtype, param_dtype=dtype,
                              kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0))
    assert jax_conv_layer.kernel[...].shape == (3, 3, 5, 10)
    assert jax_conv_layer.kernel[...].dtype == dtype
    y = jax_conv_layer(jx(nhwc(x), dtype))
    assert y.shape == (1, 98, 98, 10) and y.dtype == dtype


def test_project_conv_pads_explicitly_because_flax_defaults_to_same():
    x = jnp.zeros((1, 100, 100, 5), jnp.float32)
    default = nnx.Conv(5, 10, (3, 3), kernel_init=nnx.initializers.zeros_init(),
                       rngs=nnx.Rngs(0))
    assert default(x).shape == (1, 100, 100, 10)  # padding="SAME"
    # the project's factory, shapes only (abstract evaluation: its random init is slow to
    # compile and irrelevant here)
    [layer] = parse_layers([{"type": "conv2d", "out": 10, "kernel": 3}])
    infer_shapes([layer], (5, 100, 100))
    settings = {"init": "torch", "init_std": 0.01, "conv": "auto"}
    project = nnx.eval_shape(lambda: jax_layers.BUILDERS["conv2d"](layer, settings, nnx.Rngs(0)))
    assert project.padding == ((0, 0), (0, 0))
    assert project.kernel.shape == (3, 3, 5, 10)
    out = nnx.eval_shape(
        lambda: jax_layers.BUILDERS["conv2d"](layer, settings, nnx.Rngs(0))(x))
    assert out.shape == (1, 98, 98, 10)
