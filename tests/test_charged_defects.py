"""Charged defects in periodic cells: the Makov–Payne form E(L) = E∞ − k_e q² α_M/(2εL) + O(L⁻³).

References: the Madelung constants of a point charge in a neutralising
background (Makov & Payne, Phys. Rev. B 51, 4014 (1995), Table I: 2.8373 sc,
2.8885 bcc, 2.8883 fcc, referred to L = Ω^{1/3}); the Gaussian-charge
background term +π k_e q² σ²/Ω of the engine's convention; and the
Clausius–Mossotti ε of the host (tests/test_conductors_insulators.py), for
which continuum electrostatics gives the 1/L coefficient −k_e q² α_M/(2ε).

The host is a simple cubic lattice of self-consistent polarisable point sites
(tin-foil Ewald dipole tensor); the defect is a charge q at the centre of a
cube of the host, so that by symmetry the induced dipoles sum to zero and the
defect has no dipole.  Its energy is E = E_coul(q) + U with U = −½ Σ p·E⁰ the
induction energy in the field E⁰ of the charge, its images and the background.
A Qeq host is a conductor (ε = ∞): there the 1/L term must vanish.
"""

import math

import numpy as np
import pytest
import torch

from ase import Atoms

from latent_lr import AtomsBatch, LongRangeModule, coulomb_energy
from latent_lr.defects import (
    SIMPLE_CUBIC_MADELUNG,
    clausius_mossotti_permittivity,
    fit_finite_size,
    madelung_constant,
    makov_payne_correction,
)
from latent_lr.electrostatics import electric_field, equilibrate_charges, qeq_energy, self_consistent_induction
from latent_lr.fixed_parameters import fix_element_parameters
from latent_lr.units import COULOMB_CONSTANT as K_E

from test_conductors_insulators import EPSILON_0, clausius_mossotti_alpha, cubic_lattice

SPACING, SMEARING, X = 3.0, 0.5, 0.3  # host lattice (Å), dipole width (Å), 4π n α'/3
ACCURACY = 1e-7


@pytest.mark.parametrize(
    "name, vectors, literature",
    [
        ("sc", np.eye(3), 2.8373),
        ("bcc", 0.5 * np.array([[-1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, -1.0]]), 2.8885),
        ("fcc", 0.5 * np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]), 2.8883),
    ],
)
def test_madelung_constants_of_cubic_supercells(name, vectors, literature):
    assert madelung_constant(7.0 * vectors) == pytest.approx(literature, abs=1e-4)
    assert SIMPLE_CUBIC_MADELUNG == pytest.approx(2.8373, abs=1e-4)


@pytest.mark.parametrize("charge", [1.0, -2.0])
def test_without_polarisability_the_defect_energy_is_the_madelung_energy(charge):
    """ε = 1: a point charge gives −k_e q² α_M/(2L) exactly; a Gaussian one adds π k_e q² σ²/L³."""
    lengths = np.array([6.0, 9.0, 12.0, 15.0])
    origin = torch.zeros(1, 3, dtype=torch.float64)
    q = torch.tensor([charge], dtype=torch.float64)
    for sigma in (0.0, 0.5):
        energies = np.array([
            float(coulomb_energy(origin, q, cell=torch.eye(3, dtype=torch.float64) * length, pbc=True,
                                 smearing=sigma, accuracy=1e-10))
            for length in lengths
        ])
        expected = -K_E * charge**2 * 2.8372974794 / (2.0 * lengths) + math.pi * K_E * charge**2 * sigma**2 / lengths**3
        np.testing.assert_allclose(energies, expected, rtol=1e-8)
        fit = fit_finite_size(lengths, energies, powers=(1, 3))
        assert fit.e_infinity == pytest.approx(0.0, abs=1e-8)
        assert fit.permittivity(charge) == pytest.approx(1.0, rel=1e-8)
        corrected = energies + np.array([makov_payne_correction(charge, length) for length in lengths])
        np.testing.assert_allclose(corrected, math.pi * K_E * charge**2 * sigma**2 / lengths**3, atol=1e-8)


def host_permittivity() -> float:
    """ε of the host measured from its polarisation in a tin-foil cell, P = ε₀(ε − 1)E."""
    sites, cell = cubic_lattice(2, SPACING)
    n = sites.shape[0]
    alpha = torch.full((n,), clausius_mossotti_alpha(X, SPACING), dtype=torch.float64)
    field = torch.zeros(n, 3, dtype=torch.float64)
    field[:, 2] = 0.01
    dipoles, _ = self_consistent_induction(
        alpha, field, sites, torch.zeros(n, dtype=torch.long), 1, torch.tensor(SMEARING, dtype=torch.float64),
        cell=cell[None], periodic=torch.tensor([True]), accuracy=ACCURACY,
    )
    return 1.0 + float(dipoles[:, 2].sum()) / float(torch.linalg.det(cell)) / (EPSILON_0 * 0.01)


