"""Charged systems: the "none" baseline, the batched CG solver and charge equilibration.

References are independent of the code under test: numpy KKT solves with a
Coulomb matrix built from erf(r/(√2σ))/r, finite differences and linear algebra.
"""

import numpy as np
import pytest
import torch
from ase.build import molecule

import latent_lr
from latent_lr import AtomsBatch

SPECIES = [1, 6, 7, 8, 11, 17]


def make_model(seed=0, **options):
    torch.manual_seed(seed)
    host = latent_lr.RadialPotential(species=SPECIES, cutoff=3.5, hidden_dim=16).double()
    return latent_lr.wrap(host, **options)


def test_no_redistribution_ignores_the_total_charge():
    model = make_model(seed=4, charge_redistribution="none").eval()
    atoms = molecule("CH3CH2OH")
    neutral = model(AtomsBatch.from_atoms(atoms), compute_forces=False)["charges"]
    atoms.info["charge"] = 1.0
    charged = model(AtomsBatch.from_atoms(atoms), compute_forces=False)["charges"]
    torch.testing.assert_close(charged, neutral, atol=0, rtol=0)
    assert abs(neutral.sum().item()) > 1e-6  # raw charges: nothing forces them to sum to 0


def test_unknown_redistribution_is_a_clear_error():
    with pytest.raises(ValueError, match="redistribution must be one of"):
        make_model(charge_redistribution="fukui")
