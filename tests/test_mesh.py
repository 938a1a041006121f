"""Smooth particle-mesh Ewald (method="pme") against independent references.

References: pymatgen's EwaldSummation (via test_electrostatics_accuracy.reference,
with the erfc correction for smeared charges), closed-form B-splines, finite
differences of the energy, and latent-lr's Ewald sum for charged cells (whose
background term is checked against pymatgen in test_engine_physics).
"""

import logging
import math

import numpy as np
import pytest
import torch
from test_electrostatics_accuracy import SYSTEMS, reference
from test_smoothness import random_neutral_cell

from latent_lr import coulomb_energy
from latent_lr.demo import water_like_box
from latent_lr.electrostatics import coulomb
from latent_lr.electrostatics.mesh import bspline_weights, spme_reciprocal_energy
from latent_lr.electrostatics.mesh_parameters import fft_size, mesh_parameters
from latent_lr.electrostatics.state import EngineState

F64 = torch.float64


@pytest.fixture(scope="module")
def references():
    return {(name, sigma): reference(build(), sigma) for name, build in SYSTEMS.items() for sigma in (0.0, 1.0)}


def pme(positions, charges, cell, accuracy=1e-6, smearing=0.0, batch=None):
    return coulomb_energy(
        positions, charges, cell=cell, pbc=True, batch=batch, smearing=smearing, accuracy=accuracy, method="pme"
    )


def tensors(atoms):
    return (
        torch.tensor(atoms.positions),
        torch.tensor(atoms.get_initial_charges()),
        torch.tensor(atoms.cell.array),
    )


def test_bspline_weights_match_closed_form_cubic():
    t = torch.linspace(0.0, 0.999, 37, dtype=F64)
    closed = torch.stack([t**3 / 6, (1 + 3 * t + 3 * t**2 - 3 * t**3) / 6, (4 - 6 * t**2 + 3 * t**3) / 6, (1 - t) ** 3 / 6], -1)
    assert torch.allclose(bspline_weights(t, 4), closed, atol=1e-14)
    for order in (3, 5, 6, 8):
        assert torch.allclose(bspline_weights(t, order).sum(-1), torch.ones_like(t), atol=1e-13)


def test_mesh_sizes_are_fft_friendly_and_grow_with_accuracy():
    sizes = [fft_size(x) for x in range(1, 200)]
    assert all(size >= x for x, size in zip(range(1, 200), sizes))
    assert {size for size in sizes} <= {2**a * 3**b for a in range(9) for b in range(6)}
    coarse = mesh_parameters(3000, (31.0,) * 3, 31.0**3, 1e-3)
    fine = mesh_parameters(3000, (31.0,) * 3, 31.0**3, 1e-8)
    assert np.prod(fine.mesh) * fine.order**3 > np.prod(coarse.mesh) * coarse.order**3


@pytest.mark.parametrize("sigma", [0.0, 1.0])
@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_matches_pymatgen_at_tight_accuracy(references, name, sigma):
    energy_ref, forces_ref = references[(name, sigma)]
    positions, charges, cell = tensors(SYSTEMS[name]())
    positions.requires_grad_(True)
    energy = pme(positions, charges, cell, 1e-9, sigma)
    (gradient,) = torch.autograd.grad(energy.sum(), positions)
    assert energy.item() == pytest.approx(energy_ref, rel=1e-8)
    assert np.linalg.norm(-gradient.numpy() - forces_ref) / np.linalg.norm(forces_ref) < 1e-7


@pytest.mark.parametrize("accuracy", [1e-3, 1e-4, 1e-6])
@pytest.mark.parametrize("sigma", [0.0, 1.0])
@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_measured_error_stays_below_requested_accuracy(references, name, sigma, accuracy):
    energy_ref, forces_ref = references[(name, sigma)]
    positions, charges, cell = tensors(SYSTEMS[name]())
    positions.requires_grad_(True)
    energy = pme(positions, charges, cell, accuracy, sigma)
    (gradient,) = torch.autograd.grad(energy.sum(), positions)
    assert np.linalg.norm(-gradient.numpy() - forces_ref) / np.linalg.norm(forces_ref) <= accuracy
    assert abs(energy.item() - energy_ref) / abs(energy_ref) <= accuracy


def charged_triclinic_cell(n_atoms=24, seed=5):
    """A random triclinic cell whose charges carry a net charge of n_atoms / 10 e."""
    fractional, charges, cell = random_neutral_cell(seed, n_atoms)
    return torch.tensor(fractional @ cell), torch.tensor(charges + 0.1), torch.tensor(cell)


@pytest.mark.parametrize("sigma", [0.0, 0.8])
def test_net_charged_triclinic_cell_matches_ewald_background_convention(sigma):
    positions, charges, cell = charged_triclinic_cell()
    assert abs(charges.sum().item()) > 1.0
    ewald = coulomb_energy(positions, charges, cell=cell, pbc=True, smearing=sigma, accuracy=1e-10, method="ewald")
    assert pme(positions, charges, cell, 1e-9, sigma).item() == pytest.approx(ewald.item(), rel=1e-8)


