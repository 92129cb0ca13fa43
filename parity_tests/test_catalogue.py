"""The bug catalogue (``torchref/catalogue``): the committed detection table is current, the
correct ports pass, and a sample of planted bugs (every category) is named at its expected
location in float64. The whole table takes ~20 minutes to regenerate, so the staleness check
compares a fingerprint of the catalogue's and the engine's sources stored in the table instead
of rerunning it."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO
from torchref.catalogue import optimizers as opt
from torchref.catalogue.bugs import BY_NAME, CATALOGUE, case, planted_loss
from torchref.catalogue.markdown import markdown
from torchref.catalogue.table import fingerprint, load, right_place, summarise
from torchref.verify import verify

DOCS = REPO / "docs"


def test_committed_table_is_current():
    """docs/catalogue.json was made from today's catalogue and engine sources, lists every
    bug, and docs/catalogue.md is its rendering. After a change to either, regenerate with
    ``python -m torchref.catalogue --out docs``."""
    table = load(DOCS)
    assert table["fingerprint"] == fingerprint(), (
        "docs/catalogue.* is stale: run python -m torchref.catalogue --out docs")
    assert [e["name"] for e in table["bugs"]] == [b.name for b in CATALOGUE]
    assert table["summary"] == summarise(table["bugs"])
    assert (DOCS / "catalogue.md").read_text(encoding="utf-8") == markdown(table)


def test_catalogue_covers_the_classic_bugs():
    assert len(CATALOGUE) >= 25 and len(BY_NAME) == len(CATALOGUE)
    assert {b.category for b in CATALOGUE} == {"model", "mode", "weights", "loss", "optimizer"}
    for bug in CATALOGUE:
        assert bug.wrote and bug.expected and bug.plant, bug.name


def test_location_matching():
    assert right_place("1.running_var", "1") and right_place("step 2: 0.weight", "step 2")
    assert not right_place("10", "1") and not right_place("step 1: 0.weight", "step 2")
    assert not right_place(None, "loss")


@pytest.mark.parametrize("optimizer", ["sgd_schedule", "adam"])
def test_correct_port_passes_with_its_optimizer(optimizer):
    """The cheapest correct pair with a stateless and a stateful optimizer set-up (the table
    runs every correct pair and set-up, in both dtypes)."""
    report = verify(dtype="float64", **case("mlp", optimizer=optimizer))
    assert report.passed, report.verdict
    assert {("step", "resynced"), ("step", "free-running")} <= {(r.check, r.mode)
                                                                 for r in report.rows}


@pytest.mark.parametrize("name", [
    "same_padding_stride2",  # model
    "dropout_in_eval",  # mode
    "bn_train_eval_mismatch",  # mode: a layer called differently in the model than alone
    "maxpool_tie_routing",  # model: the backward "between" rule
    "square_linear_untransposed",  # weights
    "nesterov_look_ahead",  # optimizer
    "label_smoothing",  # loss
])
def test_planted_bug_is_caught_in_float64(name):
    """Named where the catalogue expects it (a loss bug: the loss, not the gradients below
    it, which inherit its difference)."""
    bug = BY_NAME[name]
    with planted_loss(bug.loss):
        report = verify(dtype="float64", **case(bug.pair, bug))
    assert not report.passed
    assert right_place(report.first_divergent_layer, bug.expected), report.verdict


def test_clip_coefficient_is_torchs():
    """torch's clip_grad_norm_ scales by max_norm / (norm + 1e-6); optax.clip_by_global_norm
    by max_norm / norm: the naive port differs by ~1e-6 relative (visible in float64), the
    named function agrees to rounding."""
    import jax
    import optax
    import torch

    grads = np.random.default_rng(0).standard_normal((2, 5))
    tensors = [torch.tensor(g) for g in grads]
    for t in tensors:
        t.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(tensors, 0.5)
    clipped = np.stack([t.grad.numpy() for t in tensors])
    with jax.enable_x64(True):
        naive = np.asarray(optax.clip_by_global_norm(0.5).update(
            list(grads), optax.EmptyState())[0])
        named = np.asarray(opt.torch_clip_by_global_norm(0.5).update(
            list(grads), optax.EmptyState())[0])
    assert np.abs(naive - clipped).max() > 1e-8  # 1e-6 / |g| (|g| ~3) of values ~0.3
    assert np.abs(named - clipped).max() < 1e-15


def test_float32_floor_covers_the_correct_ports_it_was_measured_on():
    """The 2-ulp floor is measured (``python -m torchref.catalogue.floor``): the largest need
    was 0.59 ulps, on the MLP's loss with input seed 1, where PyTorch float32 was nearly exact.
    That port and seed, rerun, still need less than the floor; and LayerNorm eps 1e-6 for 1e-5
    (35 ulps of its layer beyond 8 x torch's own error) is caught by more than 10x."""
    from torchref.catalogue.floor import measure
    from torchref.verify.checks import FLOOR_ULPS

    need, where = measure("mlp", 1)
    assert 0 < need < FLOOR_ULPS, (need, where)
    report = verify(dtype="float32", **case("mixer", BY_NAME["layernorm_eps"]))
    assert report.first_divergent_layer == "norm2"
    assert report.divergent_row.margin > 10, report.divergent_row.margin


def test_fed_step_keeps_the_optimizers_own_counters():
    """The float64 fed step (the reference optimizer fed Flax's gradients) copies the
    reference's optimizer with its counters: a fresh optimizer restarted the catalogue's
    halving schedule, agreed with the one-step-late port at step 2, and left that bug to the
    free-running rows (6.8e6x instead of the resynced step's 6.8e9x)."""
    report = verify(dtype="float64", **case("mlp", BY_NAME["schedule_one_step_late"]))
    row = report.divergent_row
    assert (row.check, row.mode, row.layer) == ("step", "resynced", "step 2: 0.weight"), row
    assert row.margin > 1e9, row.margin
