"""``predict_frames`` returns the joint model's induced dipoles per frame.

Reference: the sum rule of an open structure's dipole, M = Σ q_i r_i + Σ p_i,
evaluated here from the returned charges, dipoles and the input positions.
"""

import numpy as np
from ase.build import molecule
from test_model_radial import make_model  # the tiny radial test backbone

from latent_lr.training.dataset import LabelKeys, frame_from_atoms
from latent_lr.training.metrics import predict_frames


def test_induced_dipoles_are_per_atom_and_close_the_dipole_sum_rule():
    model = make_model(seed=11, charge_model="qeq_dipoles")
    structures = [molecule("CH3CH2OH"), molecule("H2O"), molecule("CH4")]
    for index, atoms in enumerate(structures):
        atoms.rattle(0.05, seed=index)
    frames = [frame_from_atoms(atoms, LabelKeys()) for atoms in structures]
    predictions = predict_frames(model, frames, batch_size=2)  # one batch of two, one of one
    assert len(predictions["induced_dipoles"]) == len(structures)
    for atoms, charges, dipoles, moment in zip(
        structures, predictions["charges"], predictions["induced_dipoles"], predictions["dipole"]
    ):
        assert dipoles.shape == (len(atoms), 3)
        assert np.abs(dipoles).max() > 1e-4  # the dipoles are really there
        np.testing.assert_allclose(moment, charges @ atoms.positions + dipoles.sum(axis=0), atol=1e-9)


def test_models_without_dipoles_return_none():
    model = make_model(seed=11)
    predictions = predict_frames(model, [frame_from_atoms(molecule("H2O"), LabelKeys())])
    assert "induced_dipoles" not in predictions
