"""Electric field at the atoms from (smeared) charges, consistent with the energy.

Construction
------------
Write the engine's energy as E_c(q) = ½ qᵀA(r)q (eV).  For every pair term
k_e q_i q_j ψ(r_ij), ∂E_c/∂r_i = -q_i F_i(q), with F_i(q) the field (V/Å) at
atom i from all *other* charges and all periodic images (self-image and
background terms do not depend on positions).  For the bilinear form
B(u, q) = uᵀAq = ½ [E_c(q + u) - E_c(q - u)],

    ∂B(u, q)/∂r_i = -u_i F_i(q) - q_i F_i(u).

With u = 1 (every charge one), F_i(1) = -∂E_c(1)/∂r_i, hence

    F_i(q) = -∂B(1, q)/∂r_i - q_i F_i(1).

Only :func:`coulomb_energy` and autograd are used, so the field is exactly the
one whose work the engine's energy describes — for the direct sum, Ewald and
any other method the engine offers — and no division by q_i is needed.  The
field is built with ``create_graph=True``: energies made from it (induced
dipoles) have exact forces and stress.

For periodic structures the field is that of tin-foil (conducting) boundary
conditions: the charges' own macroscopic field is zero, so a uniform applied
field is the total macroscopic field (the fixed-E ensemble).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from .coulomb import coulomb_energy
from .state import EngineState
from .validation import PbcLike, require_autograd


def electric_field(
    positions: torch.Tensor,
    charges: torch.Tensor,
    *,
    cell: Optional[torch.Tensor] = None,
    pbc: PbcLike = None,
    batch: Optional[torch.Tensor] = None,
    smearing: Union[float, torch.Tensor] = 0.0,
    state: Optional[EngineState] = None,
    **engine_options: Any,
) -> torch.Tensor:
    """Field at every atom from all other charges (and images), V/Å.

    Args:
        positions: (N, 3) Å; may be a non-leaf tensor carrying gradients
            (e.g. strained positions): the field is differentiable in
            positions, cell, charges and smearing (double backward works).
            Charges may depend on the positions; the field is still the
            derivative at fixed charges.
        charges: (N,) e.
        cell, pbc, batch, smearing: as for :func:`latent_lr.coulomb_energy`.
        state: the run's :class:`~.state.EngineState`, or None (no mutable
            state: the field depends on the arguments only), as for
            :func:`latent_lr.coulomb_energy`.
        **engine_options: passed on to :func:`coulomb_energy` (``accuracy``,
            ``method``, ...).

    Returns:
        (N, 3) field F_i = -Σ_j k_e q_j ∇_i ψ(r_ij), V/Å, with ψ the engine's
        (smeared) pair kernel; under ``torch.no_grad()`` the same values, without a graph.
    """
    require_autograd("electric_field")
    if not torch.is_grad_enabled():  # the field is a derivative: build it with autograd, return it detached
        with torch.enable_grad():
            return electric_field(
                positions, charges, cell=cell, pbc=pbc, batch=batch, smearing=smearing, state=state, **engine_options
            ).detach()
    # Differentiate with respect to a copy of the positions that the charges were
    # not computed from: the field is ∂/∂r at *fixed* charges, even when the
    # charges themselves depend on the positions (latent or Qeq charges).
    positions = positions.clone() if positions.requires_grad else positions.detach().requires_grad_(True)
    ones = torch.ones_like(charges)

    def energy(q: torch.Tensor) -> torch.Tensor:
        return coulomb_energy(
            positions, q, cell=cell, pbc=pbc, batch=batch, smearing=smearing, state=state,
            **engine_options
        ).sum()

    def gradient(value: torch.Tensor) -> torch.Tensor:
        if not value.requires_grad:  # e.g. lone atoms: no pair depends on positions
            return torch.zeros_like(positions)
        (g,) = torch.autograd.grad(value, positions, create_graph=True, allow_unused=True)
        return torch.zeros_like(positions) if g is None else g

    bilinear = 0.5 * (energy(charges + ones) - energy(charges - ones))
    return -gradient(bilinear) + charges[:, None] * gradient(energy(ones))
