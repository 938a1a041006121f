"""Charge models: per-atom invariant features -> charges and their electrostatic energy.

Every charge model is a :class:`ChargeModel`; :class:`ChargeHead` (latent
charges from an MLP) lives here, :class:`~latent_lr.qeq.QeqChargeHead` (charge
equilibration) in :mod:`latent_lr.qeq`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import CHARGE_REDISTRIBUTIONS as REDISTRIBUTIONS
from .config import LongRangeConfig
from .data import AtomsBatch
from .electrostatics import EngineState, coulomb_energy
from .fragments import Fragments, find_fragments

MAX_ATOMIC_NUMBER = 118


def feature_mlp(feature_dim: int, hidden_dim: int) -> nn.Module:
    """One scalar per atom from (N, F) features: Linear-SiLU-Linear, or Linear if hidden_dim = 0."""
    if hidden_dim > 0:
        return nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 1))
    return nn.Linear(feature_dim, 1)


class TotalChargeConstraint(nn.Module):
    """Make each structure's charges sum to its total charge by a uniform shift.

    This is the seam for other redistribution schemes: a replacement takes the
    same arguments and returns charges with the same guarantee.
    """

    def forward(
        self,
        raw_charges: torch.Tensor,
        features: torch.Tensor,
        batch: torch.Tensor,
        total_charge: torch.Tensor,
    ) -> torch.Tensor:
        """Args: raw_charges (N,), features (N, F), batch (N,), total_charge (B,). Returns (N,) e."""
        n_structures = total_charge.shape[0]
        sums = raw_charges.new_zeros(n_structures).index_add(0, batch, raw_charges)
        counts = torch.bincount(batch, minlength=n_structures).to(raw_charges.dtype)
        shift = (total_charge - sums) / counts
        return raw_charges + shift[batch]


class NoChargeConstraint(nn.Module):
    """Leave the raw charges as they are: no total-charge input (the LES behaviour).

    The structure's net charge is then whatever the head predicts; use it as the
    "no total-charge information" baseline.
    """

    def forward(self, raw_charges: torch.Tensor, *unused: torch.Tensor) -> torch.Tensor:
        """Args: raw_charges (N,) e, then features, batch, total_charge (ignored). Returns (N,) e."""
        return raw_charges


def redistribute(raw: torch.Tensor, weights: torch.Tensor, batch: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """(N,) raw + w_i (T - Σ_j raw_j) / Σ_j w_j per structure: raw (N,), weights (N,) > 0, batch (N,), total (B,)."""
    n_structures = total.shape[0]
    sums = raw.new_zeros(n_structures).index_add(0, batch, raw)
    weight_sums = weights.new_zeros(n_structures).index_add(0, batch, weights)
    return raw + weights * ((total - sums) / weight_sums)[batch]


class LearnedChargeRedistribution(nn.Module):
    """Match each structure's total charge with learned positive per-atom weights.

    q_i = q̃_i + w_i (Q - Σ_j q̃_j) / Σ_j w_j,  w_i = softplus(MLP(h_i)) > 0,

    a Fukui-function-like share: atoms whose environment takes up charge easily
    receive more of the excess, instead of every atom getting the same shift.
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 16):
        super().__init__()
        self.weight_net = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 1))

    def forward(
        self,
        raw_charges: torch.Tensor,
        features: torch.Tensor,
        batch: torch.Tensor,
        total_charge: torch.Tensor,
    ) -> torch.Tensor:
        """Args: raw_charges (N,), features (N, F), batch (N,), total_charge (B,). Returns (N,) e."""
        return redistribute(raw_charges, self.weights(features), batch, total_charge)

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) positive redistribution weights w_i = softplus(MLP(h_i)) + 1e-6 of features (N, F)."""
        return torch.nn.functional.softplus(self.weight_net(features).squeeze(-1)) + 1e-6


def redistribute_by_fragment(
    raw: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor, fragments: Fragments, total: torch.Tensor
) -> torch.Tensor:
    """(N,) raw + (T - Σ raw) p_f w_i / W_f: the excess shared among fragments, then inside each by weight.

    p_f = softmax over the structure's fragments of s_f = Σ_{i∈f} scores_i; W_f = Σ_{i∈f} w_i.
    raw, weights (> 0), scores: (N,); total (B,).  One fragment per structure: exactly :func:`redistribute`.
    """
    n_structures, n_fragments = total.shape[0], fragments.structure.shape[0]
    own = fragments.structure
    excess = total - raw.new_zeros(n_structures).index_add(0, own[fragments.index], raw)
    fragment_scores = scores.new_zeros(n_fragments).index_add(0, fragments.index, scores)
    top = fragment_scores.new_zeros(n_structures).scatter_reduce(0, own, fragment_scores, "amax", include_self=False)
    exponentials = torch.exp(fragment_scores - top[own])
    share = exponentials / exponentials.new_zeros(n_structures).index_add(0, own, exponentials)[own]
    weight_sums = weights.new_zeros(n_fragments).index_add(0, fragments.index, weights)
    return raw + weights * (excess[own] * share / weight_sums)[fragments.index]


class FragmentChargeRedistribution(nn.Module):
    """Match each structure's total charge fragment by fragment (fragments: :mod:`latent_lr.fragments`).

    q_i = q̃_i + (Q - Σ_j q̃_j) p_f w_i / Σ_{j∈f} w_j,  p_f = softmax_f(Σ_{j∈f} a_j),

    a_j = MLP(h_j) a learned per-atom score and w_i the Fukui-like weights of
    :class:`LearnedChargeRedistribution`: a fragment that looks neutral (low
    score) receives ~none of the excess, so a neutral molecule far from an ion
    keeps the net charge of its own raw charges instead of a share of the ion's.
    Training pairs it with a penalty on the excess (``charge_excess_weight``,
    :func:`~latent_lr.training.loss.charge_excess_penalty`), so that those raw
    sums carry the charges themselves.  With one fragment it is :class:`LearnedChargeRedistribution` exactly.  The
    charges jump where fragments join or split (a bond crossing its threshold).
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 16, bond_factor: float = 1.2):
        super().__init__()
        self.fukui = LearnedChargeRedistribution(feature_dim, hidden_dim)
        self.score_net = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 1))
        self.bond_factor = bond_factor

    def fragments(self, data: AtomsBatch) -> Fragments:
        """The fragments of ``data`` at this module's bond factor."""
        return find_fragments(data, self.bond_factor)

    def forward(
        self,
        raw_charges: torch.Tensor,
        features: torch.Tensor,
        batch: torch.Tensor,
        total_charge: torch.Tensor,
        fragments: Optional[Fragments] = None,
    ) -> torch.Tensor:
        """Args: raw_charges (N,), features (N, F), batch (N,), total_charge (B,), fragments (None: one per
        structure). Returns (N,) e."""
        if fragments is None:
            fragments = Fragments.whole_structures(batch, total_charge.shape[0])
        scores = self.score_net(features).squeeze(-1)
        return redistribute_by_fragment(raw_charges, self.fukui.weights(features), scores, fragments, total_charge)


