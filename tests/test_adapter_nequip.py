"""NequIP adapter against nequip itself (small random models), finite differences, symmetry, save/load, training."""

import os
import random

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

pytest.importorskip("nequip")
SPECIES = [1, 6, 8, 11, 17]
SHIFTS = {"H": -1.5, "C": -3.25, "O": -2.0, "Na": -0.75, "Cl": -1.25}
SCALES = {"H": 0.7, "C": 1.1, "O": 1.3, "Na": 0.9, "Cl": 1.2}


@pytest.fixture(scope="module")
def adapter():
    return adapter_class("nequip")


@pytest.fixture(scope="module")
def host(adapter):
    torch.manual_seed(0)
    return adapter.default_host(SPECIES, per_type_energy_shifts=SHIFTS, per_type_energy_scales=SCALES)


@pytest.fixture(scope="module")
def model(host):
    return latent_lr.wrap(host).eval()


salt = triclinic_salt


def global_state():
    import e3nn
    from nequip.utils import global_state as nequip_state

    return (
        torch.get_default_dtype(),
        dict(os.environ),
        torch.random.get_rng_state(),
        np.random.get_state()[1].copy(),
        random.getstate(),
        e3nn.get_optimization_defaults(),
        nequip_state.global_state_initialized(),
        torch.multiprocessing.get_sharing_strategy(),
    )


def test_wrap_detects_nequip_and_leaks_no_global_state(adapter):
    before = global_state()
    assert before[0] == torch.float32
    host = adapter.default_host(SPECIES, seed=3)  # an explicit seed: no draw from torch's generator
    odd = adapter.default_host(SPECIES, seed=3, parity=True)
    model = latent_lr.wrap(host, long_range=False).eval()
    out = model(AtomsBatch.from_atoms([molecule("H2O"), salt()]))
    after = global_state()
    assert after[0] == before[0] and after[1] == before[1] and after[4] == before[4] and after[5:] == before[5:]
    assert torch.equal(after[2], before[2]) and np.array_equal(after[3], before[3])
    assert model.backbone.name == "nequip" and type(model.backbone).__name__ == "NequipBackbone"
    assert model.backbone.feature_dim == 32  # 16 scalars after each of the two convolutions
    assert latent_lr.wrap(odd).backbone.feature_dim == 32  # 0o channels are not features
    assert model.backbone.cutoff == 5.0 and out["energy"].dtype == torch.float64


def nequip_own(host, atoms):
    """Energy, forces, stress from nequip's ASE calculator (its data conversion, neighbour list, ForceStressOutput)."""
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
    from nequip.integrations.ase import NequIPCalculator

    with isolated_global_state():
        torch.set_default_dtype(torch.float64)
        transforms = [
            ChemicalSpeciesToAtomTypeMapper(model_type_names=host.type_names),
            NeighborListTransform(r_max=5.0, backend="ase"),
        ]
        calc = NequIPCalculator(host.eval(), device="cpu", transforms=transforms)
        calc.calculate(atoms.copy(), ["energy", "forces", "stress"])
        return calc.results


def test_host_part_equals_nequip_own_energy_forces_stress(host):
    crystal, ethanol = salt(), molecule("CH3CH2OH")
    short = latent_lr.wrap(host, long_range=False).eval()
    ours = short(AtomsBatch.from_atoms([crystal, ethanol]))
    forces = np.split(ours["forces"].numpy(), [len(crystal)])
    for index, atoms in enumerate([crystal, ethanol]):
        reference = nequip_own(host, atoms)
        assert ours["energy"][index].item() == pytest.approx(float(reference["energy"]), abs=1e-10)
        np.testing.assert_allclose(forces[index], reference["forces"], atol=1e-10, rtol=0)
    stress = latent_lr.Calculator(short).get_stress(crystal)
    np.testing.assert_allclose(stress, nequip_own(host, crystal)["stress"], atol=1e-10, rtol=0)
    # the per-type scales and shifts are part of the host energy
    single = AtomsBatch.from_atoms(Atoms("Na", positions=[[0, 0, 0]]))
    assert short(single, compute_forces=False)["energy"].item() == pytest.approx(SHIFTS["Na"], abs=1e-12)


@pytest.mark.parametrize("atoms", [molecule("CH3CH2OH"), salt()], ids=["molecule", "triclinic"])
def test_forces_match_finite_differences(model, atoms):
    assert_forces_match_finite_differences(model, atoms)


def test_stress_with_long_range_matches_finite_strain(model, host):
    assert_long_range_stress_matches_finite_strain(model, host)


