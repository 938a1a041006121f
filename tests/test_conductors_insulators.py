"""Conductors and insulators: the engine's solvers against analytic electrostatics.

* Conductor: Qeq sites (vanishing hardness J) on a simple cubic slab,
  pbc = (True, True, False) with the engine's slab correction, in a uniform
  field E normal to the slab.  Gauss's law for a perfect conductor: the field
  inside vanishes and the two faces carry ∓ε₀E per area.
* Capacitor: two such slabs held at a potential difference ΔV = −Δχ/e by an
  electronegativity offset Δχ (eV/e).  Parallel plates: Q = ε₀ A ΔV / d, with d
  the distance between the centroids of the induced charges, which tends to the
  distance between the inner faces as d grows; dA/C/dd = 1/ε₀ exactly.
* Insulator: self-consistent induced point dipoles of polarisability α on a
  simple cubic lattice of spacing a (tin-foil Ewald sum of the dipole tensor).
  The uniform applied field of a tin-foil cell is the macroscopic field, so
  P = ε₀(ε − 1)E with the Clausius–Mossotti ε: (ε − 1)/(ε + 2) = 4π n α'/3,
  α' = k_e α (Å³), n = 1/a³.  In an open sphere of the same lattice the local
  field equals the applied one, p = αE, instead (depolarisation and Lorentz
  fields cancel).

Units: Å, e, eV, V/Å; ε₀ = 1/(4π k_e) = 0.0055263 e/(V·Å).
"""

import math

import numpy as np
import pytest
import torch
from ase import Atoms

from latent_lr import AtomsBatch, LongRangeModule
from latent_lr.electrostatics import electric_field, equilibrate_charges, self_consistent_induction
from latent_lr.fixed_parameters import fix_element_parameters
from latent_lr.units import COULOMB_CONSTANT as K_E

EPSILON_0 = 1.0 / (4.0 * math.pi * K_E)  # e/(V·Å)
SLAB = torch.tensor([[True, True, False]])
SPACING = 3.0  # Å, lattice constant of the conductor slabs
SMEARING = 1.0  # Å, Gaussian width of the Qeq charges


def column(n_layers: float | int, spacing: float = SPACING, start: float = 0.0) -> torch.Tensor:
    """(n, 3) sites of a simple cubic slab with one site per a×a in-plane cell, layers along z."""
    positions = torch.zeros(int(n_layers), 3, dtype=torch.float64)
    positions[:, 2] = start + spacing * torch.arange(int(n_layers), dtype=torch.float64)
    return positions


def slab_cell(positions: torch.Tensor, spacing: float = SPACING) -> torch.Tensor:
    height = float(positions[:, 2].max() - positions[:, 2].min())
    return torch.diag(torch.tensor([spacing, spacing, height], dtype=torch.float64))


def qeq_slab(positions: torch.Tensor, electronegativity: torch.Tensor, hardness: float) -> torch.Tensor:
    """Qeq charges (e) of a neutral slab with the engine's slab correction."""
    n = positions.shape[0]
    return equilibrate_charges(
        electronegativity, torch.full((n,), hardness, dtype=torch.float64), positions, slab_cell(positions)[None],
        SLAB, torch.zeros(n, dtype=torch.long), torch.zeros(1, dtype=torch.float64),
        torch.tensor(SMEARING, dtype=torch.float64), solver="cg",
    ).detach()


def total_field_z(positions: torch.Tensor, charges: torch.Tensor, applied: float) -> torch.Tensor:
    """(n,) z field at the sites, V/Å: the charges' (engine, slab-corrected) plus the applied one."""
    field = electric_field(
        positions, charges, cell=slab_cell(positions), pbc=SLAB[0], smearing=SMEARING, accuracy=1e-8
    ).detach()
    return field[:, 2] + applied


