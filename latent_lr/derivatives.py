"""Forces and stress of any energy, by one backward pass through the strain trick.

Usable on any energy function of positions and cell: build the energy from
the strained geometry of :class:`latent_lr.strain.StrainedGeometry` (or
:func:`latent_lr.strain.apply_strain`), then call :func:`forces_and_stress`
with the two leaves.

Conventions (ASE): forces F = -∂E/∂r in eV/Å; stress σ = (1/V) ∂E/∂ε in
eV/Å³, symmetrised, V = |det h| the cell volume.  Fully periodic structures
get the full tensor, slabs (pbc = (True, True, False)) the in-plane part
P σ P with P = 1 - n̂ n̂ᵀ (n̂ the unit normal of the plane of the first two
cell vectors; V = A c with the given third vector, vacuum included), open
structures zeros.
"""

from __future__ import annotations

from typing import Optional

import torch

from .electrostatics.slab import unit_normals


def stress_requested(
    requested: Optional[bool], cell: torch.Tensor, periodic: torch.Tensor, slab: torch.Tensor
) -> bool:
    """Whether to compute the stress: ``requested``, or by default if any structure has one.

    The default is True when any structure is periodic, or a slab whose cell has a
    non-zero volume.  Raises ValueError when the stress is requested for a slab
    whose third cell vector is zero (no volume to divide by).

    Args:
        requested: True, False or None (the default rule).
        cell: (B, 3, 3) Å; periodic, slab: (B,) bool.
    """
    has_volume = torch.linalg.det(cell).abs() > 0
    if requested is None:
        return bool((periodic | (slab & has_volume)).any())
    if requested and bool((slab & ~has_volume).any()):
        raise ValueError(
            "the stress of a slab is given per cell volume A·c (eV/Å³, ASE convention), but a "
            "slab's third cell vector is zero; set it to the cell height normal to the plane "
            "(e.g. atoms.center(vacuum=..., axis=2)) or pass compute_stress=False."
        )
    return bool(requested)


def forces_and_stress(
    energy: torch.Tensor,
    positions: Optional[torch.Tensor],
    strain: Optional[torch.Tensor],
    cell: torch.Tensor,
    periodic: torch.Tensor,
    slab: torch.Tensor,
    create_graph: bool = False,
    retain_graph: Optional[bool] = None,
) -> dict[str, torch.Tensor]:
    """``forces`` (N, 3) eV/Å and ``stress`` (B, 3, 3) eV/Å³ from one backward pass.

    Args:
        energy: (B,) total energy, eV, computed from ``positions`` and ``strain``.
        positions: (N, 3) leaf positions, Å, or None for no forces.
        strain: (B, 3, 3) zero leaf strain applied to positions and cell, or None
            for no stress.
        cell: (B, 3, 3) unstrained lattice vectors as rows, Å.
        periodic: (B,) True for fully periodic structures; slab: (B,) True for slabs.
        create_graph: keep the graph of the derivatives (training on forces).
        retain_graph: keep the energy's graph for later backward passes
            (default: ``create_graph``).

    Returns:
        dict with ``forces`` if ``positions`` is given and ``stress`` if ``strain``
        is given; an input the energy does not depend on gets zeros.
    """
    inputs = [x for x in (positions, strain) if x is not None]
    if not inputs:
        return {}
    grads = torch.autograd.grad(
        energy.sum(), inputs, create_graph=create_graph,
        retain_graph=create_graph if retain_graph is None else retain_graph, allow_unused=True,
    )
    grads = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs))
    out: dict[str, torch.Tensor] = {}
    if positions is not None:
        out["forces"] = -grads[0]
    if strain is not None:
        out["stress"] = stress_from_virial(grads[-1], cell, periodic, slab)
    return out


def stress_from_virial(
    strain_gradient: torch.Tensor, cell: torch.Tensor, periodic: torch.Tensor, slab: torch.Tensor
) -> torch.Tensor:
    """(B, 3, 3) stress, eV/Å³: sym(∂E/∂ε) / V for crystals, P σ P for slabs, zeros when open.

    Args:
        strain_gradient: (B, 3, 3) ∂E/∂ε, eV.
        cell: (B, 3, 3) Å; periodic, slab: (B,) bool.
    """
    volume = torch.linalg.det(cell).abs()
    safe = torch.where(volume > 0, volume, torch.ones_like(volume))
    stress = strain_gradient / safe[:, None, None]
    stress = 0.5 * (stress + stress.transpose(1, 2))
    return torch.where(
        periodic[:, None, None], stress,
        torch.where(slab[:, None, None], in_plane(stress, cell, slab), torch.zeros_like(stress)),
    )


def in_plane(stress: torch.Tensor, cell: torch.Tensor, slab: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) P σ P with P = 1 - n̂ n̂ᵀ, n̂ the unit normal of each slab's plane (eV/Å³).

    Rows that are not slabs come back unchanged.

    Args:
        stress: (B, 3, 3) eV/Å³; cell: (B, 3, 3) Å; slab: (B,) bool.
    """
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device)
    normal = unit_normals(torch.where(slab[:, None, None], cell, eye.expand_as(cell)).detach())
    normal = torch.where(slab[:, None], normal, torch.zeros_like(normal))
    projector = eye - normal[:, :, None] * normal[:, None, :]
    return projector @ stress @ projector
