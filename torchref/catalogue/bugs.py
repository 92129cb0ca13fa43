"""The catalogue: classic PyTorch -> Flax porting bugs, each a named mutation of a correct port.

Every :class:`Bug` names what a porter would have written, where the engine should catch it
(a torch layer name, "between A and B" for code that is no mapped layer, "step K" for an
optimizer step, "loss") and the function that plants it. :func:`case` turns a bug (or a
correct pair, ``bug=None``) into the arguments of :func:`torchref.verify.verify`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from jaxnets import losses as jax_losses
from torchref.catalogue import optimizers as opt
from torchref.catalogue import pairs, weights


@dataclass(frozen=True)
class Bug:
    name: str
    category: str  # model, weights, mode, loss, optimizer
    pair: str  # a key of pairs.TORCH
    wrote: str  # what the porter wrote
    expected: str  # where the engine should name it
    switch: str = ""  # the Flax port's ``bug`` argument (model and mode bugs)
    loader: str = ""  # a key of weights.LOADERS
    optimizer: str = ""  # a key of opt.TORCH_OPTIMIZERS (optimizer and loss bugs)
    tx: Callable | None = None  # the bugged Optax transformation's factory
    loss: Callable | None = None  # the porter's JAX loss, for torch's CrossEntropyLoss()
    modes: tuple[str, ...] = ("eval",)
    extra: dict = field(default_factory=dict)

    @property
    def plant(self) -> str:
        """The function that plants the bug, as a dotted name."""
        if self.loader:
            return f"torchref.catalogue.weights.{self.loader}"
        target = self.tx or self.loss
        if target is not None:
            return f"torchref.catalogue.optimizers.{target.__name__}"
        return f"torchref.catalogue.pairs.{pairs.FLAX[self.pair].__name__}(bug={self.switch!r})"


def _model(name, pair, wrote, expected, modes=("eval",), category="model") -> Bug:
    return Bug(name, category, pair, wrote, expected, switch=name, modes=modes)


def _weights(name, wrote, expected) -> Bug:
    return Bug(name, "weights", "convnet", wrote, expected, loader=name)


def _optimizer(name, optimizer, tx, wrote, expected="step 1") -> Bug:
    return Bug(name, "optimizer", "mlp", wrote, expected, optimizer=optimizer, tx=tx)


def _loss(name, loss, wrote) -> Bug:
    return Bug(name, "loss", "mlp", wrote, "loss", optimizer="sgd_momentum", loss=loss)


BOTH = ("eval", "train")
CATALOGUE: list[Bug] = [
    # ---- the model (a Flax-side mutation of the port)
    # The engine proves a port's flatten order and proposes the HWC rule for its first Linear
    # (jaxnets.convert.linear_hwc_torch_to_flax), so the bug is the pair: an HWC flatten with
    # the porter's plain conversion of that Linear.
    Bug("flatten_hwc", "model", "convnet", "flatten the NHWC map as it is (H, W, C), torch "
        "flattens (C, H, W), and convert the next Linear with the plain transpose", "6",
        switch="flatten_hwc", loader="plain_conversion"),
    _model("bn_momentum_convention", "convnet", "nnx.BatchNorm(momentum=0.1), torch's "
           "momentum copied; Flax's momentum weighs the old value (0.9)", "1", ("train",)),
    # The engine takes nnx.BatchNorm's biased running variance as the correct port
    # (torch_running_var_as_flax); the classic bug runs the other way: see the README.
    _model("bn_running_var_convention", "convnet", "a BatchNorm storing the unbiased running "
           "variance (torch's convention) where the engine expects nnx.BatchNorm's biased one",
           "1", ("train",)),
    _model("bn_eps", "convnet", "BatchNorm epsilon 1e-3 (Keras' default), torch's is 1e-5", "1"),
    _model("gelu_tanh", "mixer", "jax.nn.gelu(x) (tanh approximation by default), torch's "
           "nn.GELU() is the exact erf form", "between channel_mlp.0 and channel_mlp.2"),
    _model("layernorm_eps", "mixer", "nnx.LayerNorm's default epsilon 1e-6, torch's is 1e-5",
           "norm2"),
    _model("softmax_axis", "mixer", "jax.nn.softmax(scores) over the last axis, torch's "
           "softmax is over the tokens (dim=1)", "between score and head"),
    _model("same_padding_stride2", "pools", "padding='SAME' for torch's padding=1 at stride 2: "
           "XLA pads (0, 1) on an even size, torch (1, 1); the shapes agree", "conv1"),
    _model("avgpool_count_include_pad", "pools", "avg_pool(count_include_pad=False), torch's "
           "AvgPool2d counts the padding (True)", "between conv1 and head"),
    _model("maxpool_ceil_mode", "pools", "max_pool(padding='VALID') for torch's "
           "ceil_mode=True: the last partial window dropped", "between conv1 and head"),
    _model("maxpool_tie_routing", "pools", "a reshape-and-max pool: jnp.max splits a tied "
           "window's gradient over the ties, torch gives it to one element",
           "between conv0 and conv1"),
    # ---- the mode
    _model("bn_train_eval_mismatch", "convnet", "BatchNorm called with use_running_average="
           "True in training (eval-mode statistics in train mode)", "1", ("train",), "mode"),
    _model("dropout_in_eval", "convnet", "self.dropout(x, deterministic=False): dropout left "
           "on in eval", "between 1 and 6", ("eval",), "mode"),
    # ---- the weight loading
    _weights("square_linear_untransposed", "the square Linear's weight copied without the "
             "(out, in) -> (in, out) transpose", "8"),
    _weights("conv_kernel_spatial_swap", "a conv kernel converted with transpose(3, 2, 1, 0): "
             "H and W swapped", "0"),
    _weights("conv_kernel_flipped", "a conv kernel flipped in H and W (convolution for torch's "
             "cross-correlation)", "0"),
    _weights("dropped_bias", "a Linear's bias not converted (left at Flax's zeros)", "6"),
    # ---- the loss
    _loss("cross_entropy_summed", opt.cross_entropy_summed, "the cross-entropy summed over the "
          "batch, torch's CrossEntropyLoss() averages"),
    _loss("label_smoothing", opt.cross_entropy_label_smoothing, "optax.smooth_labels(..., 0.1) "
          "in the loss, the torch model's loss has none"),
    # ---- the optimizer (Optax transformations against torch.optim)
    _optimizer("adam_eps_inside_sqrt", "adam", opt.adam_eps_inside_sqrt,
               "optax.adam(eps=0, eps_root=1e-8): sqrt(v + eps) for sqrt(v) + eps"),
    _optimizer("adam_eps_1e-7", "adam", opt.adam_eps_1e7, "optax.adam(eps=1e-7), torch's 1e-8"),
    _optimizer("adam_b2_0.99", "adam", opt.adam_b2_099, "optax.adam(b2=0.99), torch's 0.999 "
               "(the first step is the same: v_hat = g**2 for any b2)", "0"),
    _optimizer("adam_no_bias_correction", "adam", opt.adam_without_bias_correction,
               "Adam without dividing m and v by 1 - b**t"),
    _optimizer("adam_decoupled_decay", "adam_l2", opt.adam_decoupled_decay,
               "optax.adamw(weight_decay=0.1) for torch.optim.Adam(weight_decay=0.1) (coupled "
               "L2)"),
    _optimizer("lr_1pct_high", "adam", opt.adam_lr_1pct_high, "a learning rate 1 % high"),
    _optimizer("sgd_dampening", "sgd_momentum", opt.sgd_with_dampening,
               "momentum as an EMA, b = m b + (1 - m) g; torch's dampening is 0"),
    _optimizer("nesterov_look_ahead", "sgd_nesterov", opt.nesterov_look_ahead,
               "Nesterov from the look-ahead form, p -= lr (g + m b) with the old buffer"),
    _optimizer("schedule_one_step_late", "sgd_schedule", opt.schedule_one_step_late,
               "the per-step halving schedule one step late", "step 2"),
    _optimizer("clip_per_tensor", "sgd_clipped", opt.clip_per_tensor,
               "each gradient tensor clipped to norm 0.5, torch clips the global norm"),
]
BY_NAME = {bug.name: bug for bug in CATALOGUE}
STEPS = 2  # optimizer steps: a schedule one step late and b2 show from the second


@contextlib.contextmanager
def planted_loss(loss: Callable | None) -> Iterator[None]:
    """The engine takes its JAX cross-entropy from ``jaxnets.losses`` by name; a porter's own
    loss is put there for the duration of one run, and restored."""
    if loss is None:
        yield
        return
    original = jax_losses.cross_entropy
    jax_losses.cross_entropy = loss
    try:
        yield
    finally:
        jax_losses.cross_entropy = original


def case(pair: str, bug: Bug | None = None, optimizer: str = "") -> dict[str, Any]:
    """:func:`torchref.verify.verify`'s arguments for ``pair`` with ``bug`` planted (None: the
    correct port, with the correct Optax port of the torch set-up ``optimizer`` if given)."""
    if bug is None and optimizer:
        bug = Bug("", "", pair, "", "", optimizer=optimizer)
    kwargs: dict[str, Any] = {
        "torch_model": pairs.TORCH[pair](), "inputs": pairs.inputs(pair),
        "flax_model": pairs.make_flax(pair, bug.switch if bug else ""),
        "modes": bug.modes if bug else BOTH}
    if bug and bug.loader:
        kwargs["load"] = weights.LOADERS[bug.loader]
    if bug and bug.optimizer:
        kwargs["torch_optimizer"] = opt.TORCH_OPTIMIZERS[bug.optimizer]
        kwargs["flax_optimizer"] = (bug.tx or opt.CORRECT[bug.optimizer])()
        kwargs["steps"] = STEPS
    return kwargs