class ChargeModel(nn.Module):
    """What the long-range module asks of a charge model.

    ``forward(features, data, smearing, accuracy, engine_state, charge_sign)`` returns the
    charges (N,) in e and the electrostatic energy (B,) in eV of those charges
    for the batch ``data`` (whose positions and cell may carry gradients).
    ``charge_sign`` (scalar tensor, ±1; None: +1) is the global sign gauge of
    :mod:`latent_lr.sign_convention`: it multiplies the model's permanent
    charge source (the latent charges before the total-charge constraint, the
    electronegativities of Qeq), so that for neutral structures without a field
    the charges change sign and the energy stays bit-identical.
    ``from_config(feature_dim, config)`` builds one from a
    :class:`~latent_lr.config.LongRangeConfig`.
    """

    @classmethod
    def from_config(cls, feature_dim: int, config: LongRangeConfig) -> "ChargeModel":
        raise NotImplementedError

    def forward(
        self,
        features: torch.Tensor,
        data: AtomsBatch,
        smearing: torch.Tensor,
        accuracy: float,
        engine_state: Optional[EngineState] = None,
        charge_sign: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(charges, energy); a model overrides this or :meth:`outputs`."""
        if type(self).outputs is ChargeModel.outputs:
            raise NotImplementedError(f"{type(self).__name__} must override forward or outputs.")
        out = self.outputs(features, data, smearing, accuracy, engine_state, charge_sign)
        return out["charges"], out["energy"]

    def outputs(self, features: torch.Tensor, data: AtomsBatch, smearing: torch.Tensor, accuracy: float,
                engine_state: Optional[EngineState] = None, charge_sign: Optional[torch.Tensor] = None
                ) -> dict[str, torch.Tensor]:
        """``charges`` and ``energy`` of :meth:`forward`, plus the by-products a model solves for with them
        (``induced_dipoles`` (N, 3) e·Å, ``induced_moment`` (B, 3) e·Å, ``polarizabilities`` (N,) e·Å²/V
        for :class:`~latent_lr.qeq_dipoles.QeqDipoleHead`)."""
        charges, energy = self(features, data, smearing, accuracy, engine_state, charge_sign)
        return {"charges": charges, "energy": energy}


class ChargeHead(ChargeModel):
    """Per-atom latent charges q_i (e) from invariant features.

    q_i = MLP(h_i) [+ b(Z_i)], then (unless ``redistribution="none"``) shifted so
    that each structure carries its total charge.

    Args:
        feature_dim: F, width of the host's invariant features.
        hidden_dim: width of the hidden layer (0 for a linear head).
        element_baseline: add a learned per-element offset b(Z).
        redistribution: ``"uniform"`` (equal shift per atom), ``"learned"``
            (:class:`LearnedChargeRedistribution`; also ``"auto"``, which training resolves
            from the data), ``"fragments"`` (:class:`FragmentChargeRedistribution`) to impose
            the total charge, or ``"none"`` (raw charges, total charge ignored; LES baseline).
        bond_factor: bond-length factor of the fragments of ``"fragments"``.
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 32, element_baseline: bool = True, redistribution: str = "learned",
                 bond_factor: float = 1.2):
        super().__init__()
        self.mlp = feature_mlp(feature_dim, hidden_dim)
        self.element_baseline = nn.Embedding(MAX_ATOMIC_NUMBER + 1, 1) if element_baseline else None
        if self.element_baseline is not None:
            nn.init.zeros_(self.element_baseline.weight)
        if redistribution == "uniform":
            self.constraint: nn.Module = TotalChargeConstraint()
        elif redistribution in ("learned", "auto"):
            self.constraint = LearnedChargeRedistribution(feature_dim)
        elif redistribution == "fragments":
            self.constraint = FragmentChargeRedistribution(feature_dim, bond_factor=bond_factor)
        elif redistribution == "none":
            self.constraint = NoChargeConstraint()
        else:
            raise ValueError(
                f"redistribution must be one of {REDISTRIBUTIONS}, got {redistribution!r}."
            )

    @classmethod
    def from_config(cls, feature_dim: int, config: LongRangeConfig) -> "ChargeHead":
        return cls(feature_dim, config.hidden_dim, config.element_baseline, config.charge_redistribution,
                   config.fragment_bond_factor)

    def charges(
        self,
        features: torch.Tensor,
        numbers: torch.Tensor,
        batch: torch.Tensor,
        total_charge: torch.Tensor,
        charge_sign: Optional[torch.Tensor] = None,
        fragments: Optional[Fragments] = None,
    ) -> torch.Tensor:
        """Args: features (N, F), numbers (N,), batch (N,), total_charge (B,), charge_sign (±1, scalar),
        fragments (read by ``"fragments"`` redistribution only; None: one per structure). Returns (N,) e."""
        raw = self.raw_charges(features, numbers, charge_sign)
        if isinstance(self.constraint, FragmentChargeRedistribution):
            return self.constraint(raw, features, batch, total_charge, fragments)
        return self.constraint(raw, features, batch, total_charge)

    def raw_charges(self, features: torch.Tensor, numbers: torch.Tensor, charge_sign: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N,) charges before the total-charge constraint, e: s · (MLP(h_i) + baseline(Z_i)), s = charge_sign (None: +1)."""
        raw = self.mlp(features).squeeze(-1)
        if self.element_baseline is not None:
            raw = raw + self.element_baseline(numbers).squeeze(-1)
        if charge_sign is not None:
            raw = raw * charge_sign.to(raw.dtype)
        return raw

    def forward(
        self,
        features: torch.Tensor,
        data: AtomsBatch,
        smearing: torch.Tensor,
        accuracy: float,
        engine_state: Optional[EngineState] = None,
        charge_sign: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Charges (N,) e and their smeared Coulomb energy (B,) eV (Gaussian width ``smearing``, Å)."""
        fragments = self.constraint.fragments(data) if isinstance(self.constraint, FragmentChargeRedistribution) else None
        charges = self.charges(features, data.numbers, data.batch, data.total_charge, charge_sign, fragments)
        energy = coulomb_energy(
            data.positions, charges, cell=data.cell, pbc=data.pbc, batch=data.batch,
            smearing=smearing, accuracy=accuracy, state=engine_state,
        )
        return charges, energy

    def outputs(self, features: torch.Tensor, data: AtomsBatch, smearing: torch.Tensor, accuracy: float,
                engine_state: Optional[EngineState] = None, charge_sign: Optional[torch.Tensor] = None
                ) -> dict[str, torch.Tensor]:
        """``charges`` and ``energy`` of :meth:`forward`; with ``"fragments"`` redistribution also
        ``raw_charge_excess`` (B,) e = Q − Σ_i q̃_i, which training penalises (``charge_excess_weight``)."""
        charges, energy = self(features, data, smearing, accuracy, engine_state, charge_sign)
        out = {"charges": charges, "energy": energy}
        if isinstance(self.constraint, FragmentChargeRedistribution):
            raw = self.raw_charges(features, data.numbers, charge_sign)
            out["raw_charge_excess"] = data.total_charge - raw.new_zeros(data.n_structures).index_add(0, data.batch, raw)
        return out
