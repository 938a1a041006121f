"""The deployable Ewald core under TorchScript (with a save/load round trip) and
torch.compile matches the eager engine, which tests/test_engine_physics.py and
tests/test_electrostatics_accuracy.py check against pymatgen; here too, once."""

import numpy as np
import pytest
import torch

from latent_lr import coulomb_energy
from latent_lr.electrostatics.deploy import EwaldEnergy, deployment_inputs


def structure(seed=0, n_atoms=12):
    rng = np.random.default_rng(seed)
    cell = np.diag([8.0, 9.0, 10.0]) + np.triu(rng.uniform(-1, 1, (3, 3)), 1)
    positions = rng.uniform(size=(n_atoms, 3)) @ cell
    charges = rng.normal(size=n_atoms)
    return positions, charges - charges.mean(), cell


def energy_forces_virial(energy_function, positions, charges, cell):
    """Energy (eV), forces (eV/Å) and dE/dD (eV) for the strain D, positions and cell both mapped by (I + D)."""
    pos = torch.tensor(positions, requires_grad=True)
    strain = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    stretch = torch.eye(3, dtype=torch.float64) + strain
    energy = energy_function(pos @ stretch, torch.tensor(charges), torch.tensor(cell) @ stretch)
    grad_positions, grad_strain = torch.autograd.grad(energy.sum(), (pos, strain))
    return energy.sum().item(), -grad_positions.numpy(), grad_strain.numpy()


def eager(sigma):
    return lambda p, q, c: coulomb_energy(p, q, cell=c, pbc=True, smearing=sigma)


def deployed(module, sigma):
    return lambda p, q, c: module(**deployment_inputs(p, q, c, smearing=sigma))


def assert_same(result, reference, tolerance=1e-10):
    assert result[0] == pytest.approx(reference[0], rel=tolerance)
    for got, expected in zip(result[1:], reference[1:]):
        assert np.abs(got - expected).max() <= tolerance * np.abs(expected).max()


@pytest.mark.parametrize("sigma", [0.0, 0.7, 5.0])
def test_torchscript_module_matches_eager_engine_after_save_and_load(sigma, tmp_path):
    positions, charges, cell = structure()
    reference = energy_forces_virial(eager(sigma), positions, charges, cell)
    scripted = torch.jit.script(EwaldEnergy(sigma))
    assert_same(energy_forces_virial(deployed(scripted, sigma), positions, charges, cell), reference)
    path = tmp_path / "ewald.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    assert_same(energy_forces_virial(deployed(loaded, sigma), positions, charges, cell), reference)


def test_deployed_energy_matches_pymatgen():
    from pymatgen.analysis.ewald import EwaldSummation
    from pymatgen.core import Lattice, Structure

    positions, charges, cell = structure(seed=3)
    site = Structure(Lattice(cell), ["H"] * len(charges), positions, coords_are_cartesian=True, site_properties={"charge": charges})
    reference = EwaldSummation(site, acc_factor=14.0).total_energy
    energy = energy_forces_virial(deployed(torch.jit.script(EwaldEnergy()), 0.0), positions, charges, cell)[0]
    assert energy == pytest.approx(reference, rel=1e-6)


def test_torch_compile_full_graph_matches_eager_engine_as_atoms_move():
    torch._dynamo.reset()
    compiled = torch.compile(EwaldEnergy(0.7), backend="aot_eager", fullgraph=True)
    positions, charges, cell = structure(seed=1)
    rng = np.random.default_rng(2)
    for _ in range(2):
        reference = energy_forces_virial(eager(0.7), positions, charges, cell)
        assert_same(energy_forces_virial(deployed(compiled, 0.7), positions, charges, cell), reference)
        # Moving atoms changes the number of pairs: the compiled graph must follow.
        positions = positions + rng.normal(scale=0.3, size=positions.shape)
    torch._dynamo.reset()


def test_negative_smearing_is_rejected():
    with pytest.raises(ValueError, match="smearing"):
        EwaldEnergy(-1.0)
