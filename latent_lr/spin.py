"""The total spin of a structure: how it is given, and what makes it impossible.

Convention: the *total spin* of a structure is S = 2S_z = N↑ − N↓, the number
of unpaired electrons (an integer; 0 singlet, 1 doublet, 2 triplet ...).  It is
read from ``atoms.info['spin']`` (2S_z, may be negative: spin-down majority) or
from ``atoms.info['multiplicity']`` (2S + 1 ≥ 1, taken with S_z = S, so
2S_z = multiplicity − 1).  Absent: 0.  Per-atom spin populations s_i = n↑_i −
n↓_i (electrons, = magnetic moments in μ_B for spin-only g = 2) sum to S.

With N_e = Σ Z_i − Q electrons (Q the total charge, when it is an integer),
2S_z must have the parity of N_e and |2S_z| ≤ N_e.  Pseudopotential codes count
valence electrons only; core electrons are paired, so the parity is the same.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

#: info keys read by default: 2S_z, and the multiplicity 2S + 1.
SPIN_KEY = "spin"
MULTIPLICITY_KEY = "multiplicity"

_INTEGER_TOLERANCE = 1e-9


def spin_info_keys(reads_spin: bool) -> tuple[Optional[str], Optional[str]]:
    """The default (spin, multiplicity) info keys for a model that reads the total spin, (None, None)
    for a spin-blind one, which ignores them and never checks them (structures normalised to the
    default keys, such as training frames; a model's own keys: ``LongRangeModel.spin_keys``)."""
    return (SPIN_KEY, MULTIPLICITY_KEY) if reads_spin else (None, None)


def _integer(value: Any, what: str, where: str, hint: str) -> int:
    """``value`` as an int, or ValueError naming ``what`` at ``where``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} = {value!r} is not a number; {hint}.") from None
    if not math.isfinite(number) or abs(number - round(number)) > _INTEGER_TOLERANCE:
        raise ValueError(f"{where}: {what} = {value!r} is not an integer; {hint}.")
    return int(round(number))


def total_spin(
    info: Mapping[str, Any],
    numbers: Sequence[int],
    charge: float = 0.0,
    spin_key: Optional[str] = SPIN_KEY,
    multiplicity_key: Optional[str] = MULTIPLICITY_KEY,
    where: str = "structure",
) -> int:
    """2S_z = N↑ − N↓ of one structure from ``info[spin_key]`` or ``info[multiplicity_key]`` (0 if neither).

    Args:
        info: the structure's ``atoms.info``.
        numbers: its atomic numbers (for the electron count).
        charge: its total charge Q, e (the parity check applies when Q is an integer).
        spin_key, multiplicity_key: the info keys (None: not read).
        where: names the structure in error messages.

    Raises:
        ValueError (one line): a non-integer spin, a multiplicity < 1 or not an integer, spin and
        multiplicity that disagree, or a spin impossible for the electron count (parity, |2S_z| > N_e).
    """
    spin_given = spin_key is not None and spin_key in info
    multiplicity_given = multiplicity_key is not None and multiplicity_key in info
    if not spin_given and not multiplicity_given:
        return 0
    spin: Optional[int] = None
    if spin_given:
        assert spin_key is not None
        spin = _integer(info[spin_key], f"info[{spin_key!r}]", where,
                        "give 2S_z = N↑ − N↓, the number of unpaired electrons (0 singlet, 1 doublet, 2 triplet)")
    if multiplicity_given:
        assert multiplicity_key is not None
        multiplicity = _integer(info[multiplicity_key], f"info[{multiplicity_key!r}]", where,
                                "give the spin multiplicity 2S + 1 (1 singlet, 2 doublet, 3 triplet)")
        if multiplicity < 1:
            raise ValueError(f"{where}: info[{multiplicity_key!r}] = {multiplicity} is below 1; the multiplicity "
                             "2S + 1 is at least 1 (1 singlet, 2 doublet, 3 triplet).")
        if spin is not None and abs(spin) != multiplicity - 1:
            raise ValueError(f"{where}: info[{spin_key!r}] = {spin} disagrees with info[{multiplicity_key!r}] = "
                             f"{multiplicity} (2S_z = ±(multiplicity − 1) = ±{multiplicity - 1}); give one of them.")
        spin = multiplicity - 1 if spin is None else spin
    assert spin is not None
    check_spin_fits_electrons(spin, sum(int(z) for z in numbers), charge, where)
    return spin


def check_spin_fits_electrons(spin: int, atomic_number_sum: int, charge: float, where: str) -> None:
    """ValueError (one line) when 2S_z = ``spin`` is impossible for the N_e = Σ Z − Q electrons of a
    structure: |2S_z| > N_e, or 2S_z without the parity of N_e.  Not checked when Q is not an integer.

    Args:
        spin: 2S_z; atomic_number_sum: Σ Z of the structure's atoms; charge: its net charge Q, e;
        where: names the structure (or argument) in the message.
    """
    if not math.isfinite(charge) or abs(charge - round(charge)) > _INTEGER_TOLERANCE:
        return
    electrons = int(atomic_number_sum) - int(round(charge))
    if abs(spin) > electrons:
        raise ValueError(f"{where}: 2S_z = {spin} needs at least {abs(spin)} electrons but the structure has "
                         f"{electrons} (Σ Z = {electrons + int(round(charge))}, charge {charge:g}); check the spin and charge.")
    if (electrons - spin) % 2:
        raise ValueError(f"{where}: 2S_z = {spin} (multiplicity {abs(spin) + 1}) is impossible with {electrons} "
                         f"electrons (Σ Z − charge): 2S_z must be {'even' if electrons % 2 == 0 else 'odd'}; "
                         "check the spin, multiplicity and charge.")
