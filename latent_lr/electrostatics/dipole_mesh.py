"""Reciprocal part of the periodic dipole field tensor T by smooth particle-mesh Ewald.

The Ewald reciprocal field of :mod:`.dipole_ewald` costs O(N K) per product;
for large cells the same sum is evaluated on a mesh (Essmann et al., J. Chem.
Phys. 103, 8577 (1995), applied to point dipoles as the derivative of the
charge spreading).  A point dipole p_j at r_j is the derivative of a unit
charge along p_j, so its B-spline mesh density is

    Q(m) = Σ_j p_j · ∇_{r_j} W_j(m),   W_j(m) = Π_a M_p(u_ja − m_a),  u = K s (s fractional),

the reciprocal energy is E(p) = k_e Σ_{m≠0} θ(m) |FFT(Q)(m)|² with the
charge sum's influence function θ (:func:`.mesh.influence_function`), and the field
(T_rec p)_i = −∂E/∂p_i = −k_e Σ_m G(m) ∇_{r_i} W_i(m), G = ∂(E/k_e)/∂Q
= 2 K₁K₂K₃ irfftn(θ rfftn(Q)).  ``E(p) = −½ pᵀ T_rec p`` is the dipolar
counterpart of the engine's PME energy of charges, so T built with it is the
Hessian of the engine's PME energy (up to the mesh error, the engine's
``accuracy``), and the real-space pairs and the self term are the same as
for Ewald with the PME parameters (:func:`.mesh_parameters.mesh_parameters`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..units import COULOMB_CONSTANT
from .mesh import bspline_weights, influence_function, structure_spline_points


@dataclass
class DipoleMesh:
    """The SPME reciprocal field of the dipoles of one periodic structure.

    Attributes:
        atoms: (n,) rows of the structure.
        points: (n, p³) flat mesh indices of each atom's spline support.
        gradients: (n, p³, 3) ∇_r W_i(m), 1/Å.
        shape: mesh (K1, K2, K3).
        theta: (K1, K2, K3 // 2 + 1) θ(m) on the rfftn half spectrum, 1/Å.
        values: (n, p³) W_i(m), the charge spreading weights (the charge–dipole coupling), or None.
    """

    atoms: torch.Tensor
    points: torch.Tensor
    gradients: torch.Tensor
    shape: tuple[int, int, int]
    theta: torch.Tensor
    values: Optional[torch.Tensor] = None

    def detach(self) -> "DipoleMesh":
        values = None if self.values is None else self.values.detach()
        return replace(self, gradients=self.gradients.detach(), theta=self.theta.detach(), values=values)

    def _support_potential(self, density: torch.Tensor) -> torch.Tensor:
        """(n, p³) G = ∂(E/k_e)/∂Q at each atom's support points, of a spread mesh density (n, p³)."""
        size = self.shape[0] * self.shape[1] * self.shape[2]
        grid = density.new_zeros(size).index_add(0, self.points.reshape(-1), density.reshape(-1)).reshape(self.shape)
        potential = 2.0 * size * torch.fft.irfftn(self.theta * torch.fft.rfftn(grid), s=self.shape).reshape(-1)
        return potential[self.points]

    def field(self, dipoles: torch.Tensor) -> torch.Tensor:
        """(n, 3) reciprocal field (T_rec p)_i, V/Å, of this structure's dipoles (n, 3), e·Å."""
        potential = self._support_potential((self.gradients * dipoles[:, None, :]).sum(-1))
        return -COULOMB_CONSTANT * (potential[..., None] * self.gradients).sum(1)

    def charge_field(self, charges: torch.Tensor) -> torch.Tensor:
        """(n, 3) reciprocal field −k_e Σ_m G(m) ∇W_i(m), V/Å, of this structure's charges (n,), e (tin-foil)."""
        assert self.values is not None, "build the mesh with dipole_mesh (charge weights)"
        potential = self._support_potential(self.values * charges[:, None])
        return -COULOMB_CONSTANT * (potential[..., None] * self.gradients).sum(1)

    def joint_products(self, charges: torch.Tensor, dipoles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(:meth:`charge_field` (charges) + :meth:`field` (dipoles), :meth:`dipole_potential` (dipoles)) in one pass:
        each density spread once, one batched FFT pair, one gradient interpolation.  (n, 3) V/Å and (n,) V."""
        size = self.shape[0] * self.shape[1] * self.shape[2]
        assert self.values is not None, "build the mesh with dipole_mesh (charge weights)"
        # bmm contractions: several times faster than broadcast-and-sum over the (n, p³, 3) gradients
        density = torch.stack([self.values * charges[:, None], torch.bmm(self.gradients, dipoles[:, :, None])[..., 0]])
        grids = density.new_zeros(2, size).index_add(1, self.points.reshape(-1), density.reshape(2, -1))
        spectrum = self.theta * torch.fft.rfftn(grids.reshape(2, *self.shape), dim=(1, 2, 3))
        potential = 2.0 * size * torch.fft.irfftn(spectrum, s=self.shape, dim=(1, 2, 3)).reshape(2, -1)[:, self.points]
        field = -COULOMB_CONSTANT * torch.bmm((potential[0] + potential[1])[:, None, :], self.gradients)[:, 0]
        return field, -COULOMB_CONSTANT * (potential[1] * self.values).sum(1)

    def dipole_potential(self, dipoles: torch.Tensor) -> torch.Tensor:
        """(n,) transpose of :meth:`charge_field` applied to dipoles (n, 3) e·Å: −k_e Σ_m G(m) W_j(m), V."""
        assert self.values is not None, "build the mesh with dipole_mesh (charge weights)"
        potential = self._support_potential((self.gradients * dipoles[:, None, :]).sum(-1))
        return -COULOMB_CONSTANT * (potential * self.values).sum(1)


def dipole_mesh(
    positions: torch.Tensor, cell: torch.Tensor, atoms: torch.Tensor, alpha: torch.Tensor,
    shape: tuple[int, int, int], order: int,
) -> DipoleMesh:
    """The :class:`DipoleMesh` of one structure (differentiable in positions, cell and alpha).

    Args:
        positions: (N, 3) Å; cell: (3, 3) Å; atoms: (n,) this structure's rows.
        alpha: scalar tensor, the Ewald splitting parameter, 1/Å.
        shape: mesh points along the three lattice vectors; order: B-spline order p ≥ 3.
    """
    device, dtype = positions.device, positions.dtype
    mesh = torch.tensor(shape, device=device)
    inverse = torch.linalg.inv(cell)
    flat, offset = structure_spline_points(positions[atoms], cell, shape, order)
    flat = flat.reshape(len(atoms), -1)
    weights = bspline_weights(offset, order)  # (n, 3, p): M_p(t + j)
    lower = bspline_weights(offset, order - 1)  # (n, 3, p - 1): M_{p-1}(t + j)
    zero = torch.zeros_like(lower[..., :1])
    derivative = torch.cat([lower, zero], -1) - torch.cat([zero, lower], -1)  # M_p'(x) = M_{p-1}(x) - M_{p-1}(x-1)
    w0, w1, w2 = weights[:, 0], weights[:, 1], weights[:, 2]
    d0, d1, d2 = derivative[:, 0], derivative[:, 1], derivative[:, 2]
    by_u = torch.stack([
        d0[:, :, None, None] * w1[:, None, :, None] * w2[:, None, None, :],
        w0[:, :, None, None] * d1[:, None, :, None] * w2[:, None, None, :],
        w0[:, :, None, None] * w1[:, None, :, None] * d2[:, None, None, :],
    ], dim=-1).reshape(len(atoms), -1, 3)  # ∂W/∂u_a
    gradients = (by_u * mesh.to(dtype)) @ inverse.T  # ∂u_a/∂r = K_a (A⁻¹)[:, a]
    if order < 3:
        raise ValueError(f"dipole fields on a mesh need B-splines of order ≥ 3 (a derivative), got {order}.")
    theta = influence_function(cell[None], alpha.reshape(1), shape, order)[0]
    values = (w0[:, :, None, None] * w1[:, None, :, None] * w2[:, None, None, :]).reshape(len(atoms), -1)
    return DipoleMesh(atoms, flat, gradients, shape, theta, values)

