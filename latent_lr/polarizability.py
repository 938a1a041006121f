"""Latent polarisabilities: induced dipoles p_i = α_i E_i and their energy.

Units: α in e·Å²/V, so that p (e·Å) = α E (V/Å).  An atomic polarisability
volume α' in Å³ (the usual Gaussian-units number) is α' = k_e α with
k_e = 14.399645 eV·Å/e²; the head below predicts α' and divides by k_e.

Models (``LongRangeModule(polarizability=...)``):

* ``"one_step"``: p_i = α_i E⁰_i with E⁰_i = F_i(q) + E_ext the field of the
  latent charges (from :func:`latent_lr.electrostatics.field.electric_field`)
  plus the applied field.  Energy U = -½ Σ_i α_i |E⁰_i|², the energy of
  non-interacting linear induced dipoles (½ Σ |p|²/α - Σ p·E⁰ at its
  minimum).  Dipole-dipole interaction is neglected.  Open and periodic.
* ``"self_consistent"``: p = α (E⁰ + T p) with the Gaussian-damped dipole
  tensor T (:mod:`latent_lr.electrostatics.dipole_tensor`).  With S = diag √α
  and p = S x it is the minimum of U(x) = ½ xᵀ(I - S T S)x - xᵀ S E⁰, whose
  value is U = -½ Σ_i p_i·E⁰_i.  The energy is evaluated in this variational
  form (errors of the linear solve enter only at second order) and the
  solve is differentiated implicitly, so forces, stress, BECs and the
  polarisability tensor are derivatives of one energy.  Open and fully
  periodic structures (mixed batches too): for periodic ones T is the
  tin-foil Ewald sum of the same Hessian, with the engine's Ewald parameters
  (:mod:`latent_lr.electrostatics.dipole_ewald`; particle-mesh Ewald from 300
  atoms, :mod:`latent_lr.electrostatics.dipole_mesh`), so that -T_ij is exactly
  the Hessian block of the engine's Ewald energy with unit charges.  Slabs
  (pbc = (True, True, False)) use the engine's slab approach: the same sum in
  the vacuum-extended cell plus the Yeh–Berkowitz dipole term (issue 15 item 5).
  Polarisabilities are smoothly capped below 0.9/c (c = k_e 4a³/(3√π),
  a = 1/(√2σ)), where I - S T S is provably positive definite, i.e. α' below
  ≈ 3.4 σ³ Å³: no polarisation catastrophe.  Raise σ to allow larger α'.
  The bound holds for the periodic (tin-foil) operator as well: the smeared
  dipolar energy is a sum over k ≠ 0 of non-negative terms, so T ⪯ c I there
  too, up to the Ewald truncation error (~accuracy × c, far inside the 10 %
  margin; checked by the smallest eigenvalue in tests/test_periodic_polarization.py).

Induced dipoles add to the dipole of open structures (μ = Σ q_i r_i + Σ p_i)
and to the cell dipole of periodic ones (Ω P = Ω P_q + Σ p_i); the energy U
already contains -Σ p_i·E_ext, so the model's field term is only
-(Σ q_i r_i)·E_ext.

With latent charges (independent of E_ext) the total energy is the
variational one and μ = -∂E/∂E_ext exactly, so the polarisability tensor is
symmetric and ∂F/∂E_ext equals the BECs.  With ``charge_model="qeq"`` the
charges are equilibrated *without* the induction energy (charges and dipoles
are not solved jointly), so the energy is not stationary in q: forces and
stress remain exact gradients and ``polarizability`` is still the exact
derivative ∂μ/∂E_ext of the reported dipole, but that tensor need not be
symmetric and the Maxwell relation holds only approximately; ``charge_model="qeq_dipoles"``
(:mod:`latent_lr.qeq_dipoles`) solves charges and dipoles jointly instead.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .charges import MAX_ATOMIC_NUMBER, feature_mlp
from .config import LongRangeConfig
from .data import AtomsBatch
from .electrostatics import EngineState
from .electrostatics.field import electric_field
from .electrostatics.induction import (
    SAFE_FRACTION,
    SOLVERS,
    one_step_induction,
    per_structure,
    self_consistent_cap,
    self_consistent_induction,
)
from .units import COULOMB_CONSTANT

__all__ = ["PolarizabilityHead", "OneStepPolarizability", "SelfConsistentPolarizability", "SAFE_FRACTION", "SOLVERS"]


class PolarizabilityHead(nn.Module):
    """Per-atom polarisabilities α_i ≥ 0 (e·Å²/V) from invariant features.

    α'_i = softplus(MLP(h_i) + b(Z_i)) in Å³ (per-element baseline b), α_i = α'_i / k_e;
    optionally capped smoothly, α ← α_max tanh(α/α_max).

    Args:
        feature_dim: F.
        hidden_dim: hidden width (0: linear).
        element_baseline: learn the per-element offset b(Z).
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 16, element_baseline: bool = True):
        super().__init__()
        self.mlp = feature_mlp(feature_dim, hidden_dim)
        self.element_baseline = nn.Embedding(MAX_ATOMIC_NUMBER + 1, 1) if element_baseline else None
        if self.element_baseline is not None:
            nn.init.zeros_(self.element_baseline.weight)

    def forward(self, features: torch.Tensor, numbers: torch.Tensor, cap: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Args: features (N, F), numbers (N,), cap: scalar α_max or None. Returns α (N,), e·Å²/V."""
        raw = self.mlp(features).squeeze(-1)
        if self.element_baseline is not None:
            raw = raw + self.element_baseline(numbers).squeeze(-1)
        alpha = nn.functional.softplus(raw) / COULOMB_CONSTANT
        if cap is not None:
            alpha = cap * torch.tanh(alpha / cap)
        return alpha

    @classmethod
    def from_config(cls, feature_dim: int, config: LongRangeConfig) -> "PolarizabilityHead":
        return cls(feature_dim, config.polarizability_width, config.element_baseline)

    def induce(
        self, alpha: torch.Tensor, field: torch.Tensor, data: AtomsBatch, smearing: torch.Tensor, accuracy: float,
        engine_state: Optional[EngineState] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Induced dipoles (N, 3) e·Å and induction energies (B,) eV for polarisabilities α and field E⁰
        (``engine_state``: the run's state, for warm starts of iterative solves)."""
        raise NotImplementedError

    def cap(self, smearing: torch.Tensor) -> Optional[torch.Tensor]:
        """Largest α (e·Å²/V) the model may predict, or None."""
        return None

    def check(self, data: AtomsBatch) -> None:
        """Raise if this model cannot handle some structure of ``data``."""

    def induced_outputs(
        self,
        features: torch.Tensor,
        charges: torch.Tensor,
        smearing: torch.Tensor,
        data: AtomsBatch,
        accuracy: float,
        engine_state: Optional[EngineState] = None,
    ) -> dict[str, torch.Tensor]:
        """Induced dipoles of the latent charges' field plus the applied field.

        Returns ``induction_energy`` (B,) eV, ``induced_dipoles`` (N, 3) e·Å,
        ``induced_moment`` (B, 3) e·Å (their sum per structure),
        ``polarizabilities`` (N,) e·Å²/V and ``electric_field`` (N, 3) V/Å.
        """
        self.check(data)
        alpha = self(features, data.numbers, self.cap(smearing))
        field = electric_field(
            data.positions, charges, cell=data.cell, pbc=data.pbc, batch=data.batch, smearing=smearing,
            accuracy=accuracy, state=engine_state,
        )
        if data.external_field is not None:
            field = field + data.external_field.to(field.dtype)[data.batch]
        induced, energy = self.induce(alpha, field, data, smearing, accuracy, engine_state)
        return {
            "induction_energy": energy,
            "induced_dipoles": induced,
            "induced_moment": per_structure(induced, data.batch, data.n_structures),
            "polarizabilities": alpha,
            "electric_field": field,
        }


class OneStepPolarizability(PolarizabilityHead):
    """p_i = α_i E⁰_i, U = -½ Σ α_i |E⁰_i|² (no dipole-dipole coupling); open, periodic and slabs."""

    def induce(
        self, alpha: torch.Tensor, field: torch.Tensor, data: AtomsBatch, smearing: torch.Tensor, accuracy: float,
        engine_state: Optional[EngineState] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return one_step_induction(alpha, field, data.batch, data.n_structures)


class SelfConsistentPolarizability(PolarizabilityHead):
    """p = α (E⁰ + T p), variational energy; open, fully periodic and slab structures.

    Args: as :class:`PolarizabilityHead`, plus ``solver`` (``"cg"`` or ``"dense"``) and
    ``warm_start`` (start CG from the engine state's last dipoles of the same structure identity).
    """

    def __init__(
        self, feature_dim: int, hidden_dim: int = 16, element_baseline: bool = True, solver: str = "cg",
        warm_start: bool = True,
    ):
        super().__init__(feature_dim, hidden_dim, element_baseline)
        if solver not in SOLVERS:
            raise ValueError(f"polarizability_solver must be one of {SOLVERS}, got {solver!r}.")
        self.solver = solver
        self.warm_start = bool(warm_start)

    @classmethod
    def from_config(cls, feature_dim: int, config: LongRangeConfig) -> "SelfConsistentPolarizability":
        return cls(
            feature_dim, config.polarizability_width, config.element_baseline, config.polarizability_solver,
            warm_start=config.solver_warm_start,
        )

    def cap(self, smearing: torch.Tensor) -> Optional[torch.Tensor]:
        return self_consistent_cap(smearing)

    def check(self, data: AtomsBatch) -> None:
        if bool((data.pbc.any(dim=1) & ~data.periodic & ~data.slab).any()):
            raise NotImplementedError(
                "polarizability='self_consistent' supports open, fully periodic and slab (pbc = (True, True, "
                "False)) structures; other partial periodicities are not implemented. Use "
                "polarizability='one_step' for them."
            )

    def induce(
        self, alpha: torch.Tensor, field: torch.Tensor, data: AtomsBatch, smearing: torch.Tensor, accuracy: float,
        engine_state: Optional[EngineState] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        solve = None if engine_state is None or self.solver != "cg" else engine_state.solutions.begin(
            "induction", data.numbers, data.batch, data.n_structures, field, warm=self.warm_start
        )
        induced, energy = self_consistent_induction(
            alpha, field, data.positions, data.batch, data.n_structures, smearing, self.solver,
            cell=data.cell, periodic=data.periodic, accuracy=accuracy,
            initial=None if solve is None else solve.initial, statistics=None if solve is None else solve.statistics,
            slab=data.slab,
        )
        if solve is not None:
            solve.finish(induced)
        return induced, energy


#: ``LongRangeConfig.polarizability`` -> model class (``"none"``: no polarisabilities).
POLARIZABILITY_MODELS: dict[str, type[PolarizabilityHead]] = {
    "one_step": OneStepPolarizability,
    "self_consistent": SelfConsistentPolarizability,
}
