"""A k-space (long-wavelength) preconditioner for the Qeq operator of periodic structures.

The Qeq operator H = D + K (D the diagonal hardness plus Gaussian self-energy,
K the smeared Coulomb matrix) has its largest eigenvalues on long-wavelength
charge modes: for a mode e^{ik·r} in a medium of n sites per volume,
H ≈ d + n K̂(k), K̂(k) = 4π k_e e^{-σ²k²/2}/k², which grows like L² at the
smallest k = 2π/L of a box of side L.  Jacobi-preconditioned CG therefore needs
O(L) iterations.  This preconditioner removes that growth by inverting the
continuum model of H on a coarse mesh:

    P⁻¹ r = D⁻¹r − D⁻¹ A a^{-½} F⁻¹[f(k) F[a^{-½} Aᵀ D⁻¹ r]],
    f(k) = g/(1 + g),  g(k) = n⟨1/d⟩ K̂(k)  (f(0) = 0),

with Aᵀ the B-spline spreading of particle values onto the mesh (A its
transpose, interpolation back), a_m = Σ_i φ_im/d_i the mesh weight of the
spread inverse diagonal, n⟨1/d⟩ = Σ_i (1/d_i)/V and F the FFT on the mesh.
For a smooth mode u, Aᵀ D⁻¹u ≈ a u on the mesh, so P⁻¹u ≈ u/(d (1 + g)):
the Woodbury inverse of d + nK̂ in the continuum limit, with local
normalisation by a (density and hardness fluctuations cancel).

Always symmetric positive definite, whatever the geometry: the B-spline
weights φ_im ≥ 0 sum to 1 over m, so diag(a) ⪰ B = AᵀD⁻¹A (a is B's row sum;
diag(rowsum) − B is a weighted graph Laplacian); with 0 ≤ f < 1 the
subtracted term is ⪯ max f · D^{-½} Ã B⁻¹ Ãᵀ D^{-½} ⪯ max f · D⁻¹
(Ã = D^{-½}A, Ã B⁻¹ Ãᵀ a projection), hence P⁻¹ ⪰ (1 − max f) D⁻¹ ≻ 0.
Being fixed and SPD, it keeps CG's convergence guarantees; a poor model of H
only costs iterations.  Open boundaries and slabs keep the Jacobi D⁻¹.

Cost per application: one spread and one interpolation (p³ mesh points per
atom, p = :data:`ORDER`) and two real FFTs on a mesh of spacing about
:data:`MESH_SPACING` Å; cheaper than one PME product of the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..units import COULOMB_CONSTANT
from .linear_solve import Preconditioner
from .mesh import bspline_weights, interpolation_matrix, spreading_matrix, structure_spline_points

#: Mesh spacing of the preconditioner, Å (resolves the amplified modes, k ≲ 1.2 1/Å in water).
MESH_SPACING = 2.0

#: B-spline order of the spreading and interpolation.
ORDER = 4


@dataclass
class _StructureMesh:
    """The mesh of one periodic structure: smooth_part(v) = M F Mᵀ v with M = A a^{-½}."""

    atoms: torch.Tensor  # (n,) rows of this structure
    points: torch.Tensor  # (n p³,) int32 flat mesh indices, atom-major
    weights: torch.Tensor  # (n, p³) spline weights φ_im times a_m^{-½} (0 where a = 0)
    shape: tuple[int, int, int]
    filter: torch.Tensor  # (K1, K2, K3 // 2 + 1) f(k)

    def __post_init__(self) -> None:
        size = self.shape[0] * self.shape[1] * self.shape[2]
        self.interpolation = interpolation_matrix(self.points, self.weights, size)
        self.spreading = spreading_matrix(self.points.reshape(self.weights.shape), self.weights, size)

    def smooth_part(self, values: torch.Tensor) -> torch.Tensor:
        """A a^{-½} F⁻¹ f F a^{-½} Aᵀ applied to this structure's (n,) values."""
        grid = torch.mv(self.spreading, values)
        grid = torch.fft.irfftn(torch.fft.rfftn(grid.reshape(self.shape)) * self.filter, s=self.shape).reshape(-1)
        return torch.mv(self.interpolation, grid)


