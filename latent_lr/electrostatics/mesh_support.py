"""Which mesh points a B-spline of each atom touches, for one periodic structure's own mesh.

Shared by the dipole mesh (:mod:`.dipole_mesh`) and the k-space preconditioner
(:mod:`.kspace_preconditioner`); the charge PME (:mod:`.mesh`) lays out many
structures in one buffer and keeps its own indexing.
"""

from __future__ import annotations

import torch


def spline_support(
    positions: torch.Tensor, inverse_cell: torch.Tensor, shape: tuple[int, int, int], order: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fractional offsets and flat mesh indices of the p³ points each atom's spline touches.

    Args:
        positions: (n, 3) Å (may carry gradients); inverse_cell: (3, 3) inverse of the
            lattice vectors as rows, 1/Å; shape: mesh (K1, K2, K3); order: B-spline order p.

    Returns:
        offsets t (n, 3) in [0, 1) (differentiable; the weights of point
        ``below − j`` along an axis are M_p(t + j), see :func:`.mesh.bspline_weights`)
        and flat indices (n, p³) into the C-ordered mesh (index data, no gradient).
    """
    mesh = torch.tensor(shape, device=positions.device)
    scaled = (positions @ inverse_cell) * mesh.to(positions.dtype)
    below = torch.floor(scaled.detach())
    steps = torch.arange(order, device=positions.device)
    index = torch.remainder(below.long()[:, :, None] - steps, mesh[None, :, None])  # (n, 3, p)
    flat = (
        index[:, 0, :, None, None] * (shape[1] * shape[2]) + index[:, 1, None, :, None] * shape[2]
        + index[:, 2, None, None, :]
    ).reshape(len(positions), -1)
    return scaled - below, flat
