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


def _charged_doublet(**info):
    """H2O⁺ (9 electrons: 2S_z must be odd) with its charge and spin under non-default keys."""
    return _water(q=1.0, S2z=1, charge=0.0, spin=0, **info)


def _keyed_model(tmp_path):
    from latent_lr.info_keys import InfoKeys

    model = _model(spin_channel=True)
    model.info_keys = InfoKeys(total_charge="q", total_spin="S2z", multiplicity=None)
    latent_lr.save(model, tmp_path / "model.pt")
    return tmp_path / "model.pt"


def test_training_stores_its_charge_and_spin_keys_in_the_model_file(tmp_path):
    from latent_lr.info_keys import InfoKeys
    from latent_lr.training.trainer import build_model

    config = TrainConfig(train="a.xyz", backbone="radial", host_options={"cutoff": 4.0, "hidden_dim": 8},
                         long_range_options={"spin_channel": True}, total_charge_key="q", total_spin_key="S2z")
    model = build_model(config, [1, 8])
    assert model.info_keys == InfoKeys(total_charge="q", total_spin="S2z", multiplicity=None)
    latent_lr.save(model, tmp_path / "model.pt")
    assert latent_lr.load(tmp_path / "model.pt").info_keys == model.info_keys
    unkeyed = build_model(TrainConfig(train="a.xyz", backbone="radial"), [1, 8]).info_keys
    assert unkeyed == InfoKeys(total_charge="charge", total_spin=None, multiplicity=None)
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    del payload["config"]["info_keys"]  # a file written before the keys were stored
    torch.save(payload, tmp_path / "old.pt")
    assert latent_lr.load(tmp_path / "old.pt").info_keys == InfoKeys()


def test_predict_reads_the_stored_keys_unless_flags_override_them(tmp_path):
    from latent_lr.cli import main

    model_file = _keyed_model(tmp_path)
    ase.io.write(tmp_path / "in.xyz", [_charged_doublet()], format="extxyz")
    assert main(["predict", str(model_file), str(tmp_path / "in.xyz"), str(tmp_path / "out.xyz"), "--no-progress"]) == 0
    written = ase.io.read(tmp_path / "out.xyz")
    assert written.arrays["latent_charges"].sum() == pytest.approx(1.0, abs=1e-6)  # info['q'], not info['charge']
    assert written.arrays["latent_spins"].sum() == pytest.approx(1.0, abs=1e-6)  # info['S2z'], not info['spin']
    assert main(["predict", str(model_file), str(tmp_path / "in.xyz"), str(tmp_path / "flags.xyz"), "--no-progress",
                 "--total-charge-key", "charge", "--total-spin-key", "spin"]) == 0
    flagged = ase.io.read(tmp_path / "flags.xyz")
    assert flagged.arrays["latent_charges"].sum() == pytest.approx(0.0, abs=1e-6)
    assert flagged.arrays["latent_spins"].sum() == pytest.approx(0.0, abs=1e-6)


def test_calculator_reads_the_stored_keys_and_its_arguments_win(tmp_path):
    model = latent_lr.load(_keyed_model(tmp_path))
    atoms = _charged_doublet()
    atoms.calc = latent_lr.Calculator(model)
    assert atoms.calc.get_property("charges", atoms).sum() == pytest.approx(1.0, abs=1e-9)
    assert atoms.calc.get_property("magmom", atoms) == pytest.approx(1.0, abs=1e-9)
    atoms.info["S2z"] = -1  # a change of the stored key is a change of state
    assert atoms.calc.get_property("magmom", atoms) == pytest.approx(-1.0, abs=1e-9)
    atoms.calc = latent_lr.Calculator(model, charge=-1.0, spin=3)  # 11 electrons
    assert atoms.calc.get_property("charges", atoms).sum() == pytest.approx(-1.0, abs=1e-9)
    assert atoms.calc.get_property("magmom", atoms) == pytest.approx(3.0, abs=1e-9)


def test_sign_convention_reads_training_frames_whatever_keys_the_data_used(tmp_path):
    """Training frames carry the charge and spin under the default keys (info['charge'], info['spin']),
    so the sign convention reads those, not the model's stored data keys."""
    from latent_lr.sign_convention import latent_moments
    from latent_lr.training.dataset import LabelKeys, frame_from_atoms

    model = latent_lr.load(_keyed_model(tmp_path))
    keys = LabelKeys(energy=None, forces=None, total_charge="q", total_spin="S2z")
    frame = frame_from_atoms(_charged_doublet(), keys)
    charges, _ = latent_moments(model, [frame.atoms])
    assert charges[0].sum() == pytest.approx(1.0, abs=1e-9)
