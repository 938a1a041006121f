"""Wrapped model physics with the built-in radial backbone (no backbone package needed).

References: finite differences (ASE), symmetry, sum rules and locality.
"""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from scipy.spatial.transform import Rotation

import latent_lr
from latent_lr import AtomsBatch

SPECIES = [1, 6, 7, 8, 11, 17]


def make_model(seed=0, **options):
    torch.manual_seed(seed)
    host = latent_lr.RadialPotential(species=SPECIES, cutoff=3.5, hidden_dim=16).double()
    return latent_lr.wrap(host, **options)


@pytest.fixture(scope="module")
def model():
    return make_model().eval()


def rattled_salt():
    crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    crystal.cell[0, 1] = 0.5  # triclinic
    crystal.rattle(0.1, seed=3)
    return crystal


def test_wrap_is_one_line_and_energy_is_the_sum(model):
    out = model(AtomsBatch.from_atoms(molecule("CH3CH2OH")))
    assert isinstance(model, latent_lr.LongRangeModel)
    assert torch.allclose(out["energy"], out["host_energy"] + out["long_range_energy"])
    assert out["long_range_energy"].abs().item() > 0


@pytest.mark.parametrize("atoms", [molecule("CH3CH2OH"), rattled_salt()], ids=["molecule", "triclinic"])
def test_forces_match_finite_differences(model, atoms):
    atoms.calc = latent_lr.Calculator(model)
    np.testing.assert_allclose(atoms.get_forces(), calculate_numerical_forces(atoms, 1e-4), atol=1e-7)


def test_stress_includes_long_range_and_matches_finite_strain(model):
    atoms = rattled_salt()
    atoms.calc = latent_lr.Calculator(model)
    np.testing.assert_allclose(atoms.get_stress(), calculate_numerical_stress(atoms, 1e-5), atol=1e-8)
    short = latent_lr.wrap(model.backbone, long_range=False).eval()
    atoms.calc = latent_lr.Calculator(short)
    assert np.abs(atoms.get_stress() - calculate_numerical_stress(atoms, 1e-5)).max() < 1e-8
    long_range_stress = latent_lr.Calculator(model).get_stress(atoms) - atoms.get_stress()
    assert np.abs(long_range_stress).max() > 1e-6


def rotated(atoms, rotation):
    atoms = atoms.copy()
    atoms.positions = atoms.positions @ rotation.T
    if atoms.pbc.any():
        atoms.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
    return atoms


@pytest.mark.parametrize("periodic", [False, True])
def test_rotation_invariance_and_equivariance(model, periodic):
    atoms = rattled_salt() if periodic else molecule("CH3CH2OH")
    rotation = Rotation.random(random_state=7).as_matrix()
    calc = latent_lr.Calculator(model)
    props = ["energy", "forces", "dipole", "bec", "charges"]
    calc.calculate(atoms, props)
    a = dict(calc.results)
    calc.reset()
    calc.calculate(rotated(atoms, rotation), props)
    b = dict(calc.results)
    assert b["energy"] == pytest.approx(a["energy"], abs=1e-9)
    np.testing.assert_allclose(b["charges"], a["charges"], atol=1e-10)
    np.testing.assert_allclose(b["forces"], a["forces"] @ rotation.T, atol=1e-9)
    np.testing.assert_allclose(b["dipole"], rotation @ a["dipole"], atol=1e-9)
    np.testing.assert_allclose(b["bec"], rotation @ a["bec"] @ rotation.T, atol=1e-9)


@pytest.mark.parametrize("charge", [0.0, 1.0, -2.0])
def test_total_charge_and_acoustic_sum_rule_for_molecules(model, charge):
    atoms = molecule("CH3CH2OH")
    atoms.info["charge"] = charge
    out = model(AtomsBatch.from_atoms(atoms), compute_bec=True)
    assert out["charges"].sum().item() == pytest.approx(charge, abs=1e-10)
    np.testing.assert_allclose(out["bec"].sum(0).numpy(), charge * np.eye(3), atol=1e-10)
    # The BEC is the derivative of the dipole: check one column by finite differences.
    positions = torch.tensor(atoms.positions)
    step = 1e-5
    dipoles = []
    for sign in (1, -1):
        shifted = atoms.copy()
        shifted.positions[2, 1] += sign * step
        dipoles.append(model(AtomsBatch.from_atoms(shifted), compute_forces=False)["dipole"][0])
    numerical = (dipoles[0] - dipoles[1]) / (2 * step)
    np.testing.assert_allclose(out["bec"][2, :, 1].numpy(), numerical.numpy(), atol=1e-7)
    assert positions.shape[0] == len(atoms)


def test_periodic_bec_of_molecule_in_large_box_matches_open_boundary(model):
    atoms = molecule("CH3CH2OH")
    open_bec = model(AtomsBatch.from_atoms(atoms), compute_bec=True)["bec"]
    boxed = atoms.copy()
    boxed.set_cell(np.eye(3) * 40.0)
    boxed.center()
    boxed.pbc = True
    data = AtomsBatch.from_atoms(boxed)
    out = model(data, compute_bec=True)
    # The Berry-branch weighting (L/2π) sin(2πx/L) departs from x by ~(2πd/L)²/6 ≈ 2 %
    # of the charge-flow term for atoms d ≈ 2 Å from the molecule's centre.
    np.testing.assert_allclose(out["bec"].numpy(), open_bec.numpy(), atol=5e-3)
    np.testing.assert_allclose(out["bec"].sum(0).numpy(), np.zeros((3, 3)), atol=1e-10)