def test_forces_are_minus_gradient_by_finite_differences():
    positions, charges, cell = charged_triclinic_cell(12)
    positions.requires_grad_(True)
    (gradient,) = torch.autograd.grad(pme(positions, charges, cell, 1e-5, 0.5).sum(), positions)
    h = 1e-5
    for atom, axis in [(0, 0), (3, 1), (7, 2)]:
        step = torch.zeros_like(positions)
        step[atom, axis] = h
        with torch.no_grad():
            fd = (pme(positions + step, charges, cell, 1e-5, 0.5) - pme(positions - step, charges, cell, 1e-5, 0.5)) / (2 * h)
        assert gradient[atom, axis].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-8)


def test_stress_by_finite_strain():
    positions, charges, cell = charged_triclinic_cell(12)
    strain = torch.zeros(3, 3, dtype=F64, requires_grad=True)

    # Tight accuracy: alpha follows the volume, and the energy's alpha-dependence (the
    # truncation error) enters finite differences but not the fixed-alpha virial.
    def energy(eps):
        deformation = torch.eye(3, dtype=F64) + eps
        return pme(positions @ deformation, charges, cell @ deformation, 1e-8).sum()

    (virial,) = torch.autograd.grad(energy(strain), strain)
    h = 1e-6
    for i, j in [(0, 0), (1, 2), (2, 0), (2, 2)]:
        step = torch.zeros(3, 3, dtype=F64)
        step[i, j] = h
        with torch.no_grad():
            fd = (energy(step) - energy(-step)) / (2 * h)
        assert virial[i, j].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-7)


def test_influence_cache_keys_on_the_cell_and_leaves_the_stress_exact():
    state = EngineState()
    positions, charges, cell = charged_triclinic_cell(12)
    arguments = (torch.zeros(12, dtype=torch.long), [(16, 18, 16)], torch.tensor([0.5], dtype=F64), 6)

    def energy(c, cache=state.influence):
        return spme_reciprocal_energy(positions, charges, c[None], *arguments, cache, state.influence_cache_size)

    first = energy(cell)
    assert len(state.influence) == 1 and energy(cell).item() == first.item()
    assert energy(cell, None).item() == first.item()  # the uncached θ
    strained = cell * 1.001
    cached_then_strained = energy(strained)
    state.clear_caches()
    assert cached_then_strained.item() == energy(strained).item() != first.item()
    # A cell that requires a gradient bypasses the cache: stress equals the uncached one.
    energy(cell)
    grad_cell = cell.clone().requires_grad_(True)
    (with_cache,) = torch.autograd.grad(energy(grad_cell).sum(), grad_cell)
    state.clear_caches()
    (without,) = torch.autograd.grad(energy(grad_cell).sum(), grad_cell)
    assert torch.equal(with_cache, without) and without.abs().max() > 0
    # Bounded: at most influence_cache_size cells are kept.
    for step in range(state.influence_cache_size + 3):
        energy(cell * (1.0 + 1e-3 * step))
    assert len(state.influence) == state.influence_cache_size


def test_charge_gradient_matches_finite_differences_and_ewald():
    positions, charges, cell = charged_triclinic_cell(12)
    charges = charges.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(pme(positions, charges, cell, 1e-8).sum(), charges)
    (ewald,) = torch.autograd.grad(
        coulomb_energy(positions, charges, cell=cell, pbc=True, accuracy=1e-10, method="ewald").sum(), charges
    )
    assert torch.allclose(gradient, ewald, rtol=1e-6, atol=1e-7)
    h = 1e-6
    step = torch.zeros_like(charges)
    step[2] = h
    with torch.no_grad():
        fd = (pme(positions, charges + step, cell, 1e-8) - pme(positions, charges - step, cell, 1e-8)) / (2 * h)
    assert gradient[2].item() == pytest.approx(fd.item(), rel=1e-6)


@pytest.mark.parametrize("parameter", ["charges", "smearing"])
def test_double_backward_matches_finite_differences_of_forces(parameter):
    positions, charges, cell = charged_triclinic_cell(12)
    weights = torch.tensor(np.random.default_rng(0).normal(size=(12, 3)))
    sigma = torch.tensor(0.9, dtype=F64)

    def force_loss(q, s, create_graph):
        pos = positions.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(pme(pos, q, cell, 1e-6, s).sum(), pos, create_graph=create_graph)
        return (gradient * weights).sum()

    q, s = charges.clone().requires_grad_(True), sigma.clone().requires_grad_(True)
    (derivative,) = torch.autograd.grad(force_loss(q, s, True), q if parameter == "charges" else s)
    h = 1e-5
    if parameter == "charges":
        step = torch.zeros_like(charges)
        step[4] = h
        fd = (force_loss(charges + step, sigma, False) - force_loss(charges - step, sigma, False)) / (2 * h)
        assert derivative[4].item() == pytest.approx(fd.item(), rel=1e-5)
    else:
        fd = (force_loss(charges, sigma + h, False) - force_loss(charges, sigma - h, False)) / (2 * h)
        assert derivative.item() == pytest.approx(fd.item(), rel=1e-5)


