"""Joint equilibration of charges and induced dipoles: one quadratic functional, one constrained solve.

For each structure with total charge Q the charges q_i (e) and induced point
dipoles p_i (e·Å) minimise::

    E(q, p) = Σ χ_i q_i + ½ Σ J_i q_i² + Σ |p_i|²/(2α_i) + E_elec(q, p) − (Σ q_i r_i + Σ p_i)·E_ext,
    subject to Σ_i q_i = Q,

with χ (eV/e) the electronegativities, J > 0 (eV/e²) the hardnesses beyond the
Gaussian self-energy, α ≥ 0 (e·Å²/V) the polarisabilities and E_ext (V/Å) a
uniform applied field.  E_elec is the electrostatic energy of Gaussian charges
and Gaussian dipoles of one width σ (the engine's pair kernel ψ(r) = erf(ar)/r,
a = 1/(√2σ)), self-energies of the charges included::

    E_elec = E_coul(q) + ½ k_e √(2/π)/σ Σ q_i² − Σ_i p_i·F_i(q) − ½ Σ_{i≠j} p_iᵀ T_ij p_j,

where F(q) is the field of the charges (:func:`.field.electric_field`, the
engine's own derivative) and T the Gaussian-damped dipole tensor
(:mod:`.dipole_tensor`, :mod:`.dipole_ewald`).  Periodic structures use the
engine's tin-foil Ewald sums for all three terms.  Slabs raise
:class:`NotImplementedError` (the dipole tensor has no slab form here).

The unknowns are solved for together: with S = diag √α and p = S x, the
stationarity conditions are the KKT system of the symmetric matrix (N + 3N)::

    H = [[diag(J) + K,  −G S        ],     b = [−χ + r·E_ext],
         [−S Gᵀ,        I − S T S   ]],         [ S E_ext    ],

K the Coulomb matrix of the Gaussian charges and G the charge-to-field matrix
(F = G q).  E_elec is the energy of a smooth charge density, so the
electrostatic block is positive semi-definite once the dipole self-energy
½ c|p|² (c = k_e 4a³/(3√π)) is counted, and H is positive definite when J > 0
and every α < 1/c (:func:`.dipole_tensor.catastrophe_free_polarizability`).
The scaled unknown x makes α = 0 exact (p = 0: plain Qeq).  H is applied
matrix-free and the system solved by the shared batched CG
(:func:`.linear_solve.solve_spd`, constraint on the charge column only,
implicit first and second derivatives).

Special cases: α → 0 gives Qeq (:mod:`.qeq`); J → ∞ with χ = −J q⁰ fixes the
charges at q⁰ and gives the self-consistent induced dipoles of q⁰
(:func:`.induction.self_consistent_induction`).

The returned energy is E(q*, p*) + (Σ q_i* r_i)·E_ext, i.e. without the charges'
field term, which the model adds itself (as for Qeq); −Σ p_i·E_ext is
included (as in the induction energy).  Because E is stationary at (q*, p*),
μ = Σ q r + Σ p = −∂E/∂E_ext and the polarisability ∂μ/∂E_ext = −∂²E/∂E_ext²
is symmetric positive semi-definite.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .dipole_ewald import DipoleOperator, dipole_operator
from .dipole_tensor import catastrophe_free_polarizability
from .field import electric_field
from .linear_solve import solve_spd
from .qeq import _charge_gradient, _Geometry, gaussian_self_hardness
from .state import EngineState


class _JointOperator:
    """H of the scaled unknowns y = (q, x) packed as (N, 4), the matvec of :func:`solve_spd`.

    Operator tensors: positions (N, 3) Å, cell (B, 3, 3) Å, σ (Å), J (N,) eV/e², √α (N,).
    """

    def __init__(
        self, pbc: torch.Tensor, batch: torch.Tensor, n_structures: int, accuracy: float,
        state: Optional[EngineState] = None,
    ):
        self.charges = _Geometry(pbc, batch, n_structures, accuracy, state)
        self.periodic = pbc.all(dim=1)

    def field(self, positions: torch.Tensor, charges: torch.Tensor, cell: torch.Tensor, smearing: torch.Tensor) -> torch.Tensor:
        """(N, 3) field of the charges, V/Å, with a graph to ``charges``."""
        geometry = self.charges
        return electric_field(
            positions, charges, cell=cell, pbc=geometry.pbc, batch=geometry.batch, smearing=smearing,
            accuracy=geometry.accuracy, state=geometry.state,
        )

    def dipoles(self, positions: torch.Tensor, cell: torch.Tensor, smearing: torch.Tensor) -> DipoleOperator:
        """The dipole field tensor T of the batch (:class:`.dipole_ewald.DipoleOperator`)."""
        geometry = self.charges
        return dipole_operator(positions, cell, self.periodic, geometry.batch, smearing, geometry.accuracy)

    def __call__(
        self, v: torch.Tensor, positions: torch.Tensor, cell: torch.Tensor, smearing: torch.Tensor,
        hardness: torch.Tensor, scale: torch.Tensor,
    ) -> torch.Tensor:
        """H v, (N, 4): charge rows eV/e, dipole rows in the scaled units; differentiable in all tensors."""
        q, x = v[:, 0], v[:, 1:]
        p = scale[:, None] * x
        build = torch.is_grad_enabled() and any(t.requires_grad for t in (v, positions, cell, smearing, scale))
        with torch.enable_grad():
            charges = q if q.requires_grad else q.detach().requires_grad_()
            field = self.field(positions, charges, cell, smearing)
            potential = _charge_gradient((field * p).sum(), charges, create_graph=build)  # Gᵀp
        charge_rows = self.charges(q, positions, cell, smearing, hardness) - potential
        dipole_rows = x - scale[:, None] * (field + self.dipoles(positions, cell, smearing).apply(p))
        return torch.cat([charge_rows[:, None], dipole_rows], dim=1)

    def frozen(
        self, positions: torch.Tensor, cell: torch.Tensor, smearing: torch.Tensor, hardness: torch.Tensor,
        scale: torch.Tensor,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """v ↦ H v at fixed geometry: every graph is built once and reused by each CG iteration.

        F(q) = G q is linear in q, so the field of unit charges keeps a graph whose
        vector-Jacobian product with p is Gᵀp; the product of that (linear in a
        probe w) with q, taken with respect to w, is G q.
        """
        charge_apply = self.charges.frozen(positions, cell, smearing, hardness)
        operator = self.dipoles(positions, cell, smearing)
        reference = torch.ones_like(hardness).requires_grad_()
        with torch.enable_grad():
            field = self.field(positions, reference, cell, smearing)
            probe = torch.zeros_like(field).requires_grad_()
            coupled = field.requires_grad
            adjoint = _charge_gradient((field * probe).sum(), reference, create_graph=True) if coupled else None

        def apply(v: torch.Tensor) -> torch.Tensor:
            q, x = v[:, 0], v[:, 1:]
            p = scale[:, None] * x
            potential, charge_field = torch.zeros_like(q), torch.zeros_like(x)
            if coupled and adjoint is not None and adjoint.requires_grad:
                with torch.enable_grad():
                    (potential,) = torch.autograd.grad(field, reference, grad_outputs=p, retain_graph=True)
                    (charge_field,) = torch.autograd.grad(adjoint, probe, grad_outputs=q, retain_graph=True)
            charge_rows = charge_apply(q) - potential
            dipole_rows = x - scale[:, None] * (charge_field + operator.apply(p))
            return torch.cat([charge_rows[:, None], dipole_rows], dim=1)

        return apply


def equilibrate_charges_and_dipoles(
    electronegativity: torch.Tensor,
    hardness: torch.Tensor,
    polarizability: torch.Tensor,
    positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, batch: torch.Tensor,
    total_charge: torch.Tensor,
    smearing: torch.Tensor,
    external_field: Optional[torch.Tensor] = None,
    *,
    accuracy: float = 1e-6,
    rtol: Optional[float] = None,
    max_iter: int = 1000,
    state: Optional[EngineState] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q*, p*) = argmin E(q, p) subject to Σ_{i∈b} q_i = Q_b, and the energy (module docstring).

    Args:
        electronegativity: χ (N,) eV/e, without the field shift (the field is ``external_field``).
        hardness: J (N,) eV/e², > 0.
        polarizability: α (N,) e·Å²/V, 0 ≤ α < 1/c (below :func:`catastrophe_free_polarizability`).
        positions: (N, 3) Å; cell: (B, 3, 3) Å; pbc: (B, 3) bool, each structure open or fully
            periodic; batch: (N,) sorted structure index.
        total_charge: Q (B,) e.
        smearing: σ (scalar tensor), Å, > 0.
        external_field: E_ext (B, 3) V/Å or None (no field).
        accuracy: Ewald accuracy of the engine and of the periodic dipole tensor.
        rtol, max_iter: CG tolerance and iteration cap (:func:`solve_spd`).
        state: the run's :class:`~.state.EngineState` for the engine calls.

    Returns:
        charges (N,) e, induced dipoles (N, 3) e·Å and energies (B,) eV,
        E(q*, p*) + (Σ q_i* r_i)·E_ext.  Differentiable (first and second
        derivatives) in χ, J, α, positions, cell, σ, Q and E_ext.

    Raises:
        ValueError: J ≤ 0, α outside [0, 1/c), σ ≤ 0.
        NotImplementedError: a slab or other partly periodic structure.
    """
    smearing = torch.as_tensor(smearing, dtype=positions.dtype, device=positions.device)
    if not float(smearing.detach()) > 0:
        raise ValueError(f"joint charge-dipole equilibration needs Gaussian charges: smearing must be > 0 Å, got {float(smearing)}.")
    if not bool((hardness > 0).all()):
        raise ValueError("hardness J must be > 0 eV/e² for every atom (the energy must be convex).")
    bound = float(catastrophe_free_polarizability(smearing.detach()))
    if not bool(((polarizability >= 0) & (polarizability < bound)).all()):
        raise ValueError(
            f"polarisabilities must lie in [0, {bound:.4g}) e·Å²/V (below 1/c at σ = {float(smearing):.3g} Å, "
            "or the dipoles diverge); lower α or raise the smearing."
        )
    partial = pbc.any(dim=1) & ~pbc.all(dim=1)
    if bool(partial.any()):
        raise NotImplementedError(
            "joint charge-dipole equilibration supports open and fully periodic structures; the dipole tensor "
            "has no slab (partly periodic) form yet. Use charge_model='qeq' with polarizability='one_step' for slabs."
        )
    n_structures = cell.shape[0]
    scale = polarizability.clamp_min(1e-30).sqrt()  # finite gradients at α = 0
    operator = _JointOperator(pbc, batch, n_structures, accuracy, state)
    field = positions.new_zeros(n_structures, 3) if external_field is None else external_field.to(positions.dtype)
    atom_field = field[batch]
    rhs = torch.cat([(-electronegativity + (positions * atom_field).sum(1))[:, None], scale[:, None] * atom_field], 1)
    diagonal = torch.cat([(hardness + gaussian_self_hardness(smearing))[:, None], torch.ones_like(atom_field)], 1)
    total = torch.cat([total_charge.to(positions.dtype)[:, None], positions.new_zeros(n_structures, 3)], 1)
    constrained = torch.tensor([True, False, False, False], device=positions.device)
    operators = (positions, cell, smearing, hardness, scale)
    solution = solve_spd(
        operator, rhs, operators, batch=batch, total=total, diagonal=diagonal.detach(), rtol=rtol,
        max_iter=max_iter, constrained=constrained,
    )
    # Variational form ½ yᵀHy − bᵀy: solver errors enter the energy at second order only.
    atom_energy = (solution * (0.5 * operator(solution, *operators) - rhs)).sum(1)
    charges = solution[:, 0]
    atom_energy = atom_energy + charges * (positions * atom_field).sum(1)
    energy = positions.new_zeros(n_structures).index_add(0, batch, atom_energy)
    return charges, scale[:, None] * solution[:, 1:], energy
