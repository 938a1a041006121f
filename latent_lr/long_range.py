"""The long-range module: invariant features -> latent charges -> Coulomb energy."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .charges import ChargeHead
from .qeq import SOLVERS as QEQ_SOLVERS
from .qeq import QeqChargeHead
from .data import AtomsBatch
from .electrostatics import coulomb_energy
from .electrostatics.field import electric_field
from .polarizability import MODES as POLARIZABILITY_MODES
from .polarizability import (
    SOLVERS,
    PolarizabilityHead,
    one_step_induction,
    per_structure,
    self_consistent_cap,
    self_consistent_induction,
)
from .properties import dipole_moment, polarization, slab_dipole


class LongRangeModule(nn.Module):
    """Latent Ewald summation on top of any host's per-atom invariant features.

    Given features h_i (N, F) it predicts latent charges q_i (e) with a small MLP,
    constrains each structure's charges to its total charge and returns the
    smeared Coulomb energy of those charges (eV) from
    :func:`latent_lr.coulomb_energy`, plus dipoles and polarisations.

    Args:
        feature_dim: F.
        hidden_dim: hidden width of the charge MLP (0: linear).
        smearing: Gaussian charge width σ, Å (LES default 1 Å).
        learnable_smearing: make σ a trained parameter (kept positive).
        element_baseline: add a learned per-element charge offset.
        accuracy: relative accuracy requested from the Ewald engine.
        charge_redistribution: how charges are made to sum to the total charge:
            ``"learned"`` (positive learned per-atom weights, default), ``"uniform"``,
            or ``"none"`` (raw charges; the total charge is not imposed, as in LES).
            Used by ``charge_model="latent"`` only.
        charge_model: ``"latent"`` (default: charges predicted directly by an MLP)
            or ``"qeq"`` (charge equilibration with learned electronegativities
            and hardnesses, :mod:`latent_lr.qeq`; the energy is then the Qeq energy
            E(q*), and the total charge is imposed exactly by the constraint).
        qeq_solver: ``"auto"``, ``"dense"`` or ``"cg"`` for ``charge_model="qeq"``.
        polarizability: latent per-atom polarisabilities (see
            :mod:`latent_lr.polarizability`): ``"none"`` (default), ``"one_step"``
            (p = α E⁰, open and periodic) or ``"self_consistent"`` (p = α(E⁰ + T p),
            open and fully periodic structures (tin-foil Ewald sum of T); slabs raise
            :class:`NotImplementedError`).
        polarizability_solver: ``"cg"`` or ``"dense"`` for ``"self_consistent"``.
    """

    def __init__(
        self,
        feature_dim: int,
        hidden_dim: int = 32,
        smearing: float = 1.0,
        learnable_smearing: bool = False,
        element_baseline: bool = True,
        accuracy: float = 1e-6,
        charge_redistribution: str = "learned",
        charge_model: str = "latent",
        qeq_solver: str = "auto",
        polarizability: str = "none",
        polarizability_solver: str = "cg",
    ):
        super().__init__()
        if polarizability not in POLARIZABILITY_MODES:
            raise ValueError(f"polarizability must be one of {POLARIZABILITY_MODES}, got {polarizability!r}.")
        if polarizability_solver not in SOLVERS:
            raise ValueError(f"polarizability_solver must be one of {SOLVERS}, got {polarizability_solver!r}.")
        if smearing <= 0:
            raise ValueError(f"smearing must be > 0 Å for latent charges, got {smearing}.")
        self.config = dict(
            feature_dim=feature_dim,
            hidden_dim=hidden_dim,
            smearing=smearing,
            learnable_smearing=learnable_smearing,
            element_baseline=element_baseline,
            accuracy=accuracy,
            charge_redistribution=charge_redistribution,
            charge_model=charge_model,
            qeq_solver=qeq_solver,
            polarizability=polarizability,
            polarizability_solver=polarizability_solver,
        )
        if charge_model == "latent":
            self.charge_head: nn.Module = ChargeHead(feature_dim, hidden_dim, element_baseline, charge_redistribution)
        elif charge_model == "qeq":
            if qeq_solver not in QEQ_SOLVERS:
                raise ValueError(f"qeq_solver must be one of {QEQ_SOLVERS}, got {qeq_solver!r}.")
            if charge_redistribution != "learned":
                raise ValueError(
                    f"charge_redistribution={charge_redistribution!r} applies to charge_model='latent' only; "
                    "Qeq imposes the total charge through its constraint. Leave charge_redistribution at its default."
                )
            self.charge_head = QeqChargeHead(feature_dim, hidden_dim, element_baseline, qeq_solver)
        else:
            raise ValueError(f"charge_model must be 'latent' or 'qeq', got {charge_model!r}.")
        log_sigma = torch.tensor(math.log(smearing))
        if learnable_smearing:
            self.log_smearing = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_smearing", log_sigma)
        self.accuracy = accuracy
        #: Latent polarisabilities; None = off.
        self.polarizability = polarizability
        self.polarizability_solver = polarizability_solver
        self.polarizability_head: Optional[nn.Module] = (
            None if polarizability == "none" else PolarizabilityHead(feature_dim, hidden_dim // 2, element_baseline)
        )

    @property
    def smearing(self) -> torch.Tensor:
        """σ in Å (scalar tensor)."""
        return self.log_smearing.exp()

    def forward(self, features: torch.Tensor, data: AtomsBatch) -> dict[str, torch.Tensor]:
        """Long-range energy and by-products.

        Args:
            features: (N, F) invariant per-atom features (same dtype as positions).
            data: the batch; ``data.positions``/``data.cell`` may carry gradients.

        Returns:
            dict with ``energy`` (B,) eV, ``charges`` (N,) e, ``dipole`` (B, 3) e·Å
            (open structures, and the dipole per cell of slabs, see
            :mod:`latent_lr.properties`; zeros for periodic), ``polarization`` (B, 3) e/Å²
            (periodic structures; zeros for open).  With polarisabilities on,
            ``energy`` includes the induction energy and the moments include the
            induced dipoles; extra keys ``induction_energy`` (B,) eV,
            ``induced_dipoles`` (N, 3) e·Å, ``polarizabilities`` (N,) e·Å²/V and
            ``electric_field`` (N, 3) V/Å (latent charges' field plus the applied
            field ``data.external_field``, zeros if None).
        """
        if features.ndim != 2 or features.shape[0] != data.positions.shape[0]:
            raise ValueError(
                f"features have shape {tuple(features.shape)}; expected (n_atoms, F) with "
                f"n_atoms = {data.positions.shape[0]}."
            )
        features = features.to(data.positions.dtype)
        sigma = self.smearing.to(data.positions.dtype)
        if isinstance(self.charge_head, QeqChargeHead):
            charges, energy = self.charge_head(features, data, sigma, self.accuracy)
        else:
            charges = self.charge_head(features, data.numbers, data.batch, data.total_charge)
            energy = coulomb_energy(
                data.positions,
                charges,
                cell=data.cell,
                pbc=data.pbc,
                batch=data.batch,
                smearing=sigma,
                accuracy=self.accuracy,
            )
        periodic = data.periodic
        dipole = dipole_moment(charges, data.positions, data.batch, data.n_structures)
        dipole = torch.where(periodic[:, None], torch.zeros_like(dipole), dipole)
        dipole = torch.where(
            data.slab[:, None], slab_dipole(charges, data.positions, data.cell, data.batch, data.slab), dipole
        )
        polar = polarization(charges, data.positions, data.cell, data.batch)
        polar = torch.where(periodic[:, None], polar, torch.zeros_like(polar))
        out = {"energy": energy, "charges": charges, "dipole": dipole, "polarization": polar}
        if self.polarizability_head is not None:
            self._add_induction(features, charges, sigma, data, out)
        return out

    def _add_induction(
        self, features: torch.Tensor, charges: torch.Tensor, sigma: torch.Tensor, data: AtomsBatch,
        out: dict[str, torch.Tensor],
    ) -> None:
        """Induced dipoles of the latent polarisabilities; updates ``out`` in place."""
        periodic = data.periodic
        self_consistent = self.polarizability == "self_consistent"
        if self_consistent and bool((data.pbc.any(dim=1) & ~periodic).any()):
            raise NotImplementedError(
                "polarizability='self_consistent' supports open and fully periodic structures; "
                "the slab correction of the dipolar Ewald sum is not implemented. Use "
                "polarizability='one_step' for slabs."
            )
        cap = self_consistent_cap(sigma) if self_consistent else None
        alpha = self.polarizability_head(features, data.numbers, cap)
        field = electric_field(
            data.positions, charges, cell=data.cell, pbc=data.pbc, batch=data.batch, smearing=sigma,
            accuracy=self.accuracy,
        )
        if data.external_field is not None:
            field = field + data.external_field.to(field.dtype)[data.batch]
        if self_consistent:
            induced, induction = self_consistent_induction(
                alpha, field, data.positions, data.batch, data.n_structures, sigma, self.polarizability_solver,
                cell=data.cell, periodic=periodic, accuracy=self.accuracy,
            )
        else:
            induced, induction = one_step_induction(alpha, field, data.batch, data.n_structures)
        moment = per_structure(induced, data.batch, data.n_structures)
        volume = torch.linalg.det(data.cell).abs()
        volume = torch.where(periodic, volume, torch.ones_like(volume))
        out["energy"] = out["energy"] + induction
        out["dipole"] = out["dipole"] + torch.where(periodic[:, None], torch.zeros_like(moment), moment)
        out["polarization"] = out["polarization"] + torch.where(
            periodic[:, None], moment / volume[:, None], torch.zeros_like(moment)
        )
        out.update(induction_energy=induction, induced_dipoles=induced, polarizabilities=alpha, electric_field=field)
