"""The domain-decomposed evaluation (latent_lr.domain_decomposition) on one process equals the model.

One "rank" owns every atom of a periodic cell and sees periodic images as
ghosts out to the decomposition's ghost cut-off (built here with NumPy, not by
the code under test); the allreduce is the identity.  Reference: the wrapped
model itself (energy, forces, charges, virial = -V × stress), for the three total-charge
redistributions and both charge signs, in a triclinic cell with a net charge.  The multi-rank case
runs under mpiexec in tests/test_lammps_mpi.py.  From 300 atoms the k-space sum is the
distributed PME one (mesh spread per rank, summed, solved, interpolated); it must
equal the model to round-off (same mesh) and an Ewald decomposition of the same box
to the engine accuracy (an independent k-space sum).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from md_structures import make_model, triclinic_water, water_box

import latent_lr
from latent_lr.domain_decomposition import DecomposedModel, Subdomain
from latent_lr.errors import UserInputError


def one_rank_subdomain(atoms, cutoff: float, spans=(False, False, False)) -> Subdomain:
    """All atoms local; ghosts: periodic images within ``cutoff`` of some atom of the cell."""
    cell, count = atoms.cell.array, len(atoms)
    heights = abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(np.roll(cell, -1, 0), np.roll(cell, -2, 0)), axis=1)
    reach = np.ceil(cutoff / heights).astype(int) + 1
    positions, tags = [atoms.positions], [np.arange(1, count + 1)]
    for shift in itertools.product(*[range(-n, n + 1) for n in reach]):
        if shift == (0, 0, 0):
            continue
        image = atoms.positions + np.array(shift) @ cell
        distance = np.linalg.norm(image[:, None, :] - atoms.positions[None], axis=2).min(axis=1)
        positions.append(image[distance < cutoff])
        tags.append(np.arange(1, count + 1)[distance < cutoff])
    tag = np.concatenate(tags)
    return Subdomain(
        positions=torch.tensor(np.concatenate(positions)), numbers=torch.tensor(atoms.numbers[tag - 1]),
        tags=torch.tensor(tag), n_local=count, cell=torch.tensor(cell), n_atoms=count,
        total_charge=float(atoms.info["charge"]), spans=spans,
    )


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("redistribution", ["learned", "uniform", "none"])
def test_one_rank_decomposition_equals_the_model(redistribution, sign):
    model = make_model(seed=0, charge_redistribution=redistribution)
    model.long_range.charge_sign.fill_(sign)  # the sign convention's gauge (with a net charge it changes the energy)
    atoms = triclinic_water()
    atoms.info["charge"] = 1.0
    reference = model(latent_lr.AtomsBatch.from_atoms(atoms))
    scale = float(reference["forces"].abs().max())
    for charge_transfer in (True, False):
        decomposed = DecomposedModel(model, allreduce=lambda values: values, charge_transfer_forces=charge_transfer)
        subdomain = one_rank_subdomain(atoms, decomposed.ghost_cutoff(atoms.cell.array, len(atoms)))
        assert len(subdomain.positions) > 5 * len(atoms)  # ghosts reach well beyond the cell
        energy, forces, charges, virial = decomposed(subdomain)
        assert energy == pytest.approx(float(reference["energy"][0]), rel=1e-12)
        torch.testing.assert_close(charges, reference["charges"], rtol=0, atol=1e-12)
        error = float((forces - reference["forces"]).abs().max())
        if charge_transfer:
            assert error <= 1e-12 * scale
            expected_virial = -atoms.get_volume() * reference["stress"][0]  # W = -V σ, eV
            torch.testing.assert_close(virial, expected_virial, rtol=0, atol=1e-11 * float(expected_virial.abs().max()))
        else:  # the charge-transfer term −Σ φ_i ∂q_i/∂r is a large part of the forces
            assert error > 1e-2 * scale


@pytest.mark.parametrize("spans", [(True, True, True), (False, True, True)])
def test_host_periodic_along_the_directions_a_subdomain_spans(spans):
    """The host sees one copy of each atom, periodic along ``spans``, instead of ghost images there."""
    model = make_model(seed=0)
    atoms = triclinic_water()
    atoms.info["charge"] = 1.0
    reference = model(latent_lr.AtomsBatch.from_atoms(atoms))
    decomposed = DecomposedModel(model, allreduce=lambda values: values)
    cutoff = decomposed.ghost_cutoff(atoms.cell.array, len(atoms))
    host_inputs = []
    host_energies = model.backbone.per_atom_energies
    model.backbone.per_atom_energies = lambda batch: (host_inputs.append(batch), host_energies(batch))[1]
    decomposed(one_rank_subdomain(atoms, cutoff))
    energy, forces, _, virial = decomposed(one_rank_subdomain(atoms, cutoff, spans))
    del model.backbone.per_atom_energies
    open_cluster, periodic_cluster = host_inputs
    assert periodic_cluster.pbc[0].tolist() == list(spans)
    if all(spans):
        assert len(periodic_cluster.positions) == len(atoms)  # no ghosts at all
    else:
        assert len(atoms) < len(periodic_cluster.positions) < 0.7 * len(open_cluster.positions)
    assert energy == pytest.approx(float(reference["energy"][0]), rel=1e-12)
    assert float((forces - reference["forces"]).abs().max()) <= 1e-12 * float(reference["forces"].abs().max())
    expected_virial = -atoms.get_volume() * reference["stress"][0]
    torch.testing.assert_close(virial, expected_virial, rtol=0, atol=1e-11 * float(expected_virial.abs().max()))


def test_pme_decomposition_equals_the_model_and_ewald_to_the_engine_accuracy():
    model = make_model(seed=0)
    atoms = water_box(100)  # 300 atoms: the engine and the decomposition use PME
    atoms.info["charge"] = 1.0
    reference = model(latent_lr.AtomsBatch.from_atoms(atoms))
    scale = float(reference["forces"].abs().max())
    expected_virial = -atoms.get_volume() * reference["stress"][0]
    results = {}
    for method in ("auto", "ewald"):
        decomposed = DecomposedModel(model, allreduce=lambda values: values, method=method)
        cutoff = decomposed.ghost_cutoff(atoms.cell.array, len(atoms))
        results[method] = cutoff, decomposed(one_rank_subdomain(atoms, cutoff))
    (pme_cutoff, (energy, forces, charges, virial)), (ewald_cutoff, ewald) = results["auto"], results["ewald"]
    assert pme_cutoff < 0.7 * ewald_cutoff  # the point of PME here: a thinner ghost shell
    assert energy == pytest.approx(float(reference["energy"][0]), rel=1e-12)
    torch.testing.assert_close(charges, reference["charges"], rtol=0, atol=1e-12)
    assert float((forces - reference["forces"]).abs().max()) <= 1e-12 * scale
    torch.testing.assert_close(virial, expected_virial, rtol=0, atol=1e-11 * float(expected_virial.abs().max()))
    accuracy = model.long_range.accuracy
    assert ewald[0] == pytest.approx(energy, rel=accuracy)
    assert float((ewald[1] - forces).abs().max()) <= accuracy * scale
    assert float((ewald[3] - virial).abs().max()) <= accuracy * float(virial.abs().max())
    without = DecomposedModel(model, allreduce=lambda values: values, charge_transfer_forces=False)
    assert float((without(one_rank_subdomain(atoms, pme_cutoff))[1] - forces).abs().max()) > 1e-2 * scale


def test_unsupported_models_are_refused():
    with pytest.raises(UserInputError, match="polarisabilities"):
        DecomposedModel(make_model(polarizability="one_step"), allreduce=lambda values: values)
    with pytest.raises(UserInputError, match="latent charges"):
        DecomposedModel(make_model(charge_model="qeq"), allreduce=lambda values: values)
    with pytest.raises(UserInputError, match="charge_redistribution='fragments'"):
        DecomposedModel(make_model(charge_redistribution="fragments"), allreduce=lambda values: values)
    with pytest.raises(UserInputError, match="external field is not supported on several MPI ranks"):
        DecomposedModel(make_model(), allreduce=lambda values: values, external_field=np.array([0.0, 0.0, 0.1]))
    DecomposedModel(make_model(), allreduce=lambda values: values, external_field=np.zeros(3))  # no field: fine


def test_ghosts_that_no_longer_reach_far_enough_are_an_error():
    model = make_model(seed=0)
    atoms = triclinic_water()
    atoms.info["charge"] = 0.0
    decomposed = DecomposedModel(model, allreduce=lambda values: values)
    needed = decomposed.ghost_cutoff(atoms.cell.array, len(atoms))
    subdomain = one_rank_subdomain(atoms, needed)
    decomposed.ghost_reach = needed  # as attach sets it: the evaluation runs
    decomposed(subdomain)
    decomposed.ghost_reach = 0.9 * needed  # a box that grew under a barostat needs more than LAMMPS was told
    with pytest.raises(UserInputError, match="the box grew"):
        decomposed(subdomain)


def test_smearing_and_charge_sign_are_read_at_call_time():
    """A learnable smearing changed (and the charge sign flipped) after the decomposition was built
    gives the model's new energy, not the one of the values at construction."""
    model = make_model(seed=0, learnable_smearing=True)
    atoms = triclinic_water()
    atoms.info["charge"] = 1.0
    decomposed = DecomposedModel(model, allreduce=lambda values: values)
    before = decomposed(one_rank_subdomain(atoms, decomposed.ghost_cutoff(atoms.cell.array, len(atoms))))[0]
    with torch.no_grad():
        model.long_range.log_smearing.add_(np.log(1.3))
    model.long_range.charge_sign.fill_(-1.0)
    reference = model(latent_lr.AtomsBatch.from_atoms(atoms))
    energy, forces, charges, _ = decomposed(one_rank_subdomain(atoms, decomposed.ghost_cutoff(atoms.cell.array, len(atoms))))
    assert abs(energy - before) > 1e-3
    assert energy == pytest.approx(float(reference["energy"][0]), rel=1e-12)
    torch.testing.assert_close(charges, reference["charges"], rtol=0, atol=1e-12)
    assert float((forces - reference["forces"]).abs().max()) <= 1e-12 * float(reference["forces"].abs().max())
