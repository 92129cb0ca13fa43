"""``jaxnets verify``: prove that a Flax NNX port computes what its PyTorch model computes,
layer by layer, forward and backward, judged against PyTorch in float64."""

from torchref.verify.engine import assert_port_equivalent, verify
from torchref.verify.report import Report

__all__ = ["Report", "assert_port_equivalent", "verify"]
