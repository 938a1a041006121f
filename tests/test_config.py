"""LongRangeConfig: one definition of the long-range options, read by wrap, the CLI, TrainConfig and save/load."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

import latent_lr
from latent_lr import LongRangeConfig
from latent_lr.training import TrainConfig
from test_model_radial import make_model  # the tiny radial test backbone


@pytest.mark.parametrize(
    "options, message",
    [
        ({"smearing": 0.0}, "smearing must be > 0"),
        ({"accuracy": 2.0}, "accuracy"),
        ({"hidden_dim": -1}, "hidden_dim"),
        ({"charge_model": "eem"}, "charge_model must be one of"),
        ({"qeq_solver": "lu"}, "qeq_solver must be one of"),
        ({"polarizability": "full"}, "polarizability must be one of"),
        ({"polarizability_solver": "gmres"}, "polarizability_solver must be one of"),
        ({"charge_model": "qeq", "charge_redistribution": "uniform"}, "applies to charge_model='latent' only"),
    ],
)
def test_rules_between_options_raise_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        LongRangeConfig(**options)


def test_unknown_names_are_listed():
    with pytest.raises(ValueError, match="unknown long-range options \\['smearin'\\]"):
        LongRangeConfig.from_dict({"smearin": 1.0})
    with pytest.raises(ValueError, match="unknown long-range options"):
        latent_lr.wrap(make_model().backbone.host, backbone="radial", smearin=1.0)


def test_config_is_frozen_and_round_trips_through_json():
    config = LongRangeConfig(smearing=0.7, charge_model="qeq", polarizability="one_step", polarizability_hidden_dim=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.smearing = 2.0  # type: ignore[misc]
    assert LongRangeConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.replace(smearing=0.9) == LongRangeConfig(**{**config.to_dict(), "smearing": 0.9})


def test_polarizability_width_is_explicit():
    assert LongRangeConfig(hidden_dim=10).polarizability_width == 5
    assert LongRangeConfig(hidden_dim=10, polarizability_hidden_dim=7).polarizability_width == 7
    model = latent_lr.wrap(
        make_model().backbone.host, backbone="radial", polarizability="one_step", polarizability_hidden_dim=7
    )
    assert model.long_range.polarizability_head.mlp[0].out_features == 7


def test_wrap_with_config_equals_wrap_with_options():
    host = make_model().backbone.host
    torch.manual_seed(0)
    a = latent_lr.wrap(host, backbone="radial", config=LongRangeConfig(smearing=0.8, hidden_dim=5))
    torch.manual_seed(0)
    b = latent_lr.wrap(host, backbone="radial", smearing=0.8, hidden_dim=5)
    assert a.long_range.config == b.long_range.config
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_every_option_has_a_cli_flag_and_reaches_train_config():
    from latent_lr.cli import _add_training_arguments, _config_from

    parser = argparse.ArgumentParser()
    _add_training_arguments(parser, with_long_range=True)
    flags = {a for action in parser._actions for a in action.option_strings}
    for name in LongRangeConfig.names():
        assert "--" + name.replace("_", "-") in flags
    args = parser.parse_args(
        ["--smearing", "0.6", "--learnable-smearing", "on", "--polarizability", "one_step",
         "--long-range-options", '{"hidden_dim": 4, "smearing": 2.0}']
    )
    config = _config_from(args)
    assert config.long_range_options == LongRangeConfig(
        smearing=0.6, learnable_smearing=True, polarizability="one_step", hidden_dim=4
    )
    with pytest.raises(ValueError, match="smearing must be > 0"):
        _config_from(parser.parse_args(["--smearing", "-1"]))


def test_train_config_files_are_checked_and_save_load_keeps_the_config(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"long_range_options": {"charge_model": "qeq", "smearing": 0.9}}))
    config = TrainConfig.from_file(path)
    assert config.long_range_options == LongRangeConfig(charge_model="qeq", smearing=0.9)
    assert TrainConfig(**json.loads(json.dumps(config.to_dict()))) == config
    path.write_text(json.dumps({"long_range_options": {"charge_modle": "qeq"}}))
    with pytest.raises(ValueError, match="charge_modle"):
        TrainConfig.from_file(path)
    model = latent_lr.wrap(make_model().backbone.host, backbone="radial", config=config.long_range_options)
    latent_lr.save(model, tmp_path / "model.pt")
    assert latent_lr.load(tmp_path / "model.pt").long_range.config == config.long_range_options
