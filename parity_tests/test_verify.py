"""``jaxnets verify`` on ports written the way users write them (``parity_tests/foreign``):
correct ones pass in eval and train mode; each planted porting bug is named at its layer; the
mapping proposal reads back; the command's exit codes and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO, run_cli
from jaxnets.cli import main
from jaxnets.errors import ConfigError
from parity_tests.foreign import cnn, mixer
from torchref.verify import assert_port_equivalent, verify
from torchref.verify.mapping import read_mapping
from torchref.verify.report import error_figure

SHAPES = {"cnn": (8, 1, 14, 14), "mixer": (8, mixer.TOKENS, mixer.PATCH)}
PAIRS = {"cnn": cnn, "mixer": mixer}


def inputs(name: str, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPES[name]).astype(np.float32)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Both correct pairs, float32, eval and train mode, with report files."""
    out = {}
    for name, module in PAIRS.items():
        where = tmp_path_factory.mktemp(name)
        out[name] = (verify(module.make_torch(), module.make_flax(), inputs(name), out=where),
                     where)
    return out


def test_cnn_port_passes_every_check(reports):
    report, where = reports["cnn"]
    assert report.passed and report.first_divergent_layer is None, report.verdict
    # nn.Sequential indices paired with the port's own names, by execution order and kind
    assert report.mapping.layers == [("0", "conv"), ("1", "norm"), ("6", "hidden"),
                                     ("8", "logits")]
    assert report.mapping.params["1.running_var"] == ("norm.var", "same")
    assert report.mapping.params["0.weight"] == ("conv.kernel", "conv_torch_to_flax")
    kinds = {(r.check, r.mode) for r in report.rows}
    for mode in ("eval", "train"):
        assert {("forward", f"propagated {mode}"), ("forward", f"shadow {mode}"),
                ("backward", f"propagated {mode}"), ("backward", f"shadow {mode}"),
                ("params", f"propagated {mode}"), ("params", f"shadow {mode}")} <= kinds
    state = {r.layer: r for r in report.rows if r.check == "state"}
    assert set(state) == {"1.running_mean", "1.running_var"}
    saved = json.loads((where / "report.json").read_text())
    assert saved["passed"] and saved["first_divergent_layer"] is None
    assert {"layer", "check", "mode", "stats", "verdict"} <= set(saved["rows"][0])
    assert {"max_abs", "mean_abs", "median_abs", "max_rel", "mean_rel", "median_rel",
            "cosine"} <= set(saved["rows"][0]["stats"])
    assert (where / "report.md").read_text().startswith("# jaxnets verify (float32)")
    assert (where / "errors.png").stat().st_size > 0
    figure = error_figure(report)  # one panel per mode, each propagated and shadow
    assert [a.get_title() for a in figure.axes] == ["eval mode", "train mode"]
    for axes in figure.axes:
        labels = axes.get_legend_handles_labels()[1]
        assert {"flax, propagated", "flax, shadow", "bound", "torch float32"} <= set(labels)


def test_mixer_port_passes_and_names_its_layers(reports):
    report, _ = reports["mixer"]
    assert report.passed, report.verdict
    assert dict(report.mapping.layers) == {
        "embed": "patch_proj", "norm1": "ln_tokens", "token_mlp.0": "mix_a",
        "token_mlp.2": "mix_b", "norm2": "ln_channels", "channel_mlp.0": "up",
        "channel_mlp.2": "down", "head": "classifier"}
    assert not report.mapping.problems


def test_mapping_round_trip(reports, tmp_path):
    """The proposal as written to mapping.toml reads back to the same mapping; an edited
    file naming missing tensors is refused with every problem listed at once."""
    report, where = reports["mixer"]
    torch_model, flax_model = mixer.make_torch(), mixer.make_flax()
    again = read_mapping(where / "mapping.toml", torch_model, flax_model)
    assert again.params == report.mapping.params and again.layers == report.mapping.layers
    text = (where / "mapping.toml").read_text()
    broken = text.replace('"head.bias"', '"head.b"').replace('"down.kernel"', '"down.w"')
    (tmp_path / "bad.toml").write_text(broken)
    with pytest.raises(ConfigError) as info:
        read_mapping(tmp_path / "bad.toml", torch_model, flax_model)
    message = str(info.value)
    assert "torch has no tensor head.b" in message and "flax has no variable down.w" in message
    assert "torch head.bias is not mapped" in message
    assert "flax down.kernel is not mapped" in message


