"""Layout rules the verify engine's mapping proposes: a port that flattens NHWC activations
before its first Dense (the HWC rule, proven on the layer's own input), and Conv1d."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jaxnets.convert import (
    conv1d_torch_to_flax,
    flat_chw_to_hwc,
    linear_hwc_torch_to_flax,
    linear_torch_to_flax,
)
from parity_tests.foreign import cnn
from torchref.verify import verify
from torchref.verify.mapping import Mapping, read_mapping

CHW = (4, 7, 7)


def test_hwc_rule_is_the_permuted_transpose():
    """Torch's Linear on a channel-major flatten equals the port's Dense on an NHWC flatten
    with the named rule; the plain transpose does not."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *CHW))  # NCHW
    weight = rng.standard_normal((5, int(np.prod(CHW))))
    torch_out = x.reshape(2, -1) @ weight.T
    nhwc_flat = x.transpose(0, 2, 3, 1).reshape(2, -1)
    assert np.allclose(nhwc_flat @ linear_hwc_torch_to_flax(weight, CHW), torch_out,
                       rtol=1e-12, atol=1e-12)
    assert not np.allclose(nhwc_flat @ linear_torch_to_flax(weight), torch_out, atol=1e-3)
    assert np.array_equal(flat_chw_to_hwc(x.reshape(2, -1), CHW), nhwc_flat)


@pytest.fixture(scope="module")
def nhwc_port():
    """The foreign CNN's port that flattens its NHWC activations (no transpose to CHW)."""
    x = np.random.default_rng(0).standard_normal((8, 1, 14, 14)).astype(np.float32)
    return x, verify(cnn.make_torch(), cnn.make_flax("flatten"), x, modes=("eval",))


def test_nhwc_flatten_port_is_proven_and_mapped_by_the_hwc_rule(nhwc_port, tmp_path):
    _, report = nhwc_port
    assert report.passed, report.verdict
    assert report.mapping.params["6.weight"] == ("hidden.kernel",
                                                 "linear_hwc_torch_to_flax(4,7,7)")
    assert report.mapping.params["8.weight"] == ("logits.kernel", "linear_torch_to_flax")
    # the proof, the shadow and the propagated rows of that Linear all compare in HWC order
    rows = {(r.check, r.mode) for r in report.rows if r.layer == "6" and r.passed}
    assert {("proof", "alone, random input"), ("input", "propagated eval"),
            ("forward", "shadow eval"), ("backward", "shadow eval")} <= rows
    # mapping.toml carries the rule and reads back
    report.write(tmp_path)
    again = read_mapping(tmp_path / "mapping.toml", cnn.make_torch(), cnn.make_flax("flatten"))
    assert again.params == report.mapping.params


def test_nhwc_flatten_port_fails_with_the_naive_mapping(nhwc_port):
    x, report = nhwc_port
    naive = Mapping(list(report.mapping.layers), dict(report.mapping.params))
    naive.params["6.weight"] = ("hidden.kernel", "linear_torch_to_flax")
    failed = verify(cnn.make_torch(), cnn.make_flax("flatten"), x, modes=("eval",),
                    mapping=naive)
    # the Dense's input is the NHWC flatten, torch's the CHW one: the divergence enters there
    assert not failed.passed
    assert failed.first_divergent_layer == "between 1 and 6", failed.verdict


class Conv1dNet(torch.nn.Module):
    """x: (batch, 3, 10) NCL -> (batch, 5): two Conv1d, a mean over the length, a Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3, padding=1),
                                            torch.nn.ReLU(), torch.nn.Conv1d(4, 6, 3))
        self.head = torch.nn.Linear(6, 5)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=2))


class Conv1dPort(nnx.Module):
    """x: (batch, 10, 3) NLC -> (batch, 5)."""

    def __init__(self, rngs: nnx.Rngs):
        self.first = nnx.Conv(3, 4, 3, padding=1, rngs=rngs)
        self.second = nnx.Conv(4, 6, 3, padding="VALID", rngs=rngs)
        self.out = nnx.Linear(6, 5, rngs=rngs)

    def __call__(self, x):
        return self.out(self.second(jax.nn.relu(self.first(x))).mean(axis=1))


def test_conv1d_rule_is_oiw_to_wio():
    """torch's conv1d equals lax's NLC convolution with the named rule's kernel; the same
    numbers read as WIO without the transpose do not."""
    rng = np.random.default_rng(1)
    x, weight = rng.standard_normal((2, 3, 9)), rng.standard_normal((4, 3, 3))
    want = torch.nn.functional.conv1d(torch.tensor(x), torch.tensor(weight)).numpy()

    def lax_conv(kernel):
        out = jax.lax.conv_general_dilated(x.transpose(0, 2, 1), kernel, (1,), "VALID",
                                           dimension_numbers=("NWC", "WIO", "NWC"))
        return np.asarray(out).transpose(0, 2, 1)

    # JAX computes in float32 here (x64 off): 9 products of O(1) values round to ~1e-7
    assert np.allclose(lax_conv(conv1d_torch_to_flax(weight)), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(lax_conv(weight.reshape(3, 3, 4)), want, atol=1e-3)


def test_conv1d_pair_is_mapped_and_passes():
    x = np.random.default_rng(0).standard_normal((4, 3, 10))
    report = verify(Conv1dNet(), Conv1dPort(nnx.Rngs(0)), x, dtype="float64",
                    flax_layout="channels_last", modes=("eval",))
    assert report.passed, report.verdict
    assert report.mapping.layers == [("features.0", "first"), ("features.2", "second"),
                                     ("head", "out")]
    assert report.mapping.params["features.2.weight"] == ("second.kernel",
                                                          "conv1d_torch_to_flax")


class PadOutside(torch.nn.Module):
    """Pads with ``F.pad`` before a padding-free Conv2d (the port pads inside its conv)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.head = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        x = torch.relu(self.conv(torch.nn.functional.pad(x, (1, 1, 1, 1))))
        return self.head(x.flatten(1))


class PadInside(nnx.Module):
    def __init__(self, act=nnx.relu, *, rngs: nnx.Rngs):
        self.c = nnx.Conv(1, 4, (3, 3), padding=1, rngs=rngs)
        self.h = nnx.Linear(4 * 36, 3, rngs=rngs)
        self.act = act

    def __call__(self, x):
        x = self.act(self.c(x))
        return self.h(x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1))


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_padding_moved_into_the_layer(act):
    """Where the conv's input differs in shape between the sides (padding outside torch's
    layer, inside the port's), its input, proof and shadow rows are 'not comparable' notes
    instead of a crash, and its output and the later layers are still judged: the correct port
    passes, a wrong activation after it is still named."""
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((4, 1, 6, 6))
    report = verify(PadOutside(), PadInside(getattr(nnx, act), rngs=nnx.Rngs(0)), x,
                    dtype="float64")
    notes = {(r.check, r.mode) for r in report.rows if r.verdict == "not comparable"}
    assert ("proof", "alone, random input") in notes and ("input", "propagated eval") in notes
    assert any(r.layer == "conv" and r.check == "forward" for r in report.rows)
    if act == "relu":
        assert report.passed, report.verdict
    else:
        assert report.first_divergent_layer == "between conv and head", report.verdict
