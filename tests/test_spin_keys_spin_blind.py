"""Spin keys are read only by models that use them: a spin-blind model is bit-identical to the
pre-spin-channel code on data whose ``info['spin']`` follows another convention (fairchem/OMol25 store
the multiplicity there: a closed-shell molecule has spin = 1), and training a spin-channel model
without a spin key is refused instead of silently reading 2S_z = 0 everywhere."""

import ase.io
import numpy as np
import pytest
import torch
from ase.build import molecule

import latent_lr
from latent_lr.training.config import TrainConfig
from latent_lr.training.predict import predict_file


def _model(spin_channel: bool) -> latent_lr.LongRangeModel:
    torch.manual_seed(0)
    host = latent_lr.RadialPotential([1, 8], cutoff=4.0, hidden_dim=8, n_layers=1)
    return latent_lr.wrap(host, spin_channel=spin_channel).double().eval()


def _water(**info):
    atoms = molecule("H2O")
    atoms.info.update(info)
    return atoms


def test_spin_blind_calculator_ignores_foreign_spin_conventions():
    model = _model(spin_channel=False)
    reference = _water()
    reference.calc = latent_lr.Calculator(model)
    for info in ({"spin": 1}, {"spin": 0.5}, {"multiplicity": 2}, {"spin": "up"}):  # impossible as 2S_z / 2S+1 for 10 electrons
        atoms = _water(**info)
        atoms.calc = latent_lr.Calculator(model)
        assert atoms.get_potential_energy() == reference.get_potential_energy()
        np.testing.assert_array_equal(atoms.get_forces(), reference.get_forces())  # a second call: check_state


def test_spin_channel_calculator_still_checks_the_spin():
    atoms = _water(spin=1)
    atoms.calc = latent_lr.Calculator(_model(spin_channel=True))
    with pytest.raises(ValueError, match="must be even"):
        atoms.get_potential_energy()


def test_spin_blind_predict_ignores_foreign_spin_conventions(tmp_path):
    model = _model(spin_channel=False)
    latent_lr.save(model, tmp_path / "model.pt")
    ase.io.write(tmp_path / "in.xyz", [_water(spin=1), _water()], format="extxyz")
    predict_file(tmp_path / "model.pt", tmp_path / "in.xyz", tmp_path / "out.xyz")
    first, second = ase.io.read(tmp_path / "out.xyz", ":")
    np.testing.assert_array_equal(first.arrays["latent_charges"], second.arrays["latent_charges"])


def test_training_a_spin_channel_model_needs_a_spin_key():
    with pytest.raises(ValueError, match="--total-spin-key"):
        TrainConfig(train="a.xyz", long_range_options={"spin_channel": True})
    TrainConfig(train="a.xyz", long_range_options={"spin_channel": True}, multiplicity_key="mult")
    TrainConfig(train="a.xyz")


def test_spin_blind_sign_convention_ignores_foreign_spin_conventions():
    from latent_lr.sign_convention import apply_sign_convention

    decision = apply_sign_convention(_model(spin_channel=False), [_water(spin=1), _water(spin=0.5)])
    assert decision.rule
