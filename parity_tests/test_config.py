"""Config loading, ``--set`` overrides and their validation."""

from __future__ import annotations

import pytest

from conftest import run_cli
from jaxnets.config import available_configs, load_config
from jaxnets.errors import ConfigError


def test_seed_mlp_configs_match_the_source():
    for name, dataset in (("mlp_mnist", "mnist"), ("mlp_fashion", "fashion_mnist")):
        cfg = load_config(name)
        assert cfg["name"] == name and cfg["data"]["dataset"] == dataset
        assert (cfg["model"]["in_features"], cfg["model"]["hidden"],
                cfg["model"]["out_features"]) == (784, [512, 512], 10)
        assert cfg["model"]["activation"] == "relu"
        assert cfg["optimizer"]["name"] == "adam" and cfg["optimizer"]["learning_rate"] == 1e-3
        assert cfg["train"]["batch_size"] == 100 and cfg["train"]["epochs"] == 10
        assert cfg["train"]["loss"] == "cross_entropy" and cfg["data"]["preprocess"] == "scale"


def test_every_config_loads():
    names = available_configs()
    assert {"mlp_mnist", "mlp_fashion"} <= set(names)
    for name in names:
        assert load_config(name)["name"] == name


def test_overrides_are_typed():
    cfg = load_config("mlp_fashion", ["optimizer.learning_rate=0.01", "train.epochs=3",
                                      "data.dataset=mnist", "model.hidden=[64]",
                                      "optimizer.weight_decay=0"])
    assert cfg["optimizer"]["learning_rate"] == 0.01 and cfg["train"]["epochs"] == 3
    assert cfg["data"]["dataset"] == "mnist" and cfg["model"]["hidden"] == [64]
    assert cfg["optimizer"]["weight_decay"] == 0.0 and isinstance(
        cfg["optimizer"]["weight_decay"], float)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.learning_rte=0.1", r"unknown config key 'optimizer.learning_rte'; did you "
                                       r"mean 'optimizer.learning_rate'\?"),
        ("optimiser.name=sgd", r"unknown config key 'optimiser'; did you mean 'optimizer'\?"),
        ("train.epochs=ten", r"train.epochs must be an integer, got 'ten'"),
        ("train.epochs=2.5", r"train.epochs must be an integer, got 2.5"),
        ("train.shuffle=1", r"train.shuffle must be a boolean"),
        ("optimizer.learning_rate=0",
         r"optimizer.learning_rate = 0.0 is out of range: it must be > 0"),
        ("train.batch_size=0", r"train.batch_size = 0 is out of range: it must be >= 1"),
        ("optimizer.weight_decay=-1e-5", r"optimizer.weight_decay = -1e-05 is out of range"),
        ("optimizer.name=rmsprop",
         r"optimizer.name = 'rmsprop' is not one of: 'sgd', 'adam', 'adamw'"),
        ("optimizer.nesterov=true", r"optimizer.nesterov needs optimizer.name = 'sgd' and "
                                    r"optimizer.momentum > 0"),
        ("train", r"--set expects key=value"),
        ("train=3", r"train is a section"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("mlp_fashion", [override])


def test_unknown_key_in_a_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[model]\nhiden = [10]\n')
    with pytest.raises(ConfigError, match=r"mine.toml: unknown config key 'model.hiden'; did you "
                                          r"mean 'model.hidden'\?"):
        load_config(str(path))


def test_invalid_toml_and_unknown_name(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\nepochs = 1\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"unknown config 'mlp_fashon' \(did you mean "
                                          r"'mlp_fashion'\?\)"):
        load_config("mlp_fashon")


def test_cli_reports_a_bad_key_in_one_line():
    result = run_cli("train", "mlp_fashion", "--set", "optimizer.no_such_key=3")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["jaxnets: error: --set: unknown config key 'optimizer.no_such_key'"] or (
        len(lines) == 1 and "optimizer.no_such_key" in lines[0]), result.stderr
    assert "Traceback" not in result.stderr