def kspace_preconditioner(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    batch: torch.Tensor,
    diagonal: torch.Tensor,
    smearing: torch.Tensor,
    spacing: float = MESH_SPACING,
    order: int = ORDER,
    precision: Optional[torch.dtype] = None,
) -> Preconditioner:
    """``r ↦ P⁻¹ r`` (module docstring) for the Qeq operator H of a batch; built without gradients.

    Args:
        positions: (N, 3) Å; cell: (B, 3, 3) Å; pbc: (B, 3); batch: (N,) sorted.
        diagonal: (N,) d_i = J_i + k_e√(2/π)/σ > 0, eV/e² (H's diagonal).
        smearing: σ, Å.
        spacing: mesh spacing, Å (> 0).
        order: B-spline order (≥ 2).
        precision: dtype of the mesh work (None: the positions' dtype); results keep the residual's dtype.
    """
    if not spacing > 0 or order < 2:
        raise ValueError(f"the k-space preconditioner needs spacing > 0 Å and order ≥ 2, got {spacing}, {order}.")
    with torch.no_grad():
        positions, cell, diagonal = positions.detach(), cell.detach(), diagonal.detach()
        sigma = float(torch.as_tensor(smearing).detach())
        inverse_diagonal = 1.0 / diagonal
        meshes = [
            _structure_mesh(
                positions, cell[b], torch.nonzero(batch == b).flatten(), inverse_diagonal, sigma, spacing, order,
                precision or positions.dtype,
            )
            for b in torch.nonzero(pbc.all(dim=1)).flatten().tolist()
        ]

    def apply(residual: torch.Tensor) -> torch.Tensor:
        if residual.ndim != 1:
            raise ValueError(f"the k-space preconditioner acts on (N,) charges, got shape {tuple(residual.shape)}.")
        scaled = inverse_diagonal.to(residual.dtype) * residual
        result = scaled
        for mesh in meshes:
            smooth = mesh.smooth_part(scaled[mesh.atoms].to(mesh.weights.dtype)).to(residual.dtype)
            correction = inverse_diagonal[mesh.atoms] * smooth
            result = result.index_add(0, mesh.atoms, -correction)
        return result

    return apply


def _structure_mesh(
    positions: torch.Tensor, cell: torch.Tensor, atoms: torch.Tensor, inverse_diagonal: torch.Tensor,
    sigma: float, spacing: float, order: int, precision: torch.dtype,
) -> _StructureMesh:
    dtype, device = positions.dtype, positions.device
    lengths = cell.norm(dim=1).tolist()
    k1, k2, k3 = (max(order, math.ceil(length / spacing)) for length in lengths)
    shape = (k1, k2, k3)
    flat, offset = structure_spline_points(positions[atoms], cell, shape, order)
    flat = flat.reshape(len(atoms), -1)
    weights = bspline_weights(offset, order)  # (n, 3, p)
    product = (weights[:, 0, :, None, None] * weights[:, 1, None, :, None] * weights[:, 2, None, None, :]).reshape(
        len(atoms), -1
    )
    size = shape[0] * shape[1] * shape[2]
    inverse = inverse_diagonal[atoms].to(dtype)
    mesh_weight = positions.new_zeros(size).index_add_(0, flat.reshape(-1), (product * inverse[:, None]).reshape(-1))
    floor = 1e-12 * float(mesh_weight.max())
    inverse_sqrt_weight = torch.where(mesh_weight > floor, mesh_weight.clamp_min(floor).rsqrt(), torch.zeros_like(mesh_weight))
    volume = float(torch.linalg.det(cell).abs())
    frequencies = [torch.fft.fftfreq(k, 1.0 / k, dtype=dtype, device=device) for k in shape[:2]]
    frequencies.append(torch.fft.rfftfreq(shape[2], 1.0 / shape[2], dtype=dtype, device=device))
    integers = torch.stack(torch.meshgrid(*frequencies, indexing="ij"), dim=-1)
    k_vectors = 2.0 * math.pi * integers @ torch.linalg.inv(cell).T
    k_squared = (k_vectors * k_vectors).sum(-1)
    safe = torch.where(k_squared > 0, k_squared, torch.ones_like(k_squared))
    kernel = 4.0 * math.pi * COULOMB_CONSTANT * torch.exp(-0.5 * sigma**2 * safe) / safe
    gain = float(inverse.sum()) / volume * kernel
    response = torch.where(k_squared > 0, gain / (1.0 + gain), torch.zeros_like(gain))
    scaled = (product * inverse_sqrt_weight[flat]).to(precision)
    return _StructureMesh(atoms, flat.reshape(-1).to(torch.int32), scaled, shape, response.to(precision))