def test_rotation_invariance_and_equivariance(model):
    rotation = Rotation.random(random_state=3).as_matrix()
    ethanol, crystal = molecule("CH3CH2OH"), salt()
    turned = [atoms.copy() for atoms in (ethanol, crystal)]
    for atoms in turned:
        atoms.positions = atoms.positions @ rotation.T
        atoms.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
    a = model(AtomsBatch.from_atoms([ethanol, crystal]))
    b = model(AtomsBatch.from_atoms(turned))
    torch.testing.assert_close(b["energy"], a["energy"], atol=1e-9, rtol=0)
    np.testing.assert_allclose(b["forces"].numpy(), a["forces"].numpy() @ rotation.T, atol=1e-9)
    np.testing.assert_allclose(b["stress"][1].numpy(), rotation @ a["stress"][1].numpy() @ rotation.T, atol=1e-10)
    np.testing.assert_allclose(b["dipole"][0].numpy(), rotation @ a["dipole"][0].numpy(), atol=1e-9)


def test_bec_rotation_and_sum_rule(model):
    assert_rotation_equivariance_and_bec_sum_rule(model)


def test_long_range_sees_beyond_the_cutoff(model):
    assert_long_range_sees_beyond_the_cutoff(model)


def test_save_load_is_exact(model, tmp_path):
    latent_lr.save(model, tmp_path / "nequip.pt")
    loaded = latent_lr.load(tmp_path / "nequip.pt").eval()
    assert loaded.backbone.host_config() == model.backbone.host_config()
    data = AtomsBatch.from_atoms([salt(), molecule("CH3CH2OH")])
    expected, got = model(data), loaded(data)
    assert torch.equal(expected["energy"], got["energy"]) and torch.equal(expected["forces"], got["forces"])
    assert torch.get_default_dtype() == torch.float32


def test_foreign_host_needs_its_config_and_custom_type_names(adapter, host, tmp_path):
    config = host._latent_lr_config["model"]
    renamed = dict(config, type_names=["typeH", "typeC", "typeO", "typeNa", "typeCl"])
    for key in ("per_type_energy_shifts", "per_type_energy_scales"):
        renamed[key] = {f"type{symbol}": value for symbol, value in config[key].items()}
    species_map = {symbol: f"type{symbol}" for symbol in SHIFTS}
    foreign = adapter.build_host({"model": renamed, "chemical_species_to_atom_type_map": species_map})
    del foreign._latent_lr_config  # as if built by nequip directly
    with pytest.raises(ValueError, match="not chemical symbols"):
        latent_lr.wrap(foreign)
    model = latent_lr.wrap(foreign, long_range=False, adapter_options={"chemical_species_to_atom_type_map": species_map})
    with pytest.raises(ValueError, match="hyper-parameters are unknown"):
        latent_lr.save(model, tmp_path / "foreign.pt")
    model = latent_lr.wrap(
        foreign, long_range=False,
        adapter_options={"chemical_species_to_atom_type_map": species_map, "config": renamed},
    ).eval()
    data = AtomsBatch.from_atoms([salt(), molecule("CH3CH2OH")])
    reference = latent_lr.wrap(host, long_range=False).eval()(data)
    torch.testing.assert_close(model(data)["energy"], reference["energy"], atol=1e-12, rtol=0)
    latent_lr.save(model, tmp_path / "foreign.pt")
    assert torch.equal(latent_lr.load(tmp_path / "foreign.pt").eval()(data)["energy"], model(data)["energy"])


def test_unknown_element_and_bad_builder_are_clear_errors(model, adapter):
    with pytest.raises(ValueError, match=r"\[79\] are unknown to this NequIP model \(it knows \[1, 6, 8, 11, 17\]\)"):
        model(AtomsBatch.from_atoms(Atoms("Au2", positions=[[0, 0, 0], [2.6, 0, 0]])))
    with pytest.raises(ValueError, match="only nequip classes"):
        adapter.build_host({"model": {"_target_": "nequip.model.NequIPGNNModel", "pair_potential": {"_target_": "os.system"}}})


def test_train_cli_builds_and_trains_nequip(tmp_path):
    from latent_lr.cli import main
    from latent_lr.synthetic import write_dataset

    data = write_dataset(tmp_path / "data", n_train=12, n_test=4, seed=2)
    out = tmp_path / "run"
    main([
        "train", "--train", str(data["train"]), "--test", str(data["test"]), "--epochs", "2", "--out", str(out),
        "--backbone", "nequip", "--host-options", '{"num_features": 8, "radial_mlp_width": 16}',
        "--no-progress", "--batch-size", "4",
    ])
    model = latent_lr.load(out / "best_model.pt")
    assert model.backbone.name == "nequip" and model.backbone.feature_dim == 16
    assert len((out / "log.csv").read_text().strip().splitlines()) == 3
    assert torch.get_default_dtype() == torch.float32
