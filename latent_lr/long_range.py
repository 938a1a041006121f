"""The long-range module: invariant features -> latent charges -> Coulomb energy."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from .charges import ChargeHead, ChargeModel
from .config import LongRangeConfig
from .data import AtomsBatch
from .electrostatics import EngineState
from .polarizability import POLARIZABILITY_MODELS, PolarizabilityHead
from .properties import dipole_moment, polarization, slab_dipole
from .qeq import QeqChargeHead
from .qeq_dipoles import QeqDipoleHead
from .spin_channel import SpinChargeHead

#: ``LongRangeConfig.charge_model`` -> charge model class.
CHARGE_MODELS: dict[str, type[ChargeModel]] = {
    "latent": ChargeHead, "qeq": QeqChargeHead, "qeq_dipoles": QeqDipoleHead,
}


class LongRangeModule(nn.Module):
    """Latent Ewald summation on top of any host's per-atom invariant features.

    Given features h_i (N, F) a charge model (:data:`CHARGE_MODELS`) predicts
    charges q_i (e) and their smeared Coulomb energy (eV) from
    :func:`latent_lr.coulomb_energy`; optional latent polarisabilities
    (:data:`~latent_lr.polarizability.POLARIZABILITY_MODELS`) add induced
    dipoles.  Dipoles and polarisations come out as by-products.

    Args:
        feature_dim: F.
        config: the settings (:class:`~latent_lr.config.LongRangeConfig`;
            default: all defaults).
        **options: shortcut for single settings, applied on top of ``config``
            (e.g. ``LongRangeModule(64, smearing=0.8)``).
    """

    charge_sign: torch.Tensor  # buffer (), ±1

    def __init__(self, feature_dim: int, config: Optional[LongRangeConfig] = None, **options: Any):
        super().__init__()
        config = config or LongRangeConfig()
        if options:
            config = config.replace(**options)
        self.feature_dim = feature_dim
        self.config = config
        charge_model = SpinChargeHead if config.spin_channel else CHARGE_MODELS[config.charge_model]
        self.charge_head = charge_model.from_config(feature_dim, config)
        log_sigma = torch.tensor(math.log(config.smearing))
        if config.learnable_smearing:
            self.log_smearing = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_smearing", log_sigma)
        self.accuracy = config.accuracy
        self.polarizability_head: Optional[PolarizabilityHead] = (
            None if config.polarizability == "none"
            else POLARIZABILITY_MODELS[config.polarizability].from_config(feature_dim, config)
        )
        #: The engine's state when the caller passes none (a copy of the module starts empty).
        self.engine_state = EngineState()
        #: Global sign gauge s = ±1 of the charges (:mod:`latent_lr.sign_convention`), part of the state_dict.
        self.register_buffer("charge_sign", torch.tensor(1.0))
        #: False when the weights came from a file written before the sign convention existed.
        self.charge_sign_stored = True

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        """Files written before the sign convention have no ``charge_sign``: they load with s = +1."""
        key = prefix + "charge_sign"
        self.charge_sign_stored = key in state_dict
        if not self.charge_sign_stored:
            state_dict[key] = torch.ones((), dtype=self.charge_sign.dtype)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def clear_caches(self) -> None:
        """Empty the module's own engine state (kept PME mesh, cached tensors)."""
        self.engine_state.clear_caches()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description; :meth:`from_dict` rebuilds the module (untrained)."""
        return {"feature_dim": self.feature_dim, **self.config.to_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LongRangeModule":
        values = dict(values)
        feature_dim = values.pop("feature_dim")
        return cls(feature_dim, LongRangeConfig.from_dict(values, source="long-range settings in the model file"))

    @property
    def smearing(self) -> torch.Tensor:
        """σ in Å (scalar tensor)."""
        return self.log_smearing.exp()

    def forward(
        self, features: torch.Tensor, data: AtomsBatch, engine_state: Optional[EngineState] = None
    ) -> dict[str, torch.Tensor]:
        """Long-range energy and by-products.

        Args:
            features: (N, F) invariant per-atom features (same dtype as positions).
            data: the batch; ``data.positions``/``data.cell`` may carry gradients.
            engine_state: the engine state of this run (default: the module's own).

        Returns:
            dict with ``energy`` (B,) eV, ``charges`` (N,) e, ``dipole`` (B, 3) e·Å
            (open structures, and the dipole per cell of slabs, see
            :mod:`latent_lr.properties`; zeros for periodic), ``polarization`` (B, 3) e/Å²
            (periodic structures; zeros for open).  With polarisabilities on,
            ``energy`` includes the induction energy and the moments include the
            induced dipoles; extra keys ``induction_energy`` (B,) eV,
            ``induced_dipoles`` (N, 3) e·Å, ``polarizabilities`` (N,) e·Å²/V and
            ``electric_field`` (N, 3) V/Å (latent charges' field plus the applied
            field ``data.external_field``, zeros if None).  With ``spin_channel`` on,
            ``energy`` includes the local spin energy; extra keys ``spins`` (N,) spin
            populations n↑ − n↓ summing to ``data.total_spin`` and ``spin_energy`` (B,) eV.
            With
            ``charge_model="qeq_dipoles"`` the charge model's energy already contains
            the dipoles' and the moments include them; extra keys ``induced_dipoles``
            and ``polarizabilities``.
        """
        if features.ndim != 2 or features.shape[0] != data.positions.shape[0]:
            raise ValueError(
                f"features have shape {tuple(features.shape)}; expected (n_atoms, F) with "
                f"n_atoms = {data.positions.shape[0]}."
            )
        features = features.to(data.positions.dtype)
        sigma = self.smearing.to(data.positions.dtype)
        state = self.engine_state if engine_state is None else engine_state
        solved = self.charge_head.outputs(features, data, sigma, self.accuracy, state, charge_sign=self.charge_sign)
        charges, energy = solved.pop("charges"), solved.pop("energy")
        periodic = data.periodic
        dipole = dipole_moment(charges, data.positions, data.batch, data.n_structures)
        dipole = torch.where(periodic[:, None], torch.zeros_like(dipole), dipole)
        dipole = torch.where(
            data.slab[:, None], slab_dipole(charges, data.positions, data.cell, data.batch, data.slab), dipole
        )
        polar = polarization(charges, data.positions, data.cell, data.batch)
        polar = torch.where(periodic[:, None], polar, torch.zeros_like(polar))
        out = {"energy": energy, "charges": charges, "dipole": dipole, "polarization": polar}
        if "induced_moment" in solved:  # dipoles equilibrated with the charges
            self._add_induced_moment(solved.pop("induced_moment"), data, out)
        out.update(solved)  # the charge model's by-products: induced dipoles, spins, ...
        if self.polarizability_head is not None:
            self._add_induction(features, charges, sigma, data, out, state)
        return out

    def _add_induction(
        self, features: torch.Tensor, charges: torch.Tensor, sigma: torch.Tensor, data: AtomsBatch,
        out: dict[str, torch.Tensor], state: EngineState,
    ) -> None:
        """Add the induced dipoles of the latent polarisabilities to ``out`` (in place)."""
        assert self.polarizability_head is not None
        induced = self.polarizability_head.induced_outputs(features, charges, sigma, data, self.accuracy, state)
        out["energy"] = out["energy"] + induced["induction_energy"]
        self._add_induced_moment(induced.pop("induced_moment"), data, out)
        out.update(induced)

    @staticmethod
    def _add_induced_moment(moment: torch.Tensor, data: AtomsBatch, out: dict[str, torch.Tensor]) -> None:
        """Add induced moments (B, 3) e·Å to ``dipole`` (open) or, per volume, to ``polarization`` (periodic)."""
        periodic = data.periodic
        volume = torch.linalg.det(data.cell).abs()
        volume = torch.where(periodic, volume, torch.ones_like(volume))
        out["dipole"] = out["dipole"] + torch.where(periodic[:, None], torch.zeros_like(moment), moment)
        out["polarization"] = out["polarization"] + torch.where(
            periodic[:, None], moment / volume[:, None], torch.zeros_like(moment)
        )