@pytest.mark.parametrize(("pair", "broken", "where"), [
    ("cnn", "eps", "1"),  # BatchNorm epsilon 1e-3 instead of 1e-5
    ("mixer", "gelu_tanh", "between channel_mlp.0 and channel_mlp.2"),  # jax.nn.gelu's default
    ("mixer", "eps", "norm2"),  # LayerNorm epsilon 1e-6 (Flax's default) instead of 1e-5
])
def test_broken_port_is_named_at_its_layer(pair, broken, where):
    module = PAIRS[pair]
    report = verify(module.make_torch(), module.make_flax(broken), inputs(pair),
                    modes=("eval",))
    assert not report.passed and report.first_divergent_layer == where, report.verdict
    # every layer before the bug still matches forward (propagated, shadow, alone): the
    # error is located, not smeared over the model
    layers = [t for t, _ in report.mapping.layers]
    earlier = layers[:layers.index(where.split()[-1])]
    assert all(r.passed for r in report.rows
               if r.layer in earlier and r.check in ("forward", "input", "proof")), where


def test_transposed_square_kernel_is_named(reports, tmp_path):
    """A mapping edited to copy a square Linear's weight without the transpose: shapes cannot
    tell, the layer's proof and shadow checks can."""
    _, where = reports["mixer"]
    text = (where / "mapping.toml").read_text().replace(
        '"token_mlp.0.weight" = { flax = "mix_a.kernel", rule = "linear_torch_to_flax" }',
        '"token_mlp.0.weight" = { flax = "mix_a.kernel", rule = "same" }')
    (tmp_path / "mapping.toml").write_text(text)
    with pytest.raises(AssertionError, match=r"first divergent layer token_mlp\.0:"):
        assert_port_equivalent(mixer.make_torch(), mixer.make_flax(), inputs("mixer"),
                               mapping=str(tmp_path / "mapping.toml"), modes=("eval",))


def test_cli_float64_passes(tmp_path):
    """Its own process: float64 turns on JAX's global x64 switch."""
    spec = "parity_tests/foreign/cnn.py"
    ok = run_cli("verify", "--torch", f"{spec}:make_torch", "--flax", f"{spec}:make_flax",
                 "--input-shape", "4,1,14,14", "--dtype", "float64", "--out", str(tmp_path))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("equivalent:")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dtype"] == "float64" and report["passed"]
    assert {r["verdict"] for r in report["rows"]} == {"agrees"}


def test_cli_broken_port_exits_1_naming_the_layer(tmp_path, capsys):
    spec = str(REPO / "parity_tests" / "foreign" / "cnn.py")
    code = main(["verify", "--torch", f"{spec}:make_torch", "--flax", f"{spec}:make_flax_eps",
                 "--input-shape", "4,1,14,14", "--out", str(tmp_path)])
    assert code == 1
    assert "first divergent layer 1:" in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text())["first_divergent_layer"] == "1"


def test_optimizer_steps_free_running_and_resynced():
    """The user's torch.optim.SGD with momentum against their Optax set-up, three steps,
    free-running and resynced, with the momentum buffers; a learning rate 1 % off is named at
    the first step, in the resynced run (one step's own bias, not accumulated drift).
    (Adam in float32 is left to a bound from an ensemble: one step turns the rounding of a
    gradient that is exactly 0, a conv bias under BatchNorm, into a step of ~lr.)"""
    import torch

    from jaxnets.optim import sgd_momentum

    def torch_sgd(params):
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)

    def run(tx):
        return verify(cnn.make_torch(), cnn.make_flax(), inputs("cnn"), modes=("eval",),
                      torch_optimizer=torch_sgd, flax_optimizer=tx, steps=3)

    good = run(sgd_momentum(0.1, 0.9))
    assert good.passed, good.verdict
    modes = {(r.check, r.mode) for r in good.rows}
    assert {("step", "resynced"), ("step", "free-running"), ("loss", "resynced")} <= modes
    slots = {r.check for r in good.rows if r.check.startswith("state ")}
    assert slots == {"state momentum_buffer"}
    bad = run(sgd_momentum(0.101, 0.9))
    assert bad.first_divergent_layer.startswith("step 1: "), bad.verdict
    assert "resynced" in bad.verdict


