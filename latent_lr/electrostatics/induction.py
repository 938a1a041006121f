"""Induced point dipoles of given polarisabilities: the one-step and self-consistent solvers.

Pure functions of polarisabilities, fields, positions and cell; the learned
polarisabilities and the physics are described in :mod:`latent_lr.polarizability`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .dipole_ewald import DipoleOperator, dipole_operator
from .dipole_tensor import catastrophe_free_polarizability
from .linear_solve import SolveStatistics, solve_spd

SOLVERS = ("cg", "dense")

#: Fraction of the catastrophe bound 1/c that self-consistent polarisabilities may reach.
SAFE_FRACTION = 0.9


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
    initial: Optional[torch.Tensor] = None,
    statistics: Optional[SolveStatistics] = None,
    slab: Optional[torch.Tensor] = None,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve p = α (E⁰ + T p) for open, fully periodic and slab structures; U = -½ Σ p·E⁰.

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
        initial: (N, 3) e·Å, starting dipoles of the CG solve (a warm start, e.g.
            the previous MD step's dipoles; any values are safe), None: cold start.
        statistics: records the CG iteration counts (:class:`~.linear_solve.SolveStatistics`).
        slab: (B,) bool, slabs (pbc = (True, True, False)): T with the engine's slab
            approach (:mod:`latent_lr.electrostatics.dipole_ewald`); None: no slabs.
        method: reciprocal sum of periodic T: ``"auto"`` (PME from 300 atoms, as the
            engine for charges), ``"ewald"`` or ``"pme"`` (:mod:`latent_lr.electrostatics.dipole_mesh`).

    Returns:
        induced dipoles (N, 3) e·Å and energies (B,) eV.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    if cell is None:
        cell = positions.new_zeros(n_structures, 3, 3)
    if periodic is None:
        periodic = torch.zeros(n_structures, dtype=torch.bool, device=positions.device)
    operator = dipole_operator(positions, cell, periodic, batch, smearing, accuracy, slab, method)
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
        start = None if initial is None else initial.detach() / scale.detach()
        x = _conjugate_gradients(matvec, scale, rhs, operator, batch, tolerance, start, statistics)
    atom_energy = (x * (0.5 * matvec(x) - rhs)).sum(dim=1)
    return scale * x, per_structure(atom_energy, batch, n_structures)


def _conjugate_gradients(
    matvec, scale: torch.Tensor, rhs: torch.Tensor, operator: DipoleOperator, batch: torch.Tensor, tolerance: float,
    initial: Optional[torch.Tensor] = None, statistics: Optional[SolveStatistics] = None,
) -> torch.Tensor:
    """x = (I - S T S)⁻¹ S E⁰ by the shared batched CG (:func:`latent_lr.linear_solve.solve_spd`).

    The operator is handed to the solver as constants and every dependence on
    positions, cell, charges and polarisabilities is carried by the right-hand side
    of one correction solve, x = x̄ + M̄⁻¹(b - M x̄) with x̄ the converged
    solution (the warm-started one when ``initial`` is given): the value is x̄
    refined once more, so it does not depend on the start to well below the
    tolerance, and the first derivatives are the exact implicit ones,
    dx = M⁻¹(db - dM x).  Because the energy is evaluated in its
    variational form (∂U/∂x = 0), first derivatives of x are all that forces,
    their parameter gradients (training on forces), BECs and the polarisability
    tensor need.
    """
    constant_scale, constant_operator = scale.detach(), operator.detach()

    def constant_matvec(x: torch.Tensor) -> torch.Tensor:
        return x - constant_scale * constant_operator.apply(constant_scale * x)

    with torch.no_grad():
        solution = solve_spd(
            constant_matvec, rhs.detach(), batch=batch, rtol=tolerance, initial=initial, statistics=statistics
        )
    residual = rhs - matvec(solution)
    return solution + solve_spd(
        constant_matvec, residual, batch=batch, rtol=tolerance, atol=1e-300, statistics=statistics
    )
