"""A host backbone plus the long-range module: energies, forces, stress, BECs."""

from __future__ import annotations

import fnmatch
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .backbone import Backbone
from .data import AtomsBatch
from .derivatives import forces_and_stress, stress_requested
from .electrostatics import EngineState
from .energy_terms import field_energy, reference_energy
from .info_keys import InfoKeys
from .long_range import LongRangeModule
from .properties import born_effective_charges, cell_moment, polarizability_tensor
from .strain import StrainedGeometry


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

    reference_energy: torch.Tensor  # buffer (119,) float64, eV: E_ref(Z) by atomic number

    def __init__(self, backbone: Backbone, long_range: Optional[LongRangeModule]):
        super().__init__()
        self.backbone = backbone
        self.long_range = long_range
        #: Per-element reference energies E_ref(Z), eV, added to every atom (fitted by training).
        self.register_buffer("reference_energy", torch.zeros(119, dtype=torch.float64))
        #: info keys of the net charge and total spin (those training read; saved with the model).
        self.info_keys = InfoKeys()

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

    @property
    def reads_spin(self) -> bool:
        """Whether the model reads the total spin 2S_z (``LongRangeConfig.spin_channel``); spin-blind
        models ignore ``atoms.info['spin']`` / ``['multiplicity']`` and never check them."""
        return self.long_range is not None and bool(self.long_range.config.spin_channel)

    @property
    def spin_keys(self) -> tuple[Optional[str], Optional[str]]:
        """The (spin, multiplicity) info keys this model reads: :attr:`info_keys`' for a model that
        reads the total spin, (None, None) for a spin-blind one, which ignores them and never checks them."""
        if not self.reads_spin:
            return None, None
        return self.info_keys.total_spin, self.info_keys.multiplicity

    def freeze_host(self, frozen: bool = True, trainable: Sequence[str] = ()) -> "LongRangeModel":
        """Stop (or restart) training the host; only the long-range head learns.

        Args:
            frozen: False makes every host parameter trainable again.
            trainable: glob patterns of host parameter names (as in
                ``backbone.host.named_parameters()``, e.g. ``"readouts.*"``)
                that keep training while the rest is frozen.
        """
        names = [name for name, _ in self.backbone.host.named_parameters()]
        unmatched = [pattern for pattern in trainable if not fnmatch.filter(names, pattern)]
        if unmatched:
            raise ValueError(f"trainable host parameter patterns {unmatched} match no parameter of the host; its names "
                             f"look like {names[:3]} (of {len(names)}).")
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(not frozen)
        for name, parameter in self.backbone.host.named_parameters():
            if frozen and any(fnmatch.fnmatchcase(name, pattern) for pattern in trainable):
                parameter.requires_grad_(True)
        return self

    def forward(
        self,
        data: AtomsBatch,
        compute_forces: bool = True,
        compute_stress: Optional[bool] = None,
        compute_bec: bool = False,
        create_graph: Optional[bool] = None,
        compute_polarizability: bool = False,
        engine_state: Optional[EngineState] = None,
        check_inputs: bool = True,
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
            engine_state: the electrostatics engine's state for this run (PME keeps
                its mesh, caches); default: the long-range module's own
                (:class:`~latent_lr.electrostatics.EngineState`).
            check_inputs: check for empty structures, non-finite positions and unknown
                elements; each check waits for the device (a host synchronisation), so
                callers that checked their structures already (the trainer does when it
                reads them) pass False.

        Returns:
            dict with ``energy`` (B,), ``host_energy`` (B,) (host plus per-element
            reference energies), ``long_range_energy`` (B,) (Coulomb plus induction),
            ``field_energy`` (B,) (-(Σ q_i r_i)·E_ext, zero without a field) in eV, and
            when the long-range module is on ``charges`` (N,), ``dipole`` (B, 3),
            ``polarization`` (B, 3) (plus ``induced_dipoles`` etc. with
            polarisabilities, see :class:`LongRangeModule`), plus requested derivatives.
        """
        data = self._prepare(data, check_inputs)
        assert data.external_field is not None, "_prepare fills the external field"
        if compute_polarizability:
            self._require_long_range("the polarisability tensor needs the long-range module (latent charges).")
            data.external_field = data.external_field.detach().requires_grad_(True)
        create_graph = self.training if create_graph is None else create_graph
        compute_stress = stress_requested(compute_stress, data.cell, data.periodic, data.slab)
        strained = StrainedGeometry.of(data, positions_grad=compute_forces or compute_bec, strain_grad=compute_stress)
        out = self._energies(strained.geometry, engine_state)
        out.update(forces_and_stress(
            out["energy"], strained.positions if compute_forces else None, strained.strain if compute_stress else None,
            data.cell, data.periodic, data.slab, create_graph=create_graph,
            retain_graph=create_graph or compute_bec or compute_polarizability,
        ))
        if compute_bec:
            self._require_long_range("Born effective charges need the long-range module (latent charges).")
            out["bec"] = born_effective_charges(
                out["charges"], strained.positions, data.cell, data.pbc, data.batch, create_graph=create_graph,
                induced_dipoles=out.get("induced_dipoles"),
            )
        if compute_polarizability:
            moment = cell_moment(out["dipole"], out["polarization"], data.cell, data.periodic)
            out["polarizability"] = polarizability_tensor(moment, data.external_field, create_graph)
        if not create_graph:
            out = {key: value.detach() for key, value in out.items()}
        return out

    def _energies(self, geometry: AtomsBatch, engine_state: Optional[EngineState] = None) -> dict[str, torch.Tensor]:
        """The energy step: host + reference energies, long-range module, field energy (all (B,) eV).

        Returns the long-range module's outputs (``charges``, ``dipole``, ...) with its
        ``energy`` renamed ``long_range_energy``, plus ``host_energy``, ``field_energy``
        and the total ``energy``.
        """
        host_energy, features = self.backbone(geometry)
        host_energy = host_energy + reference_energy(
            self.reference_energy.to(host_energy.dtype), geometry.numbers, geometry.batch, geometry.n_structures
        )
        out: dict[str, torch.Tensor] = {"host_energy": host_energy}
        out.update(self._long_range_energy(features, geometry, host_energy, engine_state))
        out["field_energy"] = self._field_energy(geometry, out)
        out["energy"] = host_energy + out["long_range_energy"] + out["field_energy"]
        return out

    def _long_range_energy(
        self, features: torch.Tensor, geometry: AtomsBatch, host_energy: torch.Tensor,
        engine_state: Optional[EngineState] = None,
    ) -> dict[str, torch.Tensor]:
        """The long-range module's outputs with ``energy`` renamed ``long_range_energy`` (zeros without one)."""
        if self.long_range is None:
            return {"long_range_energy": torch.zeros_like(host_energy)}
        out = dict(self.long_range(features, geometry, engine_state))
        out["long_range_energy"] = out.pop("energy")
        return out

    def _field_energy(self, data: AtomsBatch, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) field energy -(Σ_i q_i r_i)·E_ext, eV (see :func:`latent_lr.energy_terms.field_energy`).

        With the long-range module it is always computed (exact zeros without a field), which
        needs no host synchronisation; without one it is zero unless a field is given (an error).
        """
        field = data.external_field
        assert field is not None, "_prepare fills the external field"
        if self.long_range is None and not bool((field != 0).any()) and not field.requires_grad:
            return torch.zeros_like(out["host_energy"])
        self._require_long_range(
            "an external field acts on charges, but this model has no long-range module; "
            "wrap the host with long_range=True or remove atoms.info['external_field']."
        )
        return field_energy(out["charges"], data.positions, data.batch, field)

    def _require_long_range(self, message: str) -> None:
        """Raise ValueError(message) when the model has no long-range module."""
        if self.long_range is None:
            raise ValueError(message)

    def _prepare(self, data: AtomsBatch, check_inputs: bool = True) -> AtomsBatch:
        if not isinstance(data, AtomsBatch):
            raise ValueError(
                f"expected a latent_lr.AtomsBatch, got {type(data).__name__}; build one with "
                "AtomsBatch.from_atoms(list_of_ase_atoms)."
            )
        data = data.to(device=self.device, dtype=self.dtype)
        if data.external_field is None:
            data.external_field = data.positions.new_zeros(data.n_structures, 3)
        if not check_inputs:
            return data
        counts = data.n_atoms
        if data.positions.shape[0] == 0 or bool((counts == 0).any()):
            raise ValueError("a structure has no atoms; every structure needs at least one atom.")
        if not torch.isfinite(data.positions).all():
            raise ValueError("positions contain NaN or inf; every coordinate must be finite.")
        self.backbone.check_elements(data.numbers)
        return data

    def config(self) -> dict[str, Any]:
        """Everything :func:`latent_lr.load` needs besides the state_dict."""
        return {
            "backbone": self.backbone.name,
            "host": self.backbone.host_config(),
            "adapter_options": self.backbone.options(),
            "long_range": None if self.long_range is None else self.long_range.to_dict(),
            "dtype": str(self.dtype).replace("torch.", ""),
            "info_keys": self.info_keys.to_dict(),
        }