SPEC = str(REPO / "parity_tests" / "foreign" / "cnn.py")
MIXER = str(REPO / "parity_tests" / "foreign" / "mixer.py")
GOOD = ["--flax", f"{SPEC}:make_flax", "--input-shape", "4,1,14,14"]


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--torch", "nowhere.py:make", *GOOD], 2, "--torch nowhere.py:make: no file nowhere.py"),
    (["--torch", f"{SPEC}:missing", *GOOD], 2, "has no callable missing"),
    (["--torch", SPEC, *GOOD], 2, "expected MODULE:FACTORY"),
    (["--torch", f"{SPEC}:make_flax", *GOOD], 2, "not a torch.nn.Module"),
    (["--torch", "parity_tests.foreign.nothing:make", *GOOD], 2,
     "no module parity_tests.foreign.nothing"),
    (["--torch", "{raising}:make", *GOOD], 1, "the factory raised RuntimeError: boom"),
    (["--torch", f"{SPEC}:make_torch", *GOOD[:3], "4,x"], 2, "--input-shape 4,x"),
    (["--torch", f"{MIXER}:make_torch", *GOOD[:3], "4,8,12"], 1,
     "the Flax model rejects input (4, 8, 12)"),
    (["--torch", f"{SPEC}:make_torch", "--flax", f"{SPEC}:make_small", *GOOD[2:]], 1,
     "output shapes differ: torch (4, 10) (in the Flax layout (4, 10)), flax (4, 9)"),
    (["--torch", f"{SPEC}:make_torch", *GOOD[:3], "4,3,14,14"], 1,
     "the torch model rejects input (4, 3, 14, 14)"),
])
def test_cli_bad_input_is_one_line(args, code, message, capsys, tmp_path):
    raising = tmp_path / "raising.py"
    raising.write_text("def make():\n    raise RuntimeError('boom')\n")
    (tmp_path / "small.py").write_text(
        "from flax import nnx\n"
        "def make_small(rngs):\n    return nnx.Sequential(lambda x: x.reshape(x.shape[0], -1),"
        " nnx.Linear(196, 9, rngs=rngs))\n")
    args = [a.replace(f"{SPEC}:make_small", str(tmp_path / "small.py:make_small")) for a in args]
    args = [a.replace("{raising}", str(raising)) for a in args]
    assert main(["verify", *args, "--out", str(tmp_path / "out")]) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_embedding_pair_with_token_ids():
    """Integer inputs reach an Embedding as ids on both sides; nn.Embedding pairs with
    nnx.Embed (same layout), LayerNorm with nnx.LayerNorm."""
    import torch
    from flax import nnx
    from torch import nn

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(20, 8)
            self.ln = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 5)

        def forward(self, ids):
            return self.fc(self.ln(self.tok(ids)).mean(1))

    class BagPort(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(20, 8, rngs=rngs)
            self.norm = nnx.LayerNorm(8, epsilon=1e-5, rngs=rngs)
            self.out = nnx.Linear(8, 5, rngs=rngs)

        def __call__(self, ids):
            return self.out(self.norm(self.emb(ids)).mean(1))

    torch.manual_seed(0)
    ids = np.random.default_rng(0).integers(0, 20, (4, 6))
    report = verify(Bag(), BagPort(nnx.Rngs(0)), ids, modes=("eval",))
    assert report.passed, report.verdict
    assert report.mapping.layers == [("tok", "emb"), ("ln", "norm"), ("fc", "out")]
    assert report.mapping.params["tok.weight"] == ("emb.embedding", "embedding_torch_to_flax")


def test_running_variance_difference_is_named():
    """torch's BatchNorm keeps the unbiased batch variance in running_var, nnx.BatchNorm the
    biased one: the naive comparison differs by momentum * var / (count - 1), the named
    function agrees to float32 rounding."""
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from jaxnets.convert import norm_state_torch_to_flax, torch_running_var_as_flax

    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    torch_bn = torch.nn.BatchNorm2d(3).train()
    before = torch_bn.running_var.detach().numpy().copy()
    torch_bn(torch.tensor(x))
    flax_bn = nnx.BatchNorm(3, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    flax_bn.train()
    flax_bn(jnp.asarray(x.transpose(0, 2, 3, 1)))
    torch_var = torch_bn.running_var.detach().numpy()
    flax_var = np.asarray(flax_bn.var[...])
    assert np.abs(torch_var - flax_var).max() > 1e-3  # 0.1 * ~1 / 99
    named = torch_running_var_as_flax(torch_var, before, 0.1, 4 * 5 * 5)
    assert np.abs(named - flax_var).max() < 1e-6  # float32 rounding of values ~1
    renamed = norm_state_torch_to_flax({k: v.numpy() for k, v in torch_bn.state_dict().items()})
    assert sorted(renamed) == ["bias", "mean", "scale", "var"]  # num_batches_tracked dropped


def test_float64_verify_leaves_x64_as_it_found_it():
    """verify(dtype="float64") scopes JAX's x64 mode to its own checks: float32 work in the same
    process afterwards stays float32 (it used to switch x64 on for the whole process)."""
    import jax

    assert not jax.config.jax_enable_x64
    x = np.random.default_rng(0).standard_normal((2, 1, 14, 14)).astype(np.float32)
    report = verify(cnn.make_torch(), cnn.make_flax(), x, dtype="float64", modes=("eval",))
    assert report.passed, report.verdict
    assert not jax.config.jax_enable_x64
    assert jax.numpy.zeros(()).dtype == np.float32