def test_conductor_slab_screens_a_normal_field_with_surface_charge_epsilon0_e():
    """Perfect-conductor limit (J → 0): E_inside → 0, σ_top = +ε₀E, σ_bottom = −ε₀E (Gauss)."""
    applied = 0.1  # V/Å along +z
    positions = column(12)
    area = SPACING**2
    charges = qeq_slab(positions, -positions[:, 2] * applied, hardness=1e-3)  # χ_i → χ_i − z_i E
    field = total_field_z(positions, charges, applied)
    top = float(charges[6:].sum()) / area
    print(f"\nσ_top/(ε₀E) = {top / (EPSILON_0 * applied):.6f}; E_z/E by layer: {np.round((field / applied).numpy(), 5)}")
    assert abs(float(charges.sum())) < 1e-12
    assert top == pytest.approx(EPSILON_0 * applied, rel=2e-4)  # screening decays ~6x per layer: 4e-5 measured
    assert float(charges[:6].sum()) / area == pytest.approx(-EPSILON_0 * applied, rel=2e-4)
    assert float(field[4:8].abs().max()) < 1e-3 * applied  # central four layers: 3.3e-4 E measured
    assert float(field[0]) > 0.3 * applied  # the surface layer itself sees part of the field


def test_qeq_is_a_conductor_at_any_hardness_with_thomas_fermi_screening():
    """Qeq with a large J still screens completely; each layer's charge falls by the factor r of
    discrete Thomas–Fermi screening: Poisson across sheets (φ_{l+1} − 2φ_l + φ_{l−1} = −a s_l/ε₀) and
    J q_l + φ_l = μ (q_l = a² s_l) give r + 1/r − 2 = 1/(ε₀ J a).  The in-plane lattice of the Gaussians
    adds a small hardness of its own (measured −7 eV/e² here), hence the 2 % tolerance on ln r."""
    applied, hardness = 0.1, 300.0
    positions = column(44)
    charges = qeq_slab(positions, -positions[:, 2] * applied, hardness)
    field = total_field_z(positions, charges, applied)
    d = 1.0 / (EPSILON_0 * hardness * SPACING)
    expected_ratio = 1.0 + d / 2.0 - math.sqrt(d + d * d / 4.0)
    measured_ratio = (charges[-4:-1] / charges[-3:]).numpy()  # layers 1-3 below the top face, relative
    print(f"\nlayer charge ratios {measured_ratio}, discrete Thomas-Fermi {expected_ratio:.4f}")
    assert np.log(measured_ratio) == pytest.approx(math.log(expected_ratio), rel=2e-2)
    assert float(charges[22:].sum()) / SPACING**2 == pytest.approx(EPSILON_0 * applied, rel=1e-3)
    assert float(field[20:24].abs().max()) < 1e-3 * applied  # screened in the middle


def electrode_charge_per_area(gap: float, offset: float, layers: int = 6) -> tuple[float, float]:
    """Qeq capacitor: electrode A (χ = +Δχ/2) and B (χ = −Δχ/2), inner faces ``gap`` Å apart.

    Returns: A's charge per area σ_A (e/Å²) and the distance between the two induced-charge centroids (Å).
    """
    electrode_a = column(layers)
    electrode_b = column(layers, start=float(electrode_a[-1, 2]) + gap)
    positions = torch.cat([electrode_a, electrode_b])
    chi = torch.cat([torch.full((layers,), offset / 2), torch.full((layers,), -offset / 2)]).double()
    charges = qeq_slab(positions, chi, hardness=1e-3)
    z = positions[:, 2]
    centroid_a = float((charges[:layers] * z[:layers]).sum() / charges[:layers].sum())
    centroid_b = float((charges[layers:] * z[layers:]).sum() / charges[layers:].sum())
    return float(charges[:layers].sum()) / SPACING**2, centroid_b - centroid_a


def test_constant_potential_electrodes_hold_the_parallel_plate_charge():
    """Q/A = ε₀ΔV/d: exactly (Gauss) with d the distance of the charge centroids, slope of A/C is 1/ε₀,
    and with d the face distance in the large-gap limit (A/C = (d + δ)/ε₀, |δ| < 1 Å)."""
    offset = 1.0  # Δχ = χ_A − χ_B, eV/e: A is held at the lower potential, ΔV = φ_A − φ_B = −Δχ
    gaps = np.array([6.0, 9.0, 12.0, 18.0, 24.0])
    results = [electrode_charge_per_area(gap, offset) for gap in gaps]
    sigma_a = np.array([r[0] for r in results])
    centroid_distance = np.array([r[1] for r in results])
    potential_difference = -offset
    assert (sigma_a < 0).all()  # the lower-potential electrode is negative
    np.testing.assert_allclose(sigma_a, EPSILON_0 * potential_difference / centroid_distance, rtol=1e-4)
    inverse_capacitance = potential_difference / sigma_a  # A/C = ΔV/σ, V·Å²/e
    slope, intercept = np.polyfit(gaps, inverse_capacitance, 1)
    print(f"\nA/C slope·ε₀ = {slope * EPSILON_0:.7f}; effective extra distance δ = {intercept * EPSILON_0:.3f} Å; "
          f"Q d/(ε₀AΔV) = {np.round(sigma_a * gaps / (EPSILON_0 * potential_difference), 4)}")
    assert slope * EPSILON_0 == pytest.approx(1.0, rel=1e-4)  # 3e-7 measured
    assert abs(intercept * EPSILON_0) < 1.0
    assert sigma_a[-1] * gaps[-1] / (EPSILON_0 * potential_difference) == pytest.approx(1.0, rel=0.04)


