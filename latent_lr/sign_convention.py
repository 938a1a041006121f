"""A sign convention that makes latent charges physical without charge labels.

For neutral structures without an external field the long-range energy is
invariant under q -> -q, so training on energies and forces alone leaves the
global sign of latent charges (and of dipoles, polarisations and BECs) to
chance.  The convention fixes it after training: the mean latent charge of the
most electronegative element present (Pauling scale) must be negative, as
chemistry says it is (O in water, Cl in NaCl, F in HF ...).  The model stores
the chosen sign s = ±1 in ``long_range.charge_sign`` (its state_dict, hence its
file); the charge model multiplies its permanent charge source by s, so every
derived quantity follows and, for neutral structures without a field, energies
and forces are bit-identical under the flip.

When the data fix the sign the convention is not applied:

* charged structures and a charge model that takes the total charge as input
  (the energy then changes under q -> -q);
* an external field on any structure (the field term is odd in q);
* dipole or charge labels that were trained on (weight > 0): the labels decide
  (the sign that agrees with them is kept).

In those cases the convention's verdict is still computed and a disagreement
is reported as a conflict (never silently resolved).  Labels present only for
evaluation (weight 0) do not override the convention; a disagreement with them
is reported too.

Spin channel (``spin_channel``, :mod:`latent_lr.spin_channel`): the sign s
flips the charges of both spin channels together, (q↑, q↓) -> (−q↓, −q↑),
so q -> −q while the spin populations and the spin energy stay bit-identical.
A total spin 2S_z therefore does not fix the charge sign (neutral structures
with S ≠ 0 follow the convention), and the convention never changes the sign
of the spin populations: that sign is physical, set by the given 2S_z
(spin-up majority for 2S_z > 0).  For structures given with 2S_z = 0 only, the
sign of local moments is a second, unfixed gauge; no convention is applied to it.

Electronegativities: Pauling scale, values as revised by A. L. Allred,
J. Inorg. Nucl. Chem. 17, 215 (1961), as tabulated in the CRC Handbook of
Chemistry and Physics ("Electronegativity" table).  He, Ne and Ar have no
Pauling value and are never the reference element.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols

from .data import AtomsBatch
from .model import LongRangeModel
from .spin import spin_info_keys

#: Pauling electronegativity by atomic number (Allred 1961 / CRC Handbook); absent: no value (He, Ne, Ar, Z > 94).
PAULING_ELECTRONEGATIVITY: dict[int, float] = {
    1: 2.20, 3: 0.98, 4: 1.57, 5: 2.04, 6: 2.55, 7: 3.04, 8: 3.44, 9: 3.98,
    11: 0.93, 12: 1.31, 13: 1.61, 14: 1.90, 15: 2.19, 16: 2.58, 17: 3.16,
    19: 0.82, 20: 1.00, 21: 1.36, 22: 1.54, 23: 1.63, 24: 1.66, 25: 1.55, 26: 1.83, 27: 1.88, 28: 1.91,
    29: 1.90, 30: 1.65, 31: 1.81, 32: 2.01, 33: 2.18, 34: 2.55, 35: 2.96, 36: 3.00,
    37: 0.82, 38: 0.95, 39: 1.22, 40: 1.33, 41: 1.6, 42: 2.16, 43: 1.9, 44: 2.2, 45: 2.28, 46: 2.20,
    47: 1.93, 48: 1.69, 49: 1.78, 50: 1.96, 51: 2.05, 52: 2.1, 53: 2.66, 54: 2.60,
    55: 0.79, 56: 0.89, 57: 1.10, 58: 1.12, 59: 1.13, 60: 1.14, 61: 1.13, 62: 1.17, 63: 1.2, 64: 1.2,
    65: 1.1, 66: 1.22, 67: 1.23, 68: 1.24, 69: 1.25, 70: 1.1, 71: 1.27, 72: 1.3, 73: 1.5, 74: 2.36,
    75: 1.9, 76: 2.2, 77: 2.20, 78: 2.28, 79: 2.54, 80: 2.00, 81: 1.62, 82: 2.33, 83: 2.02, 84: 2.0,
    85: 2.2, 86: 2.2, 87: 0.7, 88: 0.9, 89: 1.1, 90: 1.3, 91: 1.5, 92: 1.38, 93: 1.36, 94: 1.28,
}

#: At most this many structures are evaluated to decide the sign (the first ones given).
MAX_STRUCTURES = 256

#: A mean charge of the reference element below this (e) leaves the sign undetermined.
UNDETERMINED_CHARGE = 1e-6

#: Label names the convention compares with (per structure: ``dipoles`` (3,) e·Å, ``charges`` (N,) e).
LABELS = ("dipole", "charges")


@dataclass
class SignDecision:
    """What :func:`apply_sign_convention` decided.

    Attributes:
        sign: the model's ``charge_sign`` after the decision (±1).
        flipped: True when this call flipped it.
        rule: ``"electronegativity"`` (the convention chose), ``"labels"``
            (trained-on labels chose), ``"data"`` (total charge or field fix the
            sign; kept) or ``"skipped"`` (nothing to decide).
        reason: one line saying why.
        element: symbol of the most electronegative element present (None if none).
        mean_charge: that element's mean latent charge after the decision, e.
        label_agreement: per label name, the normalised agreement
            Σ pred·ref / (|pred| |ref|) over the structures, after the decision (−1..1).
        conflict: a sentence when labels or the data disagree with the
            convention (None otherwise).
    """

    sign: float
    flipped: bool
    rule: str
    reason: str
    element: Optional[str] = None
    mean_charge: Optional[float] = None
    label_agreement: dict[str, float] = field(default_factory=dict)
    conflict: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for logs."""
        text = f"sign convention: s = {self.sign:+.0f} ({'flipped' if self.flipped else 'kept'}; {self.reason})"
        return text + (f"; CONFLICT: {self.conflict}" if self.conflict else "")


