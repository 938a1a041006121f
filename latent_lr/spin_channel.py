"""Spin-resolved latent charges: a spin-up and a spin-down channel, and a local spin energy.

In the spirit of MACE-POLAR-1 (total charge *and* total spin equilibrated by
Fukui-function weights), each atom carries two channel charges q↑_i and q↓_i:

    q_i = q↑_i + q↓_i     (charge, e; the Coulomb energy sees only this),
    s_i = q↑_i − q↓_i     (spin population n↑ − n↓, electrons ≙ μ_B),

    q↑ = q̃↑ + w↑ ((Q + S)/2 − Σ q̃↑) / Σ w↑,   q↓ = q̃↓ + w↓ ((Q − S)/2 − Σ q̃↓) / Σ w↓,

with raw channels q̃↑,↓ = (q̃ ± s̃)/2 (q̃ the latent charge of
:class:`~latent_lr.charges.ChargeHead`, s̃ a second MLP) and learned positive
weights w↑,↓ (one network each), so Σ q_i = Q and Σ s_i = S = 2S_z hold to
rounding for every structure.

The spin energy is local, a Landau expansion per atom,

    E_spin = Σ_i a(h_i) s_i² + b(h_i) s_i⁴,   b = softplus ≥ 0,

even in s because time reversal flips every spin and leaves the energy
unchanged; a < 0 is a Stoner-like exchange gain, a > 0 the cost of a local
moment, and b ≥ 0 keeps it bounded below in s.  Exchange is short-ranged, so it
needs no Ewald sum; the long-range part sees the total charge only.

Sign gauge (:mod:`latent_lr.sign_convention`): the charge sign c = ±1
multiplies q̃ only and, when c = −1, the two weight networks swap channels.
For a neutral structure that maps (q↑, q↓) -> (−q↓, −q↑) exactly, so q -> −q
while s and every energy stay bit-identical: the charge sign stays a free gauge,
and the spin sign is physical (fixed by S).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .charges import ChargeHead, LearnedChargeRedistribution, feature_mlp, redistribute
from .config import LongRangeConfig
from .data import AtomsBatch
from .electrostatics import EngineState, coulomb_energy


class SpinChargeHead(ChargeHead):
    """Latent charges in two spin channels (``LongRangeConfig.spin_channel``), see the module docstring.

    Args:
        feature_dim: F, width of the host's invariant features.
        hidden_dim: hidden width of the charge, spin and spin-energy MLPs (0: linear charge and spin heads).
        element_baseline: add a learned per-element offset to the raw charges.
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 32, element_baseline: bool = True):
        super().__init__(feature_dim, hidden_dim, element_baseline, redistribution="none")
        self.spin_mlp = feature_mlp(feature_dim, hidden_dim)
        self.up_weights = LearnedChargeRedistribution(feature_dim)
        self.down_weights = LearnedChargeRedistribution(feature_dim)
        width = max(hidden_dim, 1)
        self.spin_energy_net = nn.Sequential(nn.Linear(feature_dim, width), nn.SiLU(), nn.Linear(width, 2))

    @classmethod
    def from_config(cls, feature_dim: int, config: LongRangeConfig) -> "SpinChargeHead":
        return cls(feature_dim, config.hidden_dim, config.element_baseline)

    def charges(self, *arguments: Any, **options: Any) -> torch.Tensor:
        """Not available: the charges of the spin channel depend on the total spin (use :meth:`populations`)."""
        raise ValueError("the spin channel's charges depend on the total spin; call SpinChargeHead.populations().")

    def populations(
        self,
        features: torch.Tensor,
        numbers: torch.Tensor,
        batch: torch.Tensor,
        total_charge: torch.Tensor,
        total_spin: torch.Tensor,
        charge_sign: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Charges q (N,) e and spin populations s (N,) (n↑ − n↓) summing to Q and S per structure.

        Args: features (N, F), numbers (N,), batch (N,), total_charge Q (B,) e, total_spin S = 2S_z (B,),
        charge_sign c (scalar ±1; None: +1).
        """
        raw_charge = self.raw_charges(features, numbers, charge_sign)
        raw_spin = self.spin_mlp(features).squeeze(-1)
        up_weights, down_weights = self.up_weights.weights(features), self.down_weights.weights(features)
        if charge_sign is not None:
            flipped = charge_sign < 0
            up_weights, down_weights = (
                torch.where(flipped, down_weights, up_weights), torch.where(flipped, up_weights, down_weights)
            )
        total_spin = total_spin.to(raw_charge.dtype)
        up = redistribute(0.5 * (raw_charge + raw_spin), up_weights, batch, 0.5 * (total_charge + total_spin))
        down = redistribute(0.5 * (raw_charge - raw_spin), down_weights, batch, 0.5 * (total_charge - total_spin))
        return up + down, up - down

    def spin_energy(self, features: torch.Tensor, spins: torch.Tensor, batch: torch.Tensor, n_structures: int) -> torch.Tensor:
        """(B,) Σ_i a(h_i) s_i² + softplus(b(h_i)) s_i⁴, eV, of features (N, F) and spin populations (N,)."""
        coefficients = self.spin_energy_net(features)
        square = spins * spins
        per_atom = coefficients[:, 0] * square + torch.nn.functional.softplus(coefficients[:, 1]) * square * square
        return per_atom.new_zeros(n_structures).index_add(0, batch, per_atom)

    def outputs(
        self,
        features: torch.Tensor,
        data: AtomsBatch,
        smearing: torch.Tensor,
        accuracy: float,
        engine_state: Optional[EngineState] = None,
        charge_sign: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """``charges`` (N,) e, ``spins`` (N,), ``energy`` (B,) eV (Coulomb plus spin) and ``spin_energy`` (B,) eV.

        ``data.total_spin`` None means S = 0 for every structure.
        """
        total_spin = data.total_spin if data.total_spin is not None else torch.zeros_like(data.total_charge)
        charges, spins = self.populations(features, data.numbers, data.batch, data.total_charge, total_spin, charge_sign)
        coulomb = coulomb_energy(
            data.positions, charges, cell=data.cell, pbc=data.pbc, batch=data.batch,
            smearing=smearing, accuracy=accuracy, state=engine_state,
        )
        spin_energy = self.spin_energy(features, spins, data.batch, data.n_structures)
        return {"charges": charges, "spins": spins, "energy": coulomb + spin_energy, "spin_energy": spin_energy}

    def forward(self, *arguments: Any, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Charges (N,) e and the Coulomb plus spin energy (B,) eV; arguments as :meth:`outputs`, which also has the spins."""
        out = self.outputs(*arguments, **options)
        return out["charges"], out["energy"]