def defect_energy(repeats: int, charge: float) -> tuple[float, torch.Tensor]:
    """E(L) = E_coul + U (eV) of a charge at the centre of a host cube, L = repeats·a; and the dipoles."""
    host, cell = cubic_lattice(repeats, SPACING)
    n = host.shape[0]
    positions = torch.cat([torch.full((1, 3), SPACING / 2, dtype=torch.float64), host])
    charges = torch.zeros(n + 1, dtype=torch.float64)
    charges[0] = charge
    options = dict(cell=cell, pbc=True, smearing=SMEARING, accuracy=ACCURACY)
    coulomb = float(coulomb_energy(positions[:1], charges[:1], **options))
    field = electric_field(positions, charges, **options).detach()[1:]
    alpha = torch.full((n,), clausius_mossotti_alpha(X, SPACING), dtype=torch.float64)
    dipoles, induction = self_consistent_induction(
        alpha, field, host, torch.zeros(n, dtype=torch.long), 1, torch.tensor(SMEARING, dtype=torch.float64),
        cell=cell[None], periodic=torch.tensor([True]), accuracy=ACCURACY,
    )
    return coulomb + float(induction), dipoles


def test_charged_defect_in_a_polarisable_host_follows_makov_payne_with_the_host_permittivity():
    """The fitted 1/L coefficient is −k_e q² α_M/(2ε) with ε = 2.2857 of the host (1 % tolerance; 0.2 %
    measured with E∞ + b/L + c/L³ + d/L⁵ over L = 9-21 Å, 27-343 host sites)."""
    charge = 1.0
    epsilon = host_permittivity()
    assert epsilon == pytest.approx(clausius_mossotti_permittivity(clausius_mossotti_alpha(X, SPACING), SPACING**-3), rel=1e-5)
    repeats = [3, 4, 5, 6, 7]
    lengths = SPACING * np.array(repeats, dtype=float)
    energies = []
    for r in repeats:
        energy, dipoles = defect_energy(r, charge)
        # no defect dipole (to the Ewald accuracy), so the k = 0 boundary term of the dipoles is absent
        assert float(dipoles.sum(0).abs().max()) < 1e-6 * float(dipoles.abs().max())
        energies.append(energy)
    fit = fit_finite_size(lengths, energies, powers=(1, 3, 5))
    screened = -K_E * charge**2 * SIMPLE_CUBIC_MADELUNG / (2.0 * epsilon)
    print(f"\nε = {epsilon:.5f}; 1/L coefficient {fit.coefficients[0]:.4f} eV·Å, analytic {screened:.4f} "
          f"(ratio {fit.coefficients[0] / screened:.4f}); ε from the fit {fit.permittivity(charge):.4f}; "
          f"E∞ = {fit.e_infinity:.4f} eV")
    assert fit.coefficients[0] == pytest.approx(screened, rel=1e-2)
    assert fit.permittivity(charge) == pytest.approx(epsilon, rel=1e-2)
    # The first-order correction with the host's ε removes most of the size dependence; the vacuum one overshoots.
    raw_spread = energies[-1] - energies[0]
    corrected = [e + makov_payne_correction(charge, length, epsilon) for e, length in zip(energies, lengths)]
    vacuum = [e + makov_payne_correction(charge, length) for e, length in zip(energies, lengths)]
    assert abs(corrected[-1] - corrected[0]) < 0.1 * abs(raw_spread)
    assert abs(corrected[-1] - fit.e_infinity) < 0.02
    assert abs(vacuum[-1] - vacuum[0]) > 0.5 * abs(raw_spread)


def test_charged_defect_in_a_qeq_host_is_screened_like_in_a_metal():
    """ε = ∞: the excess charge spreads over the Qeq host and cancels the background, so the 1/L term
    vanishes (|b| < 5 % of the unscreened k_e q² α_M/2; 3 % measured) and E(L) converges like L⁻³."""
    smearing = torch.tensor(1.0, dtype=torch.float64)
    lengths, energies = [], []
    for repeats in [2, 3, 4, 5, 6]:
        sites, cell = cubic_lattice(repeats, SPACING)
        n = sites.shape[0]
        chi = torch.zeros(n, dtype=torch.float64)
        chi[0] = -3.0  # the defect site: lower electronegativity, it takes part of the positive charge
        hardness = torch.ones(n, dtype=torch.float64)
        geometry = (sites, cell[None], torch.tensor([[True, True, True]]), torch.zeros(n, dtype=torch.long))
        total = torch.tensor([1.0], dtype=torch.float64)
        charges = equilibrate_charges(chi, hardness, *geometry, total, smearing, solver="cg", accuracy=1e-8).detach()
        energies.append(float(qeq_energy(charges, chi, hardness, *geometry, smearing, 1e-8)))
        lengths.append(repeats * SPACING)
    fit = fit_finite_size(lengths, energies, powers=(1, 3, 5))
    unscreened = K_E * SIMPLE_CUBIC_MADELUNG / 2.0
    print(f"\nQeq host: 1/L coefficient {fit.coefficients[0]:.3f} eV·Å (unscreened {-unscreened:.2f})")
    assert abs(fit.coefficients[0]) < 0.05 * unscreened


