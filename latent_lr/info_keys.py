"""Which ``atoms.info`` keys a model reads a structure's total charge and total spin from.

Training stores the keys it read (``--total-charge-key``, ``--total-spin-key``,
``--multiplicity-key``) in the model, so that ``latent-lr predict``, the ASE
calculator and the sign convention read new structures the way the training
data were read; explicit keys (predict's flags) still take precedence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

from .spin import MULTIPLICITY_KEY, SPIN_KEY

#: info key of the net charge (e) read when none was given in training.
CHARGE_KEY = "charge"


@dataclass(frozen=True)
class InfoKeys:
    """The info keys of a structure's net charge (e), total spin 2S_z and multiplicity 2S + 1.

    ``total_spin`` / ``multiplicity`` None: that key is not read (a spin-blind model reads
    neither, whatever they are, see :attr:`latent_lr.LongRangeModel.spin_keys`).
    """

    total_charge: str = CHARGE_KEY
    total_spin: Optional[str] = SPIN_KEY
    multiplicity: Optional[str] = MULTIPLICITY_KEY

    @classmethod
    def of_training(
        cls, total_charge: Optional[str], total_spin: Optional[str], multiplicity: Optional[str]
    ) -> "InfoKeys":
        """The keys a training run read (no total-charge key: :data:`CHARGE_KEY`, so charged
        structures given later are still read)."""
        return cls(total_charge or CHARGE_KEY, total_spin, multiplicity)

    def overridden(
        self, total_charge: Optional[str], total_spin: Optional[str], multiplicity: Optional[str]
    ) -> "InfoKeys":
        """These keys with the ones given (not None) in their place; a spin or multiplicity key
        given replaces both spin keys (the other one is then not read)."""
        if total_spin is None and multiplicity is None:
            total_spin, multiplicity = self.total_spin, self.multiplicity
        return InfoKeys(total_charge or self.total_charge, total_spin, multiplicity)

    def to_dict(self) -> dict[str, Optional[str]]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Optional[Mapping[str, Any]]) -> "InfoKeys":
        """Inverse of :meth:`to_dict`; None (a model file written before keys were stored): the defaults."""
        return cls() if values is None else cls(**values)
