"""A host backbone plus the long-range module: energies, forces, stress, BECs."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .backbone import Backbone
from .data import AtomsBatch
from .electrostatics.slab import unit_normals
from .long_range import LongRangeModule
from .properties import born_effective_charges, dipole_moment


class LongRangeModel(nn.Module):
    """Energy = host energy + long-range energy; forces and stress from the total.

    Forces and stress are derivatives of the *total* energy with respect to
    positions and a homogeneous strain ε applied to positions and cell alike,
    so the long-range term reaches the virial too.  Stress follows ASE's
    convention, σ = (1/V) ∂E/∂ε, in eV/Å³.

    Slabs (pbc = (True, True, False), open along the unit normal n̂ of the
    plane of the first two cell vectors) are first-class: the Coulomb energy
    and forces come from the engine's slab sum (in-plane images only, no
    dependence on the vacuum in the cell), and the stress holds the in-plane
    components only, σ_slab = P σ P with P = 1 - n̂ n̂ᵀ.  The out-of-plane
    components σ·n̂ are reported as zero: the surfaces of a slab in vacuum
    are traction-free, and ∂E/∂ε along n̂ would rescale the vacuum together
    with the slab, which is no mechanical load.  V is the cell volume A c
    with the given third vector (length c, vacuum included), as in ASE, so
    c σ_slab is the surface stress in eV/Å²; a slab whose third vector is
    zero has no stress in eV/Å³ (asking for it raises ValueError).  Slabs
    report a dipole per cell instead of a polarisation (see
    :mod:`latent_lr.properties`).

    Args:
        backbone: adapter around the host model.
        long_range: the long-range module, or None for the short-range twin.
    """

    def __init__(self, backbone: Backbone, long_range: Optional[LongRangeModule]):
        super().__init__()
        self.backbone = backbone
        self.long_range = long_range
        #: Per-element reference energies E_ref(Z), eV, added to every atom (fitted by training).
        self.register_buffer("reference_energy", torch.zeros(119, dtype=torch.float64))

    @property
    def dtype(self) -> torch.dtype:
        for parameter in self.parameters():
            if parameter.dtype.is_floating_point:
                return parameter.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        for parameter in self.parameters():
            return parameter.device
        return torch.device("cpu")

    def freeze_host(self, frozen: bool = True) -> "LongRangeModel":
        """Stop (or restart) training the host; only the long-range head learns."""
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(not frozen)
        return self

    def forward(
        self,
        data: AtomsBatch,
        compute_forces: bool = True,
        compute_stress: Optional[bool] = None,
        compute_bec: bool = False,
        create_graph: Optional[bool] = None,
        compute_polarizability: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Predict a batch.

        Args:
            data: structures (cast to the model's dtype and device here).
            compute_forces: return ``forces`` (N, 3), eV/Å.
            compute_stress: return ``stress`` (B, 3, 3), eV/Å³, in-plane only for
                slabs (default: if any structure is periodic or a slab with a
                non-zero cell volume; zeros for open structures).
            compute_bec: return ``bec`` (N, 3, 3), e: ∂M/∂r of the total moment M
                (charges and induced dipoles).
            create_graph: keep the graph of derivatives for training on forces
                (default: ``self.training``).
            compute_polarizability: return ``polarizability`` (B, 3, 3) =
                ∂M_α/∂E_ext,β in e·Å²/V, M the dipole (open) or cell dipole Ω P
                (periodic), by autograd with the field as an input (3 backward passes).

        Returns:
            dict with ``energy`` (B,), ``host_energy`` (B,) (host plus per-element
            reference energies), ``long_range_energy`` (B,) (Coulomb plus induction),
            ``field_energy`` (B,) (-(Σ q_i r_i)·E_ext, zero without a field) in eV, and
            when the long-range module is on ``charges`` (N,), ``dipole`` (B, 3),
            ``polarization`` (B, 3) (plus ``induced_dipoles`` etc. with
            polarisabilities, see :class:`LongRangeModule`), plus requested derivatives.
        """
        data = self._prepare(data)
        if compute_polarizability:
            if self.long_range is None:
                raise ValueError("the polarisability tensor needs the long-range module (latent charges).")
            data.external_field = data.external_field.detach().requires_grad_(True)
        create_graph = self.training if create_graph is None else create_graph
        has_volume = torch.linalg.det(data.cell).abs() > 0
        if compute_stress is None:
            compute_stress = bool((data.periodic | (data.slab & has_volume)).any())
        elif compute_stress and bool((data.slab & ~has_volume).any()):
            raise ValueError(
                "the stress of a slab is given per cell volume A·c (eV/Å³, ASE convention), but a "
                "slab's third cell vector is zero; set it to the cell height normal to the plane "
                "(e.g. atoms.center(vacuum=..., axis=2)) or pass compute_stress=False."
            )
        positions = data.positions.detach().requires_grad_(compute_forces or compute_bec)
        strain = torch.zeros(
            data.n_structures, 3, 3, dtype=positions.dtype, device=positions.device,
            requires_grad=compute_stress,
        )
        strained_positions = positions + torch.einsum("ni,nij->nj", positions, strain[data.batch])
        strained_cell = data.cell + torch.bmm(data.cell, strain)
        geometry = data.with_geometry(strained_positions, strained_cell)

        host_energy, features = self.backbone(geometry)
        reference = self.reference_energy.to(host_energy.dtype)[data.numbers]
        host_energy = host_energy + host_energy.new_zeros(data.n_structures).index_add(0, data.batch, reference)
        out: dict[str, torch.Tensor] = {"host_energy": host_energy}
        if self.long_range is not None:
            long_range = self.long_range(features, geometry)
            out.update(long_range)
            out["long_range_energy"] = out.pop("energy")
        else:
            out["long_range_energy"] = torch.zeros_like(host_energy)
        out["field_energy"] = self._field_energy(geometry, out)
        energy = host_energy + out["long_range_energy"] + out["field_energy"]
        out["energy"] = energy

        inputs = ([positions] if compute_forces else []) + ([strain] if compute_stress else [])
        if inputs:
            grads = torch.autograd.grad(
                energy.sum(), inputs, create_graph=create_graph,
                retain_graph=create_graph or compute_bec or compute_polarizability, allow_unused=True,
            )
            grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
            if compute_forces:
                out["forces"] = -grads[0]
            if compute_stress:
                volume = torch.linalg.det(data.cell).abs()
                safe = torch.where(volume > 0, volume, torch.ones_like(volume))
                stress = grads[-1] / safe[:, None, None]
                stress = 0.5 * (stress + stress.transpose(1, 2))
                out["stress"] = torch.where(
                    data.periodic[:, None, None], stress,
                    torch.where(data.slab[:, None, None], _in_plane(stress, data.cell, data.slab), torch.zeros_like(stress)),
                )
        if compute_bec:
            if self.long_range is None:
                raise ValueError("Born effective charges need the long-range module (latent charges).")
            out["bec"] = born_effective_charges(
                out["charges"], positions, data.cell, data.pbc, data.batch, create_graph=create_graph,
                induced_dipoles=out.get("induced_dipoles"),
            )
        if compute_polarizability:
            out["polarizability"] = self._polarizability(data, out, create_graph)
        if not create_graph:
            out = {key: value.detach() for key, value in out.items()}
        return out

    def _field_energy(self, data: AtomsBatch, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """-(Σ_i q_i r_i)·E_ext (eV) in a uniform external field E_ext (V/Å).

        Fixed-field ensemble (the field, not the displacement, is held fixed):
        the field does work on the latent charges, the force on atom i is
        q_i E_ext (plus the field's effect through charges that move with the
        geometry).  The induced dipoles' -Σ p_i·E_ext is part of the induction
        energy of the long-range module and is not counted here.

        * Open structures: Σ q_i r_i about the coordinate origin (for a charged
          structure the origin only shifts the energy zero; the force Q E_ext
          on the net charge is physical).
        * Periodic structures: the positions *as given* are used (unwrapped
          trajectory positions: do not wrap atoms back into the cell during a
          run).  Forces q_i E_ext are well defined; the energy zero depends on
          the periodic image chosen for each atom, because Ω P = Σ q_i r_i is
          defined only modulo the polarisation quantum (Berry phase).  This is
          the electric-enthalpy functional of Nunes & Gonze (PRB 63, 155107,
          2001) and Umari & Pasquarello (PRL 89, 157602, 2002) with the
          Berry-phase polarisation replaced by the latent point-charge one; in
          DFT it is valid below the Zener breakdown field, and here latent
          charges follow the local environment only (they do not flow across
          the cell in response to the field).  In a field the stress includes
          the branch-dependent term -Σ q_i r_iα E_β (the "improper" part).

        With charges independent of E_ext the energy is linear in E_ext apart
        from the induction energy, and ∂F_iβ/∂E_α = Z*_i,αβ = ∂M_α/∂r_iβ.
        """
        field = data.external_field
        in_field = (field != 0).any(dim=1)
        if not bool(in_field.any()) and not field.requires_grad:
            return torch.zeros_like(out["host_energy"])
        if self.long_range is None:
            raise ValueError(
                "an external field acts on charges, but this model has no long-range module; "
                "wrap the host with long_range=True or remove atoms.info['external_field']."
            )
        charge_dipole = dipole_moment(out["charges"], data.positions, data.batch, data.n_structures)
        return -(charge_dipole * field.to(charge_dipole.dtype)).sum(dim=1)

    def _polarizability(self, data: AtomsBatch, out: dict[str, torch.Tensor], create_graph: bool) -> torch.Tensor:
        """(B, 3, 3) ∂M_α/∂E_ext,β, e·Å²/V (M: dipole, or Ω P for periodic structures)."""
        volume = torch.linalg.det(data.cell).abs()
        moment = torch.where(data.periodic[:, None], out["polarization"] * volume[:, None], out["dipole"])
        rows = []
        for alpha in range(3):
            (g,) = torch.autograd.grad(
                moment[:, alpha].sum(), data.external_field, retain_graph=True,
                create_graph=create_graph, allow_unused=True,
            ) if moment.requires_grad else (None,)
            rows.append(torch.zeros_like(data.external_field) if g is None else g)
        return torch.stack(rows, dim=1)

    def _prepare(self, data: AtomsBatch) -> AtomsBatch:
        if not isinstance(data, AtomsBatch):
            raise ValueError(
                f"expected a latent_lr.AtomsBatch, got {type(data).__name__}; build one with "
                "AtomsBatch.from_atoms(list_of_ase_atoms)."
            )
        data = data.to(device=self.device, dtype=self.dtype)
        counts = data.n_atoms
        if data.positions.shape[0] == 0 or bool((counts == 0).any()):
            raise ValueError("a structure has no atoms; every structure needs at least one atom.")
        if not torch.isfinite(data.positions).all():
            raise ValueError("positions contain NaN or inf; every coordinate must be finite.")
        self.backbone.check_elements(data.numbers)
        if data.external_field is None:
            data.external_field = data.positions.new_zeros(data.n_structures, 3)
        return data

    def config(self) -> dict[str, Any]:
        """Everything :func:`latent_lr.load` needs besides the state_dict."""
        return {
            "backbone": self.backbone.name,
            "host": self.backbone.host_config(),
            "adapter_options": self.backbone.options(),
            "long_range": None if self.long_range is None else dict(self.long_range.config),
            "dtype": str(self.dtype).replace("torch.", ""),
        }


def _in_plane(stress: torch.Tensor, cell: torch.Tensor, slab: torch.Tensor) -> torch.Tensor:
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
