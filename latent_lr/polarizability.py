"""Latent polarisabilities: induced dipoles p_i = α_i E_i and their energy.

Units: α in e·Å²/V, so that p (e·Å) = α E (V/Å).  An atomic polarisability
volume α' in Å³ (the usual Gaussian-units number) is α' = k_e α with
k_e = 14.399645 eV·Å/e²; the head below predicts α' and divides by k_e.

Models (``LongRangeModule(polarizability=...)``):

* ``"one_step"``: p_i = α_i E⁰_i with E⁰_i = F_i(q) + E_ext the field of the
  latent charges (from :func:`latent_lr.electrostatics.field.electric_field`)
  plus the applied field.  Energy U = -½ Σ_i α_i |E⁰_i|², the energy of
  non-interacting linear induced dipoles (½ Σ |p|²/α - Σ p·E⁰ at its
  minimum).  Dipole-dipole interaction is neglected.  Open and periodic.
* ``"self_consistent"``: p = α (E⁰ + T p) with the Gaussian-damped dipole
  tensor T (:mod:`latent_lr.electrostatics.dipole_tensor`).  With S = diag √α
  and p = S x it is the minimum of U(x) = ½ xᵀ(I - S T S)x - xᵀ S E⁰, whose
  value is U = -½ Σ_i p_i·E⁰_i.  The energy is evaluated in this variational
  form (errors of the linear solve enter only at second order) and the
  solve is differentiated implicitly, so forces, stress, BECs and the
  polarisability tensor are derivatives of one energy.  Open and fully
  periodic structures (mixed batches too): for periodic ones T is the
  tin-foil Ewald sum of the same Hessian, with the engine's Ewald parameters
  (:mod:`latent_lr.electrostatics.dipole_ewald`), so that -T_ij is exactly
  the Hessian block of the engine's Ewald energy with unit charges.  Slabs
  raise :class:`NotImplementedError` (``"one_step"`` works there).
  Polarisabilities are smoothly capped below 0.9/c (c = k_e 4a³/(3√π),
  a = 1/(√2σ)), where I - S T S is provably positive definite, i.e. α' below
  ≈ 3.4 σ³ Å³: no polarisation catastrophe.  Raise σ to allow larger α'.
  The bound holds for the periodic (tin-foil) operator as well: the smeared
  dipolar energy is a sum over k ≠ 0 of non-negative terms, so T ⪯ c I there
  too, up to the Ewald truncation error (~accuracy × c, far inside the 10 %
  margin; checked by the smallest eigenvalue in tests/test_periodic_polarization.py).

Induced dipoles add to the dipole of open structures (μ = Σ q_i r_i + Σ p_i)
and to the cell dipole of periodic ones (Ω P = Ω P_q + Σ p_i); the energy U
already contains -Σ p_i·E_ext, so the model's field term is only
-(Σ q_i r_i)·E_ext.

With latent charges (independent of E_ext) the total energy is the
variational one and μ = -∂E/∂E_ext exactly, so the polarisability tensor is
symmetric and ∂F/∂E_ext equals the BECs.  With ``charge_model="qeq"`` the
charges are equilibrated *without* the induction energy (charges and dipoles
are not solved jointly), so the energy is not stationary in q: forces and
stress remain exact gradients and ``polarizability`` is still the exact
derivative ∂μ/∂E_ext of the reported dipole, but that tensor need not be
symmetric and the Maxwell relation holds only approximately.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .charges import MAX_ATOMIC_NUMBER
from .electrostatics.dipole_ewald import DipoleOperator, dipole_operator
from .electrostatics.dipole_tensor import catastrophe_free_polarizability
from .units import COULOMB_CONSTANT

MODES = ("none", "one_step", "self_consistent")
SOLVERS = ("cg", "dense")

#: Fraction of the catastrophe bound 1/c that self-consistent polarisabilities may reach.
SAFE_FRACTION = 0.9


class PolarizabilityHead(nn.Module):
    """Per-atom polarisabilities α_i ≥ 0 (e·Å²/V) from invariant features.

    α'_i = softplus(MLP(h_i) + b(Z_i)) in Å³ (per-element baseline b), α_i = α'_i / k_e;
    optionally capped smoothly, α ← α_max tanh(α/α_max).

    Args:
        feature_dim: F.
        hidden_dim: hidden width (0: linear).
        element_baseline: learn the per-element offset b(Z).
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 16, element_baseline: bool = True):
        super().__init__()
        if hidden_dim > 0:
            self.mlp: nn.Module = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 1))
        else:
            self.mlp = nn.Linear(feature_dim, 1)
        self.element_baseline = nn.Embedding(MAX_ATOMIC_NUMBER + 1, 1) if element_baseline else None
        if self.element_baseline is not None:
            nn.init.zeros_(self.element_baseline.weight)

    def forward(self, features: torch.Tensor, numbers: torch.Tensor, cap: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Args: features (N, F), numbers (N,), cap: scalar α_max or None. Returns α (N,), e·Å²/V."""
        raw = self.mlp(features).squeeze(-1)
        if self.element_baseline is not None:
            raw = raw + self.element_baseline(numbers).squeeze(-1)
        alpha = nn.functional.softplus(raw) / COULOMB_CONSTANT
        if cap is not None:
            alpha = cap * torch.tanh(alpha / cap)
        return alpha


def self_consistent_cap(smearing: torch.Tensor) -> torch.Tensor:
    """α_max = 0.9/c, e·Å²/V (see the module docstring)."""
    return SAFE_FRACTION * catastrophe_free_polarizability(smearing)


def per_structure(values: torch.Tensor, batch: torch.Tensor, n_structures: int) -> torch.Tensor:
    """Sum (N, ...) per-atom values into (B, ...) per-structure values."""
    return values.new_zeros((n_structures,) + values.shape[1:]).index_add(0, batch, values)


def one_step_induction(
    alpha: torch.Tensor, field: torch.Tensor, batch: torch.Tensor, n_structures: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """p_i = α_i E⁰_i and U = -½ Σ α_i |E⁰_i|².

    Args: alpha (N,) e·Å²/V, field E⁰ (N, 3) V/Å, batch (N,).
    Returns: induced dipoles (N, 3) e·Å and energies (B,) eV.
    """
    dipoles = alpha[:, None] * field
    energy = -0.5 * per_structure((dipoles * field).sum(dim=1), batch, n_structures)
    return dipoles, energy


def self_consistent_induction(
    alpha: torch.Tensor,
    field: torch.Tensor,
    positions: torch.Tensor,
    batch: torch.Tensor,
    n_structures: int,
    smearing: torch.Tensor,
    solver: str = "cg",
    tolerance: float = 1e-10,
    cell: Optional[torch.Tensor] = None,
    periodic: Optional[torch.Tensor] = None,
    accuracy: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve p = α (E⁰ + T p) for open and fully periodic structures; U = -½ Σ p·E⁰.

    Args:
        alpha: (N,) e·Å²/V, below :func:`catastrophe_free_polarizability`.
        field: E⁰ (N, 3) V/Å.
        positions: (N, 3) Å (may carry gradients).
        batch: (N,) structure index; n_structures: B.
        smearing: σ (Å), the damping width of T.
        solver: ``"cg"`` (shared batched conjugate gradients with implicit
            gradients) or ``"dense"`` (direct solve of the 3N×3N system, the reference).
        tolerance: relative residual of the CG solve.
        cell: (B, 3, 3) Å (may carry gradients), needed for periodic structures.
        periodic: (B,) bool, fully periodic structures (tin-foil Ewald sum of T,
            :mod:`latent_lr.electrostatics.dipole_ewald`); None: all open.
        accuracy: Ewald accuracy of the periodic T (the engine's parameters).

    Returns:
        induced dipoles (N, 3) e·Å and energies (B,) eV.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    if cell is None:
        cell = positions.new_zeros(n_structures, 3, 3)
    if periodic is None:
        periodic = torch.zeros(n_structures, dtype=torch.bool, device=positions.device)
    operator = dipole_operator(positions, cell, periodic, batch, smearing, accuracy)
    scale = alpha.clamp_min(1e-30).sqrt()[:, None]
    rhs = scale * field

    def matvec(x: torch.Tensor) -> torch.Tensor:
        return x - scale * operator.apply(scale * x)

    if solver == "dense":
        n_atoms = positions.shape[0]
        matrix = torch.eye(3 * n_atoms, dtype=field.dtype, device=field.device)
        flat_scale = scale.expand(n_atoms, 3).reshape(-1)
        matrix = matrix - flat_scale[:, None] * operator.dense(n_atoms) * flat_scale[None, :]
        x = torch.linalg.solve(matrix, rhs.reshape(-1)).reshape(n_atoms, 3)
    else:
        x = _conjugate_gradients(matvec, scale, rhs, operator, batch, tolerance)
    atom_energy = (x * (0.5 * matvec(x) - rhs)).sum(dim=1)
    return scale * x, per_structure(atom_energy, batch, n_structures)


def _conjugate_gradients(
    matvec, scale: torch.Tensor, rhs: torch.Tensor, operator: DipoleOperator, batch: torch.Tensor, tolerance: float
) -> torch.Tensor:
    """x = (I - S T S)⁻¹ S E⁰ by the shared batched CG (:func:`latent_lr.linear_solve.solve_spd`).

    The operator is handed to the solver as constants and every dependence on
    positions, cell, charges and polarisabilities is carried by the right-hand side
    of one correction solve, x = x̄ + M̄⁻¹(b - M x̄) with x̄ the converged
    solution: the value is x̄ and the first derivatives are the exact implicit
    ones, dx = M⁻¹(db - dM x).  Because the energy is evaluated in its
    variational form (∂U/∂x = 0), first derivatives of x are all that forces,
    their parameter gradients (training on forces), BECs and the polarisability
    tensor need.
    """
    from .linear_solve import solve_spd

    constant_scale, constant_operator = scale.detach(), operator.detach()

    def constant_matvec(x: torch.Tensor) -> torch.Tensor:
        return x - constant_scale * constant_operator.apply(constant_scale * x)

    with torch.no_grad():
        solution = solve_spd(constant_matvec, rhs.detach(), batch=batch, rtol=tolerance)
    residual = rhs - matvec(solution)
    return solution + solve_spd(constant_matvec, residual, batch=batch, rtol=tolerance, atol=1e-300)
