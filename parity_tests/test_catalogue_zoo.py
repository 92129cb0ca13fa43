"""The bug catalogue planted into the zoo and the layer-list configs through ``jaxnets parity``:
the PyTorch side is the config as written, the JAX side is built from the same config with one
layer option or optimizer setting changed (``check_config(..., flax_cfg=...)``), as a porter
who copied one default wrongly would have it. Each must fail parity at the check and the layer
(or step) where the difference enters; the correct config passes (test_parity.py,
test_layer_parity.py). Weight-conversion bugs are planted through a wrong ``converter``
(test_parity.py::test_wrong_conversion_is_located)."""

from __future__ import annotations

import copy

import pytest
from test_parity import config_and_data

from torchref.numerics import numerics
from torchref.parity import check_config


def layer_option(name: str, **options):
    """Change ``options`` of the top-level layer ``name`` of a Sequential config."""
    def plant(cfg):
        from jaxnets.spec import data_input_shape, model_layers

        names = [layer.name for layer in model_layers(cfg["model"], data_input_shape(cfg))]
        cfg["model"]["layers"][names.index(name)].update(options)
    return plant


def optimizer_option(**options):
    def plant(cfg):
        cfg["optimizer"].update(options)
    return plant


# (config, bug, how it is planted on the JAX side, the parity check that must fail, the layer
# it must name: None where the check names a step rather than a layer). Pools and activations
# are functions on the torch side, no modules: the engine names them "between" the modules
# around them.
PLANTED = [
    ("resnet_gelu_fashion", "gelu_tanh", layer_option("gelu_1", approximate=True),
     "forward", "between stem and block1.branch.conv1"),  # a function, no module: between
    ("resnet_gelu_fashion", "layernorm_eps", layer_option("norm", eps=1e-6), "forward", "norm"),
    ("vgg_bn_fashion", "bn_eps", layer_option("bn1", eps=1e-3), "forward", "bn1"),
    ("vgg_bn_fashion", "bn_momentum_convention", layer_option("bn1", momentum=0.9),
     "trajectory_2_steps_state", "bn1"),
    ("stride2_same_mnist", "same_padding_stride2", layer_option("conv1", padding=1),
     "forward", "conv1"),
    ("stride2_same_mnist", "avgpool_count_include_pad",
     layer_option("pool", count_include_pad=True), "forward", "between conv2 and fc"),
    ("mlp_fashion", "lr_1pct_high", optimizer_option(learning_rate=1.01e-3), "step", None),
    ("mlp_fashion", "coupled_weight_decay", optimizer_option(weight_decay=1e-4), "step", None),
    ("convnet_mnist", "nesterov", optimizer_option(nesterov=True), "step", None),
]


@pytest.mark.parametrize(("name", "bug", "plant", "check", "layer"), PLANTED,
                         ids=[f"{name}-{bug}" for name, bug, *_ in PLANTED])
def test_planted_bug_fails_parity_at_its_place(fashion, name, bug, plant, check, layer):
    cfg, data = config_and_data(name, fashion)
    flax_cfg = copy.deepcopy(cfg)
    plant(flax_cfg)
    with numerics("float64", "cpu"):  # x64 for this test only
        checks = {c.check: c for c in check_config(cfg, data, "float64", steps=2,
                                                   flax_cfg=flax_cfg)}
    failed = checks[check]
    assert not failed.passed, (bug, failed)
    if layer is not None:
        assert failed.first_divergent_layer == layer, (bug, failed)
    # and every check before it in the engine's order passes: the bug shows where it enters
    order = list(checks)
    assert all(checks[c].passed for c in order[:order.index(check)]), (bug, checks)