def test_batch_of_different_cells_equals_separate_calls():
    structures = [charged_triclinic_cell(12, seed=1), charged_triclinic_cell(20, seed=2), tensors(SYSTEMS["water"]())]
    structures.append(tensors(SYSTEMS["ionic"]()))
    # The water box again, moved: same cell and atom count, so the same mesh.
    water = structures[2]
    structures.append((water[0] + torch.tensor([0.4, -0.3, 1.1], dtype=F64), -water[1], water[2]))
    positions = torch.cat([s[0] for s in structures]).requires_grad_(True)
    charges = torch.cat([s[1] for s in structures])
    cell = torch.stack([s[2] for s in structures])
    batch = torch.repeat_interleave(torch.arange(len(structures)), torch.tensor([len(s[0]) for s in structures]))
    meshes = {mesh_parameters(len(p), tuple(c.norm(dim=1).tolist()), float(c.det().abs()), 1e-6, 0.7).mesh for p, _, c in structures}
    assert len(meshes) < len(structures), "some structures should share one mesh (one batched FFT)"
    energy = pme(positions, charges, cell, 1e-6, 0.7, batch)
    (gradient,) = torch.autograd.grad(energy.sum(), positions)
    start = 0
    for index, (p, q, c) in enumerate(structures):
        p = p.clone().requires_grad_(True)
        alone = pme(p, q, c, 1e-6, 0.7)
        (alone_gradient,) = torch.autograd.grad(alone.sum(), p)
        assert energy[index].item() == pytest.approx(alone.item(), rel=1e-12, abs=1e-12)
        assert torch.allclose(gradient[start : start + len(p)], alone_gradient, rtol=1e-10, atol=1e-12)
        start += len(p)


def test_auto_picks_pme_for_large_cells_and_ewald_for_small(caplog):
    positions, charges, cell = water_like_box(math.ceil(coulomb.PME_MIN_ATOMS / 3), seed=2)
    small, small_charges, small_cell = tensors(SYSTEMS["water"]())
    with caplog.at_level(logging.DEBUG, logger="latent_lr.electrostatics.coulomb"):
        auto = coulomb_energy(
            torch.cat([small, positions]),
            torch.cat([small_charges, charges]),
            cell=torch.stack([small_cell, cell]),
            pbc=True,
            batch=torch.repeat_interleave(torch.arange(2), torch.tensor([len(small), len(positions)])),
            accuracy=1e-4,
        )
    assert "Ewald for 1 and PME for 1 periodic" in caplog.text
    assert "structure 1: PME" in caplog.text and "structure 0: Ewald" in caplog.text
    pme_alone = pme(positions, charges, cell, 1e-4)
    assert auto[1].item() == pytest.approx(pme_alone.item(), rel=1e-12)


def test_pme_on_open_structure_says_it_needs_periodic_cells():
    positions, charges, _ = charged_triclinic_cell(4)
    with pytest.raises(ValueError, match="method='pme' needs periodic"):
        coulomb_energy(positions, charges, method="pme")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_mesh_sum_scripts_with_torchscript():
    positions, charges, cell = charged_triclinic_cell(12)
    arguments = (positions, charges, cell[None], torch.zeros(12, dtype=torch.long), [(16, 18, 16)], torch.tensor([0.5], dtype=F64), 6)
    scripted = torch.jit.script(spme_reciprocal_energy)
    assert torch.allclose(scripted(*arguments), spme_reciprocal_energy(*arguments), rtol=1e-12)
    # The eager path with an engine state's influence cache gives the same numbers.
    cached = spme_reciprocal_energy(*arguments, EngineState().influence, 8)
    assert torch.allclose(scripted(*arguments), cached, rtol=1e-12)


def test_slab_with_pme_matches_ewald():
    from test_slab import A_VEC, B_VEC, random_slab

    positions, charges = (torch.tensor(a) for a in random_slab(net_charge=0.5)[:2])
    cell = torch.tensor(np.array([A_VEC, B_VEC, [0.0, 0.0, 0.0]]))
    energies = [
        coulomb_energy(positions, charges, cell=cell, pbc=torch.tensor([True, True, False]), accuracy=1e-8, method=method)
        for method in ("ewald", "pme")
    ]
    assert energies[1].item() == pytest.approx(energies[0].item(), rel=1e-9)