def most_electronegative(numbers: Iterable[int]) -> Optional[int]:
    """The atomic number with the highest Pauling electronegativity among ``numbers`` (ties: lower Z)."""
    rated = sorted({int(z) for z in numbers if int(z) in PAULING_ELECTRONEGATIVITY})
    if not rated:
        return None
    return max(rated, key=lambda z: (PAULING_ELECTRONEGATIVITY[z], -z))


def latent_moments(
    model: LongRangeModel, structures: Sequence[Atoms], batch_size: int = 16
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-structure latent charges (N_k,) e and dipoles (3,) e·Å of ``model`` (no forces), in order.

    Evaluated in eval mode; the model's training mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    charges: list[np.ndarray] = []
    dipoles: list[np.ndarray] = []
    try:
        for start in range(0, len(structures), batch_size):
            spin_keys = spin_info_keys(model.reads_spin)
            data = AtomsBatch.from_atoms(
                list(structures[start : start + batch_size]), dtype=model.dtype, device=model.device,
                spin_key=spin_keys[0], multiplicity_key=spin_keys[1],
            )
            out = model(data, compute_forces=False, compute_stress=False)
            values = out["charges"].detach().cpu().numpy()
            charges.extend(np.split(values, np.cumsum(data.n_atoms.tolist())[:-1]))
            dipoles.extend(out["dipole"].detach().cpu().numpy())
    finally:
        model.train(was_training)
    return charges, dipoles


def sign_fixed_by_data(model: LongRangeModel, structures: Sequence[Atoms]) -> Optional[str]:
    """Why the structures themselves fix the sign (total charge the model uses, a field), or None."""
    assert model.long_range is not None
    config = model.long_range.config
    uses_total_charge = config.charge_model in ("qeq", "qeq_dipoles") or config.charge_redistribution != "none"
    charged = sum(abs(float(atoms.info.get("charge", 0.0))) > 0 for atoms in structures)
    if uses_total_charge and charged:
        return f"{charged} charged structure(s) with a total-charge input fix the sign"
    in_field = sum(bool(np.any(np.asarray(atoms.info.get("external_field", 0.0)) != 0)) for atoms in structures)
    if in_field:
        return f"{in_field} structure(s) in an external field fix the sign"
    return None


def label_agreement(
    predictions: Mapping[str, Sequence[np.ndarray]], labels: Mapping[str, Sequence[Optional[np.ndarray]]]
) -> dict[str, float]:
    """Normalised Σ pred·ref (−1..1) over the structures that carry each label (``dipole`` e·Å, ``charges`` e).

    ``predictions`` and ``labels`` map a label name to per-structure arrays, aligned.
    """
    agreement: dict[str, float] = {}
    for name, values in labels.items():
        if name not in LABELS:
            raise ValueError(f"unknown label {name!r}; the sign convention compares with {LABELS}.")
        predicted, reference = [], []
        for value, ref in zip(predictions[name], values):
            if ref is None:
                continue
            predicted.append(np.asarray(value, dtype=float).reshape(-1))
            reference.append(np.asarray(ref, dtype=float).reshape(-1))
        if not predicted:
            continue
        p, r = np.concatenate(predicted), np.concatenate(reference)
        norm = float(np.linalg.norm(p) * np.linalg.norm(r))
        if norm > 0:
            agreement[name] = float(p @ r) / norm
    return agreement


def apply_sign_convention(
    model: LongRangeModel,
    structures: Sequence[Atoms],
    labels: Optional[Mapping[str, Sequence[Optional[np.ndarray]]]] = None,
    trained_on: Sequence[str] = (),
    max_structures: int = MAX_STRUCTURES,
    batch_size: int = 16,
) -> SignDecision:
    """Choose the global sign of ``model``'s latent charges and store it in the model (in place).

    Args:
        model: a long-range model (its ``long_range.charge_sign`` is updated).
        structures: the training structures (net charge in ``info['charge']``, total spin in
            ``info['spin']``, as training frames carry them whatever keys the data used;
            field in ``info['external_field']``, V/Å); the first
            ``max_structures`` are evaluated.
        labels: optional reference labels per structure, aligned with
            ``structures`` (None entries allowed): ``{"dipole": [(3,) e·Å ...],
            "charges": [(N,) e ...]}``.
        trained_on: the label names the model was trained on (weight > 0);
            those labels decide the sign instead of the convention.
        max_structures: bound on the structures evaluated.
        batch_size: structures per forward pass.

    Returns:
        the :class:`SignDecision` (also say ``decision.summary()`` in logs).
    """
    if model.long_range is None:
        return SignDecision(sign=1.0, flipped=False, rule="skipped", reason="no long-range module")
    sign_buffer = model.long_range.charge_sign
    subset = list(structures[:max_structures])
    given = {k: list(v[:max_structures]) for k, v in (labels or {}).items()}
    if not subset:
        return SignDecision(sign=float(sign_buffer), flipped=False, rule="skipped", reason="no structures given")
    with torch.no_grad():
        charges, dipoles = latent_moments(model, subset, batch_size)
    numbers = np.concatenate([atoms.numbers for atoms in subset])
    all_charges = np.concatenate(charges)
    reference = most_electronegative(numbers.tolist())
    mean_charge = None if reference is None else float(all_charges[numbers == reference].mean())
    agreement = label_agreement({"dipole": dipoles, "charges": charges}, given)
    fixed = sign_fixed_by_data(model, subset)
    trained = [name for name in trained_on if name in agreement]
    element = None if reference is None else chemical_symbols[reference]
    if fixed is not None:
        rule, reason, flip = "data", fixed, False
    elif trained:
        flip = sum(agreement[name] for name in trained) < 0
        rule, reason = "labels", f"trained on {', '.join(trained)} labels: they decide"
    elif reference is None or len(set(numbers.tolist())) < 2:
        rule, flip = "skipped", False
        reason = "fewer than two elements with a Pauling electronegativity: the convention is undefined"
    elif mean_charge is None or abs(mean_charge) < UNDETERMINED_CHARGE:
        rule, flip = "skipped", False
        reason = f"mean latent charge of {element} is zero: the sign is undetermined"
    else:
        flip = mean_charge > 0
        rule = "electronegativity"
        reason = f"mean latent charge of {element} (most electronegative, Pauling) made negative"
    if flip:
        sign_buffer.mul_(-1.0)
        mean_charge = None if mean_charge is None else -mean_charge
        agreement = {name: -value for name, value in agreement.items()}
    conflict = _conflict(rule, element, mean_charge, agreement)
    return SignDecision(
        sign=float(sign_buffer), flipped=flip, rule=rule, reason=reason, element=element,
        mean_charge=mean_charge, label_agreement=agreement, conflict=conflict,
    )


def _conflict(rule: str, element: Optional[str], mean_charge: Optional[float], agreement: dict[str, float]) -> Optional[str]:
    """The disagreement to report after the decision, or None."""
    problems = []
    if rule in ("data", "labels") and mean_charge is not None and mean_charge > UNDETERMINED_CHARGE:
        problems.append(
            f"the sign the {rule} fix gives {element} (most electronegative) a positive mean latent charge "
            f"({mean_charge:+.3g} e), against the electronegativity convention"
        )
    disagreeing = [f"{name} ({value:+.2f})" for name, value in agreement.items() if value < 0]
    if disagreeing:
        problems.append("the latent charges disagree in sign with the labels: " + ", ".join(disagreeing))
    return "; ".join(problems) or None
