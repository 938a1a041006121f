"""MACE adapter against mace-torch itself (small random model), finite differences and symmetry."""

import os

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from scipy.spatial.transform import Rotation

import latent_lr
from adapter_checks import (
    assert_forces_match_finite_differences,
    assert_long_range_sees_beyond_the_cutoff,
    assert_long_range_stress_matches_finite_strain,
    assert_rotation_equivariance_and_bec_sum_rule,
    triclinic_salt,
)
from latent_lr import AtomsBatch
from latent_lr.backbone import adapter_class, isolated_global_state

pytest.importorskip("mace")
SPECIES = [1, 6, 8, 11, 17]


@pytest.fixture(scope="module")
def host():
    torch.manual_seed(0)
    return adapter_class("mace").default_host(SPECIES)


@pytest.fixture(scope="module")
def model(host):
    return latent_lr.wrap(host).eval()


salt = triclinic_salt


def test_wrap_detects_mace_and_leaks_no_global_state(host):
    before = (torch.get_default_dtype(), os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"))
    model = latent_lr.wrap(host)
    model.eval()(AtomsBatch.from_atoms(molecule("H2O")))
    assert model.backbone.name == "mace"
    assert model.backbone.feature_dim == 32  # 16 scalars from each of the two layers
    assert (torch.get_default_dtype(), os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")) == before


def test_host_part_equals_mace_own_energy_forces_stress(host):
    from mace import data as mace_data
    from mace.tools import AtomicNumberTable, torch_geometric

    atoms = salt()
    with isolated_global_state():
        torch.set_default_dtype(torch.float64)
        config = mace_data.config_from_atoms(atoms)
        graph = mace_data.AtomicData.from_config(config, z_table=AtomicNumberTable(SPECIES), cutoff=5.0)
        batch = next(iter(torch_geometric.dataloader.DataLoader([graph], batch_size=1)))
        reference = host(batch.to_dict(), compute_force=True, compute_stress=True)
    ours = latent_lr.wrap(host, long_range=False).eval()(AtomsBatch.from_atoms(atoms))
    assert ours["energy"].item() == pytest.approx(reference["energy"].item(), abs=1e-10)
    torch.testing.assert_close(ours["forces"], reference["forces"].detach(), atol=1e-10, rtol=0)
    torch.testing.assert_close(ours["stress"], reference["stress"].detach(), atol=1e-10, rtol=0)


@pytest.mark.parametrize("atoms", [molecule("CH3CH2OH"), salt()], ids=["molecule", "triclinic"])
def test_forces_match_finite_differences(model, atoms):
    assert_forces_match_finite_differences(model, atoms)


def test_stress_with_long_range_matches_finite_strain(model, host):
    assert_long_range_stress_matches_finite_strain(model, host)


def test_rotation_and_bec(model):
    assert_rotation_equivariance_and_bec_sum_rule(model)


def test_long_range_sees_beyond_the_cutoff(model):
    assert_long_range_sees_beyond_the_cutoff(model)


def test_save_load_is_exact(model, tmp_path):
    latent_lr.save(model, tmp_path / "mace.pt")
    loaded = latent_lr.load(tmp_path / "mace.pt").eval()
    data = AtomsBatch.from_atoms([salt(), molecule("CH3CH2OH")])
    assert torch.equal(model(data)["energy"], loaded(data)["energy"])


def test_unknown_element_is_a_clear_error(model):
    with pytest.raises(ValueError, match="unknown to this MACE model"):
        model(AtomsBatch.from_atoms(Atoms("Au2", positions=[[0, 0, 0], [2.6, 0, 0]])))
