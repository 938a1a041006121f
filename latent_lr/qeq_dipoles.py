"""Joint charge-dipole equilibration head: learned χ_i, J_i and α_i, then one constrained minimisation.

The physics and the solver are in :mod:`latent_lr.electrostatics.joint_equilibration`;
this module holds only the learned part, which reuses the Qeq head's χ and J
(:class:`~latent_lr.qeq.QeqChargeHead`) and the polarisability head's α
(:class:`~latent_lr.polarizability.PolarizabilityHead`, capped below the
catastrophe bound as for ``polarizability="self_consistent"``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .charges import ChargeModel
from .config import LongRangeConfig
from .data import AtomsBatch
from .electrostatics import EngineState
from .electrostatics.induction import per_structure, self_consistent_cap
from .electrostatics.joint_equilibration import equilibrate_charges_and_dipoles
from .polarizability import PolarizabilityHead
from .qeq import QeqChargeHead


class QeqDipoleHead(ChargeModel):
    """Charges and induced dipoles that minimise one energy together (``charge_model="qeq_dipoles"``).

    Args:
        feature_dim: F.
        hidden_dim: hidden width of the χ and J MLPs (0: linear).
        element_baseline: learned per-element offsets of χ, J and α.
        polarizability_width: hidden width of the α MLP.
        warm_start, preconditioner: as ``solver_warm_start`` and ``qeq_preconditioner``.
        extrapolation: as ``solver_extrapolation``: degree of the extrapolated MD warm start (eval mode).
        md_rtol: eval-mode CG tolerance (None: tied to the engine accuracy, as for
            :class:`~latent_lr.qeq.QeqChargeHead`); training always solves to the dtype default.
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 32, element_baseline: bool = True, polarizability_width: int = 16,
                 warm_start: bool = True, preconditioner: str = "kspace", md_rtol: Optional[float] = None,
                 extrapolation: int = 0):
        super().__init__()
        self.qeq = QeqChargeHead(feature_dim, hidden_dim, element_baseline, md_rtol=md_rtol, extrapolation=extrapolation)
        self.polarizability = PolarizabilityHead(feature_dim, polarizability_width, element_baseline)
        self.warm_start = bool(warm_start)
        self.preconditioner = preconditioner  # one of JOINT_PRECONDITIONERS (the Qeq head's options)

    @classmethod
    def from_config(cls, feature_dim: int, config: LongRangeConfig) -> "QeqDipoleHead":
        return cls(feature_dim, config.hidden_dim, config.element_baseline, config.polarizability_width,
                   warm_start=config.solver_warm_start, preconditioner=config.qeq_preconditioner,
                   md_rtol=config.qeq_md_rtol, extrapolation=config.solver_extrapolation)

    def outputs(self, features: torch.Tensor, data: AtomsBatch, smearing: torch.Tensor, accuracy: float = 1e-6,
                engine_state: Optional[EngineState] = None, charge_sign: Optional[torch.Tensor] = None
                ) -> dict[str, torch.Tensor]:
        """``charges`` (N,) e, ``energy`` (B,) eV (without −(Σ q r)·E_ext, which the model adds),
        ``induced_dipoles`` (N, 3) e·Å, ``induced_moment`` (B, 3) e·Å and ``polarizabilities`` (N,) e·Å²/V.

        ``charge_sign`` (±1) multiplies χ: without a field and total charge, charges and dipoles flip with it.
        """
        chi, hardness = self.qeq.parameters_per_atom(features, data.numbers)
        if charge_sign is not None:
            chi = chi * charge_sign.to(chi.dtype)
        alpha = self.polarizability(features, data.numbers, self_consistent_cap(smearing))
        solve = None if engine_state is None else engine_state.solutions.begin(
            "qeq_dipoles", data.numbers, data.batch, data.n_structures, data.positions.new_zeros(len(chi), 4),
            warm=self.warm_start, extrapolation=0 if self.training else self.qeq.extrapolation, positions=data.positions,
        )
        charges, dipoles, energy = equilibrate_charges_and_dipoles(
            chi, hardness, alpha, data.positions, data.cell, data.pbc, data.batch, data.total_charge, smearing,
            data.external_field, accuracy=accuracy, state=engine_state, preconditioner=self.preconditioner,
            initial=None if solve is None else solve.initial, statistics=None if solve is None else solve.statistics,
            # eval mode (MD, inference): the Qeq head's tolerance; the energy is variational, so errs to second order
            rtol=None if self.training else self.qeq.eval_tolerance(accuracy, chi.dtype),
            deferred=not self.training,  # MD, inference: Hellmann–Feynman forces, no adjoint solve
        )
        if solve is not None:
            solve.finish(torch.cat([charges[:, None], dipoles], 1).detach())
        return {
            "charges": charges,
            "energy": energy,
            "induced_dipoles": dipoles,
            "induced_moment": per_structure(dipoles, data.batch, data.n_structures),
            "polarizabilities": alpha,
        }