def cubic_lattice(repeats: int, spacing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Simple cubic sites (repeats³, 3) and the cubic cell (3, 3), Å."""
    grid = torch.arange(repeats, dtype=torch.float64)
    sites = torch.stack(torch.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3) * spacing
    return sites, torch.eye(3, dtype=torch.float64) * repeats * spacing


def clausius_mossotti_alpha(x: float, spacing: float) -> float:
    """α (e·Å²/V) with 4π n α'/3 = x on a simple cubic lattice of spacing a (n = a⁻³, α' = k_e α)."""
    return 3.0 * x * spacing**3 / (4.0 * math.pi) / K_E


@pytest.mark.parametrize("spacing, smearing, x", [(3.0, 0.5, 0.3), (4.0, 0.6, 0.5)])
@pytest.mark.parametrize("solver", ["cg", "dense"])
def test_polarisable_lattice_has_the_clausius_mossotti_dielectric_constant(spacing, smearing, x, solver):
    """Tin-foil cell: E_ext is the macroscopic field, P = ε₀(ε−1)E_ext, (ε−1)/(ε+2) = 4πnα'/3 = x.

    Two densities, ε = 2.29 and 4.0.  σ ≪ a, so the Gaussian damping of T is negligible between
    neighbours (erfc(a/(√2σ)) < 1e-8) and the point-dipole result applies to 1e-6.
    """
    sites, cell = cubic_lattice(2, spacing)
    n = sites.shape[0]
    alpha = torch.full((n,), clausius_mossotti_alpha(x, spacing), dtype=torch.float64)
    applied = 0.01  # V/Å along z
    field = torch.zeros(n, 3, dtype=torch.float64)
    field[:, 2] = applied
    dipoles, _ = self_consistent_induction(
        alpha, field, sites, torch.zeros(n, dtype=torch.long), 1, torch.tensor(smearing, dtype=torch.float64),
        solver=solver, cell=cell[None], periodic=torch.tensor([True]), accuracy=1e-8,
    )
    polarization = dipoles.sum(0) / float(torch.linalg.det(cell))  # e/Å²
    epsilon = 1.0 + float(polarization[2]) / (EPSILON_0 * applied)
    print(f"\na = {spacing} Å: ε = {epsilon:.7f}, Clausius–Mossotti {(1 + 2 * x) / (1 - x):.7f}")
    assert (epsilon - 1.0) / (epsilon + 2.0) == pytest.approx(x, rel=1e-5)
    torch.testing.assert_close(polarization[:2], torch.zeros(2, dtype=torch.float64), atol=1e-14, rtol=0)


def test_open_sphere_of_the_same_lattice_feels_the_applied_field_locally():
    """Vacuum boundary: inside a sphere E_mac = 3E/(ε+2) and the Lorentz field P/(3ε₀) restore the local
    field to E, so p = αE per site (not αE/(1−x) as in the tin-foil cell); surface sites make the mean
    deviate by ≲ 1 % at radius 3.5 a."""
    spacing, smearing, x = 3.0, 0.5, 0.3
    grid = torch.arange(-4, 5, dtype=torch.float64)
    indices = torch.stack(torch.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
    sites = indices[(indices**2).sum(1) <= 3.5**2] * spacing
    n = sites.shape[0]
    alpha = torch.full((n,), clausius_mossotti_alpha(x, spacing), dtype=torch.float64)
    field = torch.zeros(n, 3, dtype=torch.float64)
    field[:, 2] = 0.01
    dipoles, _ = self_consistent_induction(
        alpha, field, sites, torch.zeros(n, dtype=torch.long), 1, torch.tensor(smearing, dtype=torch.float64)
    )
    local_field_ratio = float((dipoles[:, 2] / (alpha * 0.01)).mean())
    print(f"\n{n} sites: <p>/(αE) = {local_field_ratio:.4f} (tin-foil cell: {1 / (1 - x):.4f})")
    assert local_field_ratio == pytest.approx(1.0, abs=0.015)  # 1.0066 measured


# --- the same physics through the model (fixed per-element parameters) -------------------


def fixed_module(**options) -> LongRangeModule:
    return LongRangeModule(FEATURES, **options).double().eval()


FEATURES = 4


def test_qeq_model_with_fixed_parameters_is_a_conductor_slab():
    """LongRangeModule(charge_model="qeq") with χ = 0, J = 0.2 eV/e² and a field in atoms.info: σ_top = ε₀E."""
    module = fix_element_parameters(fixed_module(charge_model="qeq", smearing=SMEARING),
                                    electronegativity={29: 0.0}, hardness={29: 0.2})
    positions = column(12).numpy()
    atoms = Atoms("Cu12", positions=positions, cell=np.diag([SPACING, SPACING, 33.0]), pbc=[True, True, False])
    atoms.info["external_field"] = np.array([0.0, 0.0, 0.1])
    out = module(torch.zeros(12, FEATURES, dtype=torch.float64), AtomsBatch.from_atoms(atoms))
    charges = out["charges"].detach()
    assert float(charges[6:].sum()) / SPACING**2 == pytest.approx(EPSILON_0 * 0.1, rel=1e-3)
    torch.testing.assert_close(charges, -charges.flip(0), atol=1e-9, rtol=0)  # antisymmetric about the midplane (CG rtol)


def test_polarisable_model_with_fixed_parameters_has_the_clausius_mossotti_permittivity():
    """LongRangeModule(polarizability="self_consistent") with zero charges and α' fixed: the model's own
    ``polarization`` in a tin-foil cell gives ε with (ε−1)/(ε+2) = 4πnα'/3, α' the (capped) value it used."""
    spacing, smearing = 4.0, 0.8
    module = fix_element_parameters(fixed_module(polarizability="self_consistent", smearing=smearing),
                                    charges={18: 0.0}, polarizability={18: 1.2})
    sites, cell = cubic_lattice(2, spacing)
    atoms = Atoms("Ar8", positions=sites.numpy(), cell=cell.numpy(), pbc=True)
    atoms.info["external_field"] = np.array([0.0, 0.0, 0.01])
    out = module(torch.zeros(8, FEATURES, dtype=torch.float64), AtomsBatch.from_atoms(atoms))
    assert float(out["charges"].detach().abs().max()) == 0.0
    alpha_volume = float(out["polarizabilities"][0].detach()) * K_E  # Å³, after the catastrophe cap
    x = 4.0 * math.pi * alpha_volume / (3.0 * spacing**3)
    epsilon = 1.0 + float(out["polarization"][0, 2].detach()) / (EPSILON_0 * 0.01)
    print(f"\nmodel: α' = {alpha_volume:.4f} Å³ (asked 1.2, capped), ε = {epsilon:.6f}, CM {(1 + 2 * x) / (1 - x):.6f}")
    assert 0.9 < alpha_volume < 1.2
    assert (epsilon - 1.0) / (epsilon + 2.0) == pytest.approx(x, rel=1e-4)


def test_fixed_parameters_reject_bad_values():
    with pytest.raises(ValueError, match="floor"):
        fix_element_parameters(fixed_module(charge_model="qeq"), hardness={1: 0.05})
    with pytest.raises(ValueError, match="charge_model='qeq'"):
        fix_element_parameters(fixed_module(), electronegativity={1: 0.0})
    with pytest.raises(ValueError, match="polarizability='one_step'"):
        fix_element_parameters(fixed_module(), polarizability={1: 1.0})


def test_fixed_charges_are_refused_for_a_spin_channel_module():
    """The spin channel's learned weights shift fixed raw charges (q ≠ the given value): refused, not silently wrong."""
    with pytest.raises(ValueError, match="spin_channel"):
        fix_element_parameters(fixed_module(spin_channel=True), charges={1: 0.5})