MODEL_SPACING, MODEL_SMEARING = 4.0, 0.8  # σ/a = 0.2: the model's α cap (α' < 3.4σ³) allows ε ≈ 1.22


def physics_model() -> LongRangeModule:
    """Latent-charge model with fixed parameters: Na⁺-like defect (q = +1, α' ≈ 0), polarisable Ar host."""
    module = LongRangeModule(4, polarizability="self_consistent", smearing=MODEL_SMEARING, accuracy=ACCURACY)
    return fix_element_parameters(module.double().eval(), charges={18: 0.0, 11: 1.0}, polarizability={18: 1.2, 11: 1e-4})


def model_outputs(module: LongRangeModule, atoms: Atoms) -> dict[str, torch.Tensor]:
    return module(torch.zeros(len(atoms), 4, dtype=torch.float64), AtomsBatch.from_atoms(atoms))


def defect_supercell(repeats: int) -> Atoms:
    sites, cell = cubic_lattice(repeats, MODEL_SPACING)
    positions = np.vstack([np.full((1, 3), MODEL_SPACING / 2), sites.numpy()])
    atoms = Atoms(f"NaAr{repeats**3}", positions=positions, cell=cell.numpy(), pbc=True)
    atoms.info["charge"] = 1.0
    return atoms


def test_model_energy_of_a_charged_defect_follows_makov_payne_with_the_models_own_permittivity():
    """End to end: the model's ε from its ``polarization`` in a field (tin-foil cell), then its ``energy``
    of the charged defect in 3³-7³ supercells; fitted 1/L coefficient −k_e α_M/(2ε) (1 %; 0.01 % measured)."""
    module = physics_model()
    sites, cell = cubic_lattice(2, MODEL_SPACING)
    host = Atoms("Ar8", positions=sites.numpy(), cell=cell.numpy(), pbc=True)
    host.info["external_field"] = np.array([0.0, 0.0, 0.01])
    epsilon = 1.0 + float(model_outputs(module, host)["polarization"][0, 2].detach()) / (EPSILON_0 * 0.01)
    repeats = [3, 4, 5, 6, 7]
    energies = [float(model_outputs(module, defect_supercell(r))["energy"][0].detach()) for r in repeats]
    fit = fit_finite_size(MODEL_SPACING * np.array(repeats, dtype=float), energies, powers=(1, 3, 5))
    print(f"\nmodel ε = {epsilon:.5f}, ε from the 1/L coefficient {fit.permittivity(1.0):.5f}")
    assert epsilon > 1.2
    assert fit.permittivity(1.0) == pytest.approx(epsilon, rel=1e-2)


def test_model_energy_with_induced_dipoles_is_the_same_under_no_grad():
    """The charges' field is an autograd derivative; under torch.no_grad() it was silently zero (U = 0),
    under torch.inference_mode() it cannot be built: a clear error."""
    module, atoms = physics_model(), defect_supercell(2)
    reference = model_outputs(module, atoms)
    with torch.no_grad():
        inference = model_outputs(module, atoms)
    assert float(reference["induction_energy"][0].detach()) < -0.1
    torch.testing.assert_close(inference["energy"], reference["energy"].detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(inference["electric_field"], reference["electric_field"].detach(), rtol=1e-12, atol=0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="torch.no_grad"):
        model_outputs(module, atoms)


def test_qeq_runs_under_no_grad_and_refuses_inference_mode():
    """Qeq builds K v by autograd: under inference_mode it got only the diagonal (wrong charges, silently)."""
    positions = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    chi = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    args = (torch.ones(3, dtype=torch.float64), positions, torch.zeros(1, 3, 3, dtype=torch.float64),
            torch.zeros(1, 3, dtype=torch.bool), torch.zeros(3, dtype=torch.long), torch.zeros(1, dtype=torch.float64),
            torch.tensor(1.0, dtype=torch.float64))
    reference = equilibrate_charges(chi, *args).detach()
    with torch.no_grad():
        torch.testing.assert_close(equilibrate_charges(chi, *args), reference, rtol=1e-12, atol=1e-14)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        equilibrate_charges(chi, *args)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="permittivity"):
        makov_payne_correction(1.0, 10.0, permittivity=0.5)
    with pytest.raises(ValueError, match="distinct sizes"):
        fit_finite_size([6.0, 9.0, 12.0], [1.0, 2.0, 3.0], powers=(1, 3, 5))
    with pytest.raises(ValueError, match="3×3"):
        madelung_constant(np.eye(2))
    with pytest.raises(ValueError, match="catastrophically"):
        clausius_mossotti_permittivity(1.0, 1.0)
    lengths = np.array([6.0, 9.0, 12.0, 15.0])
    overscreened = fit_finite_size(lengths, 2.0 / lengths + 1.0 / lengths**3)  # b > 0: no ε ≥ 1 gives it
    with pytest.raises(ValueError, match="negative 1/L coefficient"):
        overscreened.permittivity(1.0)
    with pytest.raises(ValueError, match="charged cell"):
        fit_finite_size(lengths, -2.0 / lengths).permittivity(0.0)