def test_long_range_reaches_beyond_the_host_cutoff(model):
    def pair(distance):
        atoms = molecule("H2O") + molecule("NH3")
        atoms.positions[3:] += [distance, 0.0, 0.0]
        return model(AtomsBatch.from_atoms(atoms), compute_forces=False)

    near, far = pair(12.0), pair(20.0)
    assert near["host_energy"].item() == pytest.approx(far["host_energy"].item(), abs=1e-10)
    assert abs(near["energy"].item() - far["energy"].item()) > 1e-6


def test_save_load_round_trip_is_exact(model, tmp_path):
    path = tmp_path / "model.pt"
    latent_lr.save(model, path)
    loaded = latent_lr.load(path).eval()
    data = AtomsBatch.from_atoms([molecule("CH3CH2OH"), rattled_salt()])
    a, b = model(data), loaded(data)
    assert torch.equal(a["energy"], b["energy"])
    assert torch.equal(a["forces"], b["forces"])


def test_batched_prediction_equals_single(model):
    structures = [molecule("CH3CH2OH"), rattled_salt(), molecule("H2O")]
    batched = model(AtomsBatch.from_atoms(structures))
    singles = [model(AtomsBatch.from_atoms(s)) for s in structures]
    assert torch.allclose(batched["energy"], torch.cat([s["energy"] for s in singles]), atol=1e-10)
    assert torch.allclose(batched["forces"], torch.cat([s["forces"] for s in singles]), atol=1e-10)


def test_training_updates_host_and_head_through_forces():
    model = make_model(seed=1).train()
    data = AtomsBatch.from_atoms([molecule("CH3CH2OH"), rattled_salt()])
    target = torch.zeros(data.positions.shape[0], 3, dtype=torch.float64)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimiser.zero_grad()
        loss = ((model(data)["forces"] - target) ** 2).mean()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(n.startswith("backbone.") for n in changed)
    assert any(n.startswith("long_range.charge_head") for n in changed)


def test_frozen_host_trains_only_the_head():
    model = make_model(seed=2, freeze_host=True).train()
    data = AtomsBatch.from_atoms(molecule("CH3CH2OH"))
    host_before = [p.detach().clone() for p in model.backbone.parameters()]
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(data)["energy"].pow(2).sum()
    loss.backward()
    optimiser.step()
    assert all(torch.equal(a, b) for a, b in zip(host_before, model.backbone.parameters()))


def test_learnable_smearing_gets_a_gradient():
    model = make_model(seed=3, learnable_smearing=True).train()
    model(AtomsBatch.from_atoms(rattled_salt()))["energy"].sum().backward()
    assert model.long_range.log_smearing.grad is not None
    assert model.long_range.log_smearing.grad.abs().item() > 0


def test_inference_builds_no_second_order_graph(model):
    out = model(AtomsBatch.from_atoms(rattled_salt()), compute_bec=True)
    assert not any(v.requires_grad for v in out.values())


def test_unknown_element_is_a_clear_error(model):
    with pytest.raises(ValueError, match="unknown"):
        model(AtomsBatch.from_atoms(Atoms("Au2", positions=[[0, 0, 0], [2.5, 0, 0]])))


def test_empty_structure_is_a_clear_error(model):
    with pytest.raises(ValueError, match="no atoms"):
        AtomsBatch.from_atoms([molecule("H2O"), Atoms()])


def test_nan_positions_are_a_clear_error(model):
    atoms = molecule("H2O")
    atoms.positions[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model(AtomsBatch.from_atoms(atoms))


@pytest.mark.parametrize("redistribution", ["uniform", "learned", "fragments"])
def test_total_charge_is_reproduced_for_any_structure_and_charge(redistribution):
    model = make_model(seed=4, charge_redistribution=redistribution).eval()
    structures = [molecule("CH3CH2OH"), rattled_salt(), molecule("H2O")]
    for atoms, charge in zip(structures, [1.0, -2.5, 0.3]):
        atoms.info["charge"] = charge
    out = model(AtomsBatch.from_atoms(structures), compute_forces=False)
    batch = AtomsBatch.from_atoms(structures).batch
    totals = torch.zeros(3, dtype=torch.float64).index_add(0, batch, out["charges"])
    torch.testing.assert_close(totals, torch.tensor([1.0, -2.5, 0.3], dtype=torch.float64), atol=1e-10, rtol=0)


def test_learned_redistribution_is_not_a_uniform_shift():
    model = make_model(seed=5).eval()
    atoms = molecule("CH3CH2OH")
    neutral = model(AtomsBatch.from_atoms(atoms), compute_forces=False)["charges"]
    atoms.info["charge"] = 1.0
    charged = model(AtomsBatch.from_atoms(atoms), compute_forces=False)["charges"]
    shift = charged - neutral
    assert shift.min() > 0 and shift.std() > 1e-3
