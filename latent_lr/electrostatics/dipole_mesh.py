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
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from ..units import COULOMB_CONSTANT
from .mesh import (
    _cached_influence,
    _half_weights,
    _mesh_energy,
    _weighted_power,
    bspline_weights_and_derivatives,
    influence_function,
    interpolation_matrix,
    mesh_potential,
    spread_charges,
    structure_spline_points,
)

if TYPE_CHECKING:
    from .state import EngineState


@dataclass
class DipoleMesh:
    """The SPME reciprocal field of the dipoles of one periodic structure.

    Attributes:
        atoms: (n,) rows of the structure.
        points: (n, p³) flat mesh indices (int32) of each atom's spline support.
        gradients: (n, p³, 3) ∇_r W_i(m), 1/Å.
        shape: mesh (K1, K2, K3).
        theta: (K1, K2, K3 // 2 + 1) θ(m) on the rfftn half spectrum, 1/Å.
        values: (n, p³) W_i(m), the charge spreading weights (the charge–dipole coupling), or None.
    """

    atoms: torch.Tensor
    points: torch.Tensor
    gradients: Optional[torch.Tensor]
    shape: tuple[int, int, int]
    theta: torch.Tensor
    values: Optional[torch.Tensor] = None
    #: The separable factors of W and ∇W: weights M_p (n, 3, p), derivatives M_p' (n, 3, p) along each mesh
    #: axis and the map (3, 3) of Cartesian dipoles to mesh-axis ones, p̃ = p · to_mesh (ũ_a = K_a s_a).
    splines: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def detach(self) -> "DipoleMesh":
        values = None if self.values is None else self.values.detach()
        gradients = None if self.gradients is None else self.gradients.detach()
        splines = None if self.splines is None else tuple(t.detach() for t in self.splines)
        return replace(
            self, gradients=gradients, theta=self.theta.detach(), values=values,
            splines=splines,  # type: ignore[arg-type]
        )

    def arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (n, p³), ∇W (n, p³, 3)): built from :attr:`splines` on first use when the mesh was made lazily."""
        if self.values is None or self.gradients is None:
            assert self.splines is not None, "a DipoleMesh needs its arrays or its separable factors"
            self.values, self.gradients = _spline_arrays(*self.splines)
        return self.values, self.gradients

    def dipole_energy(self, charges: torch.Tensor, dipoles: torch.Tensor) -> torch.Tensor:
        """−pᵀG_rec q − ½ pᵀT_rec p of this structure (scalar, eV): the reciprocal energy of the charge and
        dipole density minus that of the charges alone, k_e Σ_m θ (|F(Q_q + Q_p)|² − |F(Q_q)|²).

        Differentiable (any order) in positions, cell, charges (n,) e and dipoles (n, 3) e·Å, and cheaper
        to differentiate than the products: the density is spread by the separable factors (bmm outer
        products, as :func:`.mesh.spread_charges`), never through the (n, p³, 3) gradient array.
        """
        assert self.splines is not None, "build the mesh with dipole_mesh (separable factors)"
        size = self.shape[0] * self.shape[1] * self.shape[2]
        charge_only = spread_charges(charges, self.points.reshape(-1), self.splines[0], size).reshape(1, *self.shape)
        half = _half_weights(self.shape[2], charge_only.dtype, charge_only.device)
        charge_energy = COULOMB_CONSTANT * _mesh_energy(charge_only, self.theta[None], half)[0]
        return self.density_energy(charges, dipoles) - charge_energy

    def density_energy(self, charges: torch.Tensor, dipoles: torch.Tensor) -> torch.Tensor:
        """k_e Σ_m θ |F(Q_q + Q_p)|² (scalar, eV): the reciprocal energy of this structure's charges (n,) e
        and dipoles (n, 3) e·Å together, differentiable as :meth:`dipole_energy`."""
        assert self.splines is not None, "build the mesh with dipole_mesh (separable factors)"
        weights, derivatives, to_mesh = self.splines
        dtype = weights.dtype
        half = _half_weights(self.shape[2], dtype, charges.device)
        energy = _SeparableDensityEnergy.apply(
            charges.to(dtype), dipoles.to(dtype) @ to_mesh, weights, derivatives, self.theta, half,
            self.points.reshape(-1), self.shape,
        )
        return COULOMB_CONSTANT * energy

    def _support_potential(self, density: torch.Tensor) -> torch.Tensor:
        """(n, p³) G = ∂(E/k_e)/∂Q at each atom's support points, of a spread mesh density (n, p³)."""
        size = self.shape[0] * self.shape[1] * self.shape[2]
        grid = density.new_zeros(size).index_add(0, self.points.reshape(-1), density.reshape(-1)).reshape(self.shape)
        potential = 2.0 * size * torch.fft.irfftn(self.theta * torch.fft.rfftn(grid), s=self.shape).reshape(-1)
        return potential[self.points]

    def field(self, dipoles: torch.Tensor) -> torch.Tensor:
        """(n, 3) reciprocal field (T_rec p)_i, V/Å, of this structure's dipoles (n, 3), e·Å."""
        _, gradients = self.arrays()
        potential = self._support_potential((gradients * dipoles[:, None, :]).sum(-1))
        return -COULOMB_CONSTANT * (potential[..., None] * gradients).sum(1)

    def charge_field(self, charges: torch.Tensor) -> torch.Tensor:
        """(n, 3) reciprocal field −k_e Σ_m G(m) ∇W_i(m), V/Å, of this structure's charges (n,), e (tin-foil)."""
        values, gradients = self.arrays()
        potential = self._support_potential(values * charges[:, None])
        return -COULOMB_CONSTANT * (potential[..., None] * gradients).sum(1)

    def joint_products(self, charges: torch.Tensor, dipoles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(:meth:`charge_field` (charges) + :meth:`field` (dipoles), :meth:`dipole_potential` (dipoles)) in one pass:
        each density spread once, one batched FFT pair, one gradient interpolation.  (n, 3) V/Å and (n,) V."""
        size = self.shape[0] * self.shape[1] * self.shape[2]
        values, gradients = self.arrays()
        # bmm contractions: several times faster than broadcast-and-sum over the (n, p³, 3) gradients
        density = torch.stack([values * charges[:, None], torch.bmm(gradients, dipoles[:, :, None])[..., 0]])
        grids = density.new_zeros(2, size).index_add(1, self.points.reshape(-1), density.reshape(2, -1))
        spectrum = self.theta * torch.fft.rfftn(grids.reshape(2, *self.shape), dim=(1, 2, 3))
        potential = 2.0 * size * torch.fft.irfftn(spectrum, s=self.shape, dim=(1, 2, 3)).reshape(2, -1)[:, self.points]
        field = -COULOMB_CONSTANT * torch.bmm((potential[0] + potential[1])[:, None, :], gradients)[:, 0]
        return field, -COULOMB_CONSTANT * (potential[1] * values).sum(1)

    def dipole_potential(self, dipoles: torch.Tensor) -> torch.Tensor:
        """(n,) transpose of :meth:`charge_field` applied to dipoles (n, 3) e·Å: −k_e Σ_m G(m) W_j(m), V."""
        values, gradients = self.arrays()
        potential = self._support_potential((gradients * dipoles[:, None, :]).sum(-1))
        return -COULOMB_CONSTANT * (potential * values).sum(1)


def _separable_density(
    charges: torch.Tensor, along: torch.Tensor, weights: torch.Tensor, derivatives: torch.Tensor,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(n, p³) mesh density of each atom's charge (n,) e and mesh-axis dipole p̃ = p · to_mesh (n, 3) over its
    support, from the separable factors (n, 3, p) of :attr:`DipoleMesh.splines`, by small batched products:

        Q_i(a, b, c) = (q w₀ + p̃₀ d₀)_a w₁_b w₂_c + p̃₁ w₀_a d₁_b w₂_c + p̃₂ w₀_a w₁_b d₂_c.

    ``out``: a contiguous buffer of n p³ elements to write it into (no gradients), or None.
    """
    n = weights.shape[0]
    w0, w1, w2 = weights.unbind(1)
    d0, d1, d2 = derivatives.unbind(1)
    # (n, p, p) outer products by broadcasting (a batched product of p × 2 blocks costs twice as much)
    first = torch.addcmul(
        (charges[:, None] * w0 + along[:, :1] * d0)[:, :, None] * w1[:, None, :], (along[:, 1:2] * w0)[:, :, None],
        d1[:, None, :],
    )
    second = (along[:, 2:] * w0)[:, :, None] * w1[:, None, :]
    factors = torch.stack([first.reshape(n, -1), second.reshape(n, -1)], -1), torch.stack([w2, d2], 1)
    if out is None:
        return torch.bmm(*factors).reshape(n, -1)
    return torch.bmm(*factors, out=out.view(n, -1, weights.shape[2])).view(n, -1)


#: Atoms per pass of the separable spreading and gathering without gradients (:func:`_spread_separable`,
#: :func:`_supports`): one (chunk, p³) buffer of a few MB, reused, instead of (n, p³) arrays of tens of MB at
#: 10⁴ atoms that page-fault on every allocation.
SUPPORT_CHUNK_ATOMS = 1024


def _support_buffer(like: torch.Tensor, n: int, p: int) -> torch.Tensor:
    """An empty buffer (min(n, :data:`SUPPORT_CHUNK_ATOMS`) p³,) of ``like``'s dtype for :func:`_spread_separable`."""
    return like.new_empty(min(n, SUPPORT_CHUNK_ATOMS) * p**3)


def _spread_separable(
    charges: torch.Tensor, along: torch.Tensor, weights: torch.Tensor, derivatives: torch.Tensor,
    points: torch.Tensor, size: int, buffer: Optional[torch.Tensor],
) -> torch.Tensor:
    """(size,) mesh of the separable density (:func:`_separable_density`) of charges (n,) and mesh-axis dipoles
    (n, 3) with flat support points (n p³,): without a ``buffer`` all atoms at once (differentiable), else
    without gradients :data:`SUPPORT_CHUNK_ATOMS` atoms at a time through it (:func:`_support_buffer`)."""
    n, p3 = weights.shape[0], weights.shape[2] ** 3
    grid = weights.new_zeros(size)
    if buffer is None:
        return grid.index_add(0, points, _separable_density(charges, along, weights, derivatives).reshape(-1))
    for start in range(0, n, SUPPORT_CHUNK_ATOMS):
        part = slice(start, min(start + SUPPORT_CHUNK_ATOMS, n))
        m = part.stop - part.start
        density = _separable_density(charges[part], along[part], weights[part], derivatives[part], buffer[: m * p3])
        grid.index_add_(0, points[part.start * p3 : part.stop * p3], density.reshape(-1))
    return grid


def _supports(
    potential: torch.Tensor, points: torch.Tensor, n: int, p: int, buffer: Optional[torch.Tensor]
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(atoms, the mesh values at their supports (m, p², p)): all n atoms at once without a ``buffer``, else in
    passes of :data:`SUPPORT_CHUNK_ATOMS` through it (each view valid until the next pass)."""
    if buffer is None:
        yield slice(0, n), potential.index_select(0, points).reshape(n, p * p, p)
        return
    p3 = p**3
    for start in range(0, n, SUPPORT_CHUNK_ATOMS):
        part = slice(start, min(start + SUPPORT_CHUNK_ATOMS, n))
        m = part.stop - part.start
        support = torch.index_select(potential, 0, points[part.start * p3 : part.stop * p3], out=buffer[: m * p3])
        yield part, support.view(m, p * p, p)


def _density_grid_energy(
    charges: torch.Tensor, along: torch.Tensor, weights: torch.Tensor, derivatives: torch.Tensor,
    theta: torch.Tensor, half: torch.Tensor, points: torch.Tensor, shape: tuple[int, int, int],
) -> torch.Tensor:
    """Σ_m half θ |rfftn(Q)|² (scalar) of the separable density Q of charges and mesh-axis dipoles, by autograd
    (the graph that :class:`_SeparableDensityEnergy` replaces for first derivatives)."""
    grid = _spread_separable(charges, along, weights, derivatives, points, shape[0] * shape[1] * shape[2], None)
    return _mesh_energy(grid.reshape(1, *shape), theta[None], half)[0]


def _separable_gradients(
    support: torch.Tensor, charges: torch.Tensor, along: torch.Tensor, weights: torch.Tensor, derivatives: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ_m S(m) ∂Q(m)/∂(q (m,), p̃ (m, 3), w (m, 3, p), d (m, 3, p)) of the separable density Q of
    :func:`_separable_density`, for the values S (m, p², p) of ∂E/∂Q at each atom's support points (a, b, c)."""
    n, p = weights.shape[0], weights.shape[2]
    w0, w1, w2 = weights.unbind(1)
    d0, d1, d2 = derivatives.unbind(1)
    first = charges[:, None] * w0 + along[:, :1] * d0  # Q = first_a w1_b w2_c + (p̃₁w₀)_a d1_b w2_c + (p̃₂w₀)_a w1_b d2_c
    second, third = along[:, 1:2] * w0, along[:, 2:] * w0
    planes = torch.stack([  # the (a, b) factors of the w₂ and the d₂ terms
        (first[:, :, None] * w1[:, None, :] + second[:, :, None] * d1[:, None, :]).reshape(n, -1),
        (third[:, :, None] * w1[:, None, :]).reshape(n, -1),
    ], 1)  # (m, 2, p²)
    along_c = torch.bmm(support, torch.stack([w2, d2], -1)).reshape(n, p, p, 2)  # Σ_c S w₂, Σ_c S d₂
    grad_c = torch.bmm(planes, support)  # (m, 2, p): ∂/∂w₂, ∂/∂d₂
    with_w2, with_d2 = along_c[..., 0], along_c[..., 1]  # (m, p_a, p_b)
    grad_first = (with_w2 * w1[:, None, :]).sum(2)  # (m, p_a)
    grad_second = (with_w2 * d1[:, None, :]).sum(2)
    grad_third = (with_d2 * w1[:, None, :]).sum(2)
    grad_w0 = charges[:, None] * grad_first + along[:, 1:2] * grad_second + along[:, 2:] * grad_third
    grad_w1 = (first[:, :, None] * with_w2 + third[:, :, None] * with_d2).sum(1)
    grad_d1 = (second[:, :, None] * with_w2).sum(1)
    grad_along = torch.stack([(grad_first * d0).sum(1), (grad_second * w0).sum(1), (grad_third * w0).sum(1)], 1)
    return ((grad_first * w0).sum(1), grad_along, torch.stack([grad_w0, grad_w1, grad_c[:, 0]], 1),
            torch.stack([along[:, :1] * grad_first, grad_d1, grad_c[:, 1]], 1))


class _SeparableDensityEnergy(torch.autograd.Function):
    """Σ_m half θ |rfftn(Q)|² (scalar) of the density Q_i = (q w₀ + p̃₀ d₀) w₁ w₂ + p̃₁ w₀ d₁ w₂ + p̃₂ w₀ w₁ d₂ of
    :func:`_separable_density`, with a first-derivative backward that contracts the mesh potential at the
    supports with the separable factors (two passes over the (n, p³) support, no autograd graph of the
    spreading): gradients in the charges (n,), mesh-axis dipoles p̃ (n, 3), spline factors w, d (n, 3, p)
    (through which positions enter) and θ.  A backward that builds a graph (second derivatives) recomputes
    the energy by autograd (:func:`_density_grid_energy`) and differentiates that.
    """

    @staticmethod
    def forward(ctx: Any, charges: torch.Tensor, along: torch.Tensor, weights: torch.Tensor,
                derivatives: torch.Tensor, theta: torch.Tensor, half: torch.Tensor, points: torch.Tensor,
                shape: tuple[int, int, int]) -> torch.Tensor:
        n, p = weights.shape[0], weights.shape[2]
        buffer = _support_buffer(charges, n, p)
        grid = _spread_separable(charges, along, weights, derivatives, points, shape[0] * shape[1] * shape[2], buffer)
        spectrum = torch.fft.rfftn(grid.reshape(1, *shape), dim=(1, 2, 3))
        ctx.save_for_backward(charges, along, weights, derivatives, theta, half)
        ctx.points, ctx.shape, ctx.spectrum, ctx.buffer = points, shape, spectrum, buffer
        return _weighted_power(spectrum, (theta * half)[None])[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        charges, along, weights, derivatives, theta, half = ctx.saved_tensors
        points, shape, spectrum, buffer = ctx.points, ctx.shape, ctx.spectrum, ctx.buffer  # kept: retain_graph
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # a graph of the gradient: differentiate the autograd form (saved inputs: on it)
            inputs = (charges, along, weights, derivatives, theta)
            energy = _density_grid_energy(*inputs, half, points, shape)
            wanted = [t for t, need in zip(inputs, needs) if need]
            found = iter(torch.autograd.grad(energy, wanted, grad, create_graph=True, allow_unused=True))
            return (*(next(found) if need else None for need in needs[:5]), None, None, None)
        grad_theta = None
        if needs[4]:
            real = torch.view_as_real(spectrum)
            grad_theta = grad * half * (real[..., 0] ** 2 + real[..., 1] ** 2)[0]
        if not any(needs[:4]):
            return None, None, None, None, grad_theta, None, None, None
        n, p = weights.shape[0], weights.shape[2]
        potential = mesh_potential(spectrum, grad * theta[None], list(shape)).reshape(-1)  # ∂E/∂Q on the mesh
        parts = [_separable_gradients(support, charges[part], along[part], weights[part], derivatives[part])
                 for part, support in _supports(potential, points, n, p, buffer)]
        grad_charges, grad_along, grad_weights, grad_derivatives = (torch.cat(found) for found in zip(*parts))
        chosen = [value if need else None
                  for value, need in zip((grad_charges, grad_along, grad_weights, grad_derivatives), needs)]
        return (*chosen, grad_theta, None, None, None)


def _spline_plane(weights: torch.Tensor, derivatives: torch.Tensor) -> torch.Tensor:
    """(n, 3, p²) the (a, b) factors w₀w₁, d₀w₁ and w₀d₁ of W, ∂W/∂ũ₀ and ∂W/∂ũ₁ (∂W/∂ũ₂ is W's with d₂ for w₂),
    from the separable factors (n, 3, p) of :attr:`DipoleMesh.splines`."""
    (w0, w1, _), (d0, d1, _) = weights.unbind(1), derivatives.unbind(1)
    plane = torch.stack([w0[:, :, None] * w1[:, None, :], d0[:, :, None] * w1[:, None, :], w0[:, :, None] * d1[:, None, :]], 1)
    return plane.reshape(weights.shape[0], 3, -1)


def _spline_arrays(
    weights: torch.Tensor, derivatives: torch.Tensor, to_mesh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (n, p³), ∇W (n, p³, 3) 1/Å) from the separable factors of :attr:`DipoleMesh.splines`."""
    stacked = _stacked_spline_arrays(weights, derivatives, to_mesh)
    return stacked[:, 0], stacked[:, 1:].transpose(1, 2)


def _stacked_spline_arrays(weights: torch.Tensor, derivatives: torch.Tensor, to_mesh: torch.Tensor) -> torch.Tensor:
    """(n, 4, p³): W and the three Cartesian components of ∇W (1/Å), from the separable factors of
    :attr:`DipoleMesh.splines` through their (a, b) plane (:func:`_spline_plane`)."""
    n, p = weights.shape[0], weights.shape[2]
    w2, d2 = weights[:, 2], derivatives[:, 2]
    plane = _spline_plane(weights, derivatives)  # (n, 3, p²)
    by_mesh_axis = torch.cat([plane[:, :, :, None] * w2[:, None, None, :],
                              plane[:, :1, :, None] * d2[:, None, None, :]], 1).reshape(n, 4, p**3)  # W, ∂W/∂ũ_a
    return torch.cat([by_mesh_axis[:, :1], torch.matmul(to_mesh, by_mesh_axis[:, 1:])], 1)  # ∂ũ_a/∂r = K_a (A⁻¹)[:, a]


def dipole_mesh(
    positions: torch.Tensor, cell: torch.Tensor, atoms: torch.Tensor, alpha: torch.Tensor,
    shape: tuple[int, int, int], order: int, eager: bool = True, state: Optional["EngineState"] = None,
) -> DipoleMesh:
    """The :class:`DipoleMesh` of one structure (differentiable in positions, cell and alpha).

    Args:
        positions: (N, 3) Å; cell: (3, 3) Å; atoms: (n,) this structure's rows.
        alpha: scalar tensor, the Ewald splitting parameter, 1/Å.
        shape: mesh points along the three lattice vectors; order: B-spline order p ≥ 3.
        eager: build the (n, p³, 3) product arrays now (with their graph); False leaves them to
            :meth:`DipoleMesh.arrays` (e.g. a frozen MD product that builds its own, and an energy that
            uses :meth:`DipoleMesh.dipole_energy` only).
        state: an engine state whose influence-function cache θ is taken from (and kept in) while neither
            the cell nor alpha needs a gradient (:func:`.mesh._cached_influence`); None: always computed.
    """
    if order < 3:
        raise ValueError(f"dipole fields on a mesh need B-splines of order ≥ 3 (a derivative), got {order}.")
    dtype = positions.dtype
    mesh = torch.tensor(shape, device=positions.device)
    inverse = torch.linalg.inv(cell)
    flat, offset = structure_spline_points(positions[atoms], cell, shape, order, index_dtype=torch.int32)
    flat = flat.reshape(len(atoms), -1)
    weights, derivative = bspline_weights_and_derivatives(offset, order)  # (n, 3, p): M_p(t + j), M_p'(t + j)
    splines = (weights, derivative, inverse * mesh.to(dtype))
    if state is None:
        theta = influence_function(cell[None], alpha.reshape(1), shape, order)[0]
    else:
        theta = _cached_influence(
            cell[None], alpha.reshape(1), shape, order, state.influence, state.influence_cache_size
        )[0]
    values, gradients = _spline_arrays(*splines) if eager else (None, None)
    return DipoleMesh(atoms, flat, gradients, shape, theta, values, splines)


#: Spline supports of at most this many points per atom (order ≤ 5) spread (q, p) by fused multiply-adds in
#: :meth:`FrozenJointMesh.products` (10,000 atoms, order 4: ~2 ms instead of ~6 ms); larger ones by bmm.
SMALL_STENCIL = 125


class FrozenJointMesh:
    """The mesh part of the joint charge–dipole product at fixed geometry, one density for both kinds.

    Charges and dipoles are spread into one mesh density Q = Aᵀq + Dᵀp (A the charge spline weights
    W_i(m), D their gradients ∇W_i(m)), solved by one FFT pair, φ = 2K₁K₂K₃ irfftn(θ rfftn(Q)), and
    interpolated twice: the potential k_e A φ (the charge–charge reciprocal term K_rec q of the Coulomb
    operator plus the dipoles' potential −Gᵀp) and the field −k_e D φ (the charges' field G q plus the
    dipoles' T_rec p).  Valid when the Coulomb operator's PME mesh of the structure is this mesh (same
    α, shape and order), whose charge part the caller then leaves out
    (:func:`.coulomb_operator.coulomb_operator` ``include_mesh=False``).  A and D are stacked in one
    (4n, K₁K₂K₃) CSR matrix (one sparse product for both interpolations, instead of a gather and a
    (n, p³, 3) contraction); ``precision`` float32 halves the memory traffic, for loose (MD) solves.
    """

    def __init__(self, mesh: DipoleMesh, precision: torch.dtype):
        assert mesh.splines is not None, "build the mesh with dipole_mesh (separable factors)"
        n, terms = mesh.points.shape[0], mesh.points[0].numel()
        self.atoms, self.shape = mesh.atoms, mesh.shape
        self.size = mesh.shape[0] * mesh.shape[1] * mesh.shape[2]
        self.points = mesh.points.reshape(-1).to(torch.int32)
        with torch.no_grad():  # (n, 4, p³): W_i(m) and the three components of ∇W_i(m); one bmm spreads (q, p)
            self.weights = _stacked_spline_arrays(*(t.detach().to(precision) for t in mesh.splines))
        self.theta = mesh.theta.detach().to(precision)
        columns = self.points.reshape(n, 1, terms).expand(n, 4, terms)
        # rows (i, c): c = 0 the potential, 1-3 the gradient
        self.interpolation = interpolation_matrix(columns, self.weights.reshape(4 * n, terms), self.size)

    def products(self, charges: torch.Tensor, dipoles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(field (n, 3) V/Å, potential (n,) V) of this structure's charges (n,) e and dipoles (n, 3) e·Å."""
        sources = torch.cat([charges[:, None], dipoles], 1).to(self.weights.dtype)
        weights = self.weights
        if weights.shape[2] <= SMALL_STENCIL:  # 4 fused multiply-adds beat a (1 × 4)(4 × p³) bmm per atom there
            density = weights[:, 0] * sources[:, :1]
            for component in range(1, 4):
                density = torch.addcmul(density, weights[:, component], sources[:, component : component + 1])
        else:
            density = torch.bmm(sources[:, None, :], weights)  # (n, 1, p³)
        grid = density.new_zeros(self.size).index_add_(0, self.points, density.reshape(-1))
        spectrum = torch.fft.rfftn(grid.reshape(self.shape)).mul_(self.theta)
        potential = torch.fft.irfftn(spectrum, s=self.shape).reshape(-1).mul_(2.0 * self.size)
        at_atoms = (COULOMB_CONSTANT * torch.mv(self.interpolation, potential)).reshape(-1, 4).to(charges.dtype)
        return -at_atoms[:, 1:], at_atoms[:, 0]


class SeparableJointMesh:
    """:class:`FrozenJointMesh`'s products from the separable spline factors, with no (n, 4, p³) arrays.

    The density Q_i(a, b, c) = (q w₀ + p̃₀ d₀)_a w₁_b w₂_c + p̃₁ w₀_a d₁_b w₂_c + p̃₂ w₀_a w₁_b d₂_c (w, d the
    B-spline values and derivatives along the mesh axes, p̃ = p · to_mesh) is formed by small batched
    products, and φ at each atom's support is contracted axis by axis with (w, d).  Each product costs
    about 1.4x the CSR one, but setting up takes ~1/30 of its time: the choice for operators applied a few
    times only, e.g. the exact residuals of an iteratively refined solve (:func:`.linear_solve.solve_spd`).
    """

    def __init__(self, mesh: DipoleMesh, precision: torch.dtype):
        assert mesh.splines is not None, "build the mesh with dipole_mesh (separable factors)"
        weights, derivatives, self.to_mesh = (t.detach().to(precision) for t in mesh.splines)
        self.atoms, self.shape = mesh.atoms, mesh.shape
        self.size = mesh.shape[0] * mesh.shape[1] * mesh.shape[2]
        self.points = mesh.points.reshape(-1).to(torch.int32)
        self.theta = mesh.theta.detach().to(precision)
        self.weights, self.derivatives = weights, derivatives  # (n, 3, p)
        self.axis2 = torch.stack([weights[:, 2], derivatives[:, 2]], -1)  # (n, p, 2)
        self.plane = _spline_plane(weights, derivatives)
        self._workspace: Optional[torch.Tensor] = None  # see :meth:`products`

    def products(self, charges: torch.Tensor, dipoles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(field (n, 3) V/Å, potential (n,) V) of this structure's charges (n,) e and dipoles (n, 3) e·Å.

        Without gradients the density and the potential at the supports pass through one
        (:data:`SUPPORT_CHUNK_ATOMS`, p³) buffer, kept between products (:func:`_spread_separable`).
        """
        n, p = self.weights.shape[0], self.weights.shape[2]
        along = dipoles.to(self.theta.dtype) @ self.to_mesh
        buffer = None  # with gradients: all atoms at once
        if not (torch.is_grad_enabled() and (charges.requires_grad or dipoles.requires_grad)):
            if self._workspace is None:
                self._workspace = _support_buffer(self.theta, n, p)
            buffer = self._workspace
        grid = _spread_separable(
            charges.to(self.theta.dtype), along, self.weights, self.derivatives, self.points, self.size, buffer
        )
        spectrum = torch.fft.rfftn(grid.reshape(self.shape)).mul_(self.theta)
        potential = torch.fft.irfftn(spectrum, s=self.shape).reshape(-1).mul_(2.0 * self.size)
        parts = []
        for part, support in _supports(potential, self.points, n, p, buffer):  # φ(a, b, c) per atom
            along_c = torch.bmm(support, self.axis2[part])  # (m, p², [w₂, d₂])
            parts.append(torch.bmm(self.plane[part], along_c))  # ([w₀w₁, d₀w₁, w₀d₁], [w₂, d₂])
        full = torch.cat(parts) if len(parts) > 1 else parts[0]
        gradient = torch.stack([full[:, 1, 0], full[:, 2, 0], full[:, 0, 1]], 1) @ self.to_mesh.T  # ∇ of Σ W φ
        at_potential = (COULOMB_CONSTANT * full[:, 0, 0]).to(charges.dtype)
        return (-COULOMB_CONSTANT * gradient).to(charges.dtype), at_potential
