"""Ewald parameters chosen from a requested accuracy.

The Coulomb kernel 1/r is split with a Gaussian of inverse width ``alpha``::

    1/r = erfc(alpha r)/r  +  erf(alpha r)/r
          (real space)        (reciprocal space, Fourier 4π/k² exp(-k²/4α²))

Both truncation errors fall like ``exp(-s²)`` with ``s = alpha r_cut`` in real
space and ``s = k_cut / (2 alpha)`` in reciprocal space (Kolafa & Perram,
Mol. Simul. 9, 351 (1992)), so one dimensionless ``s`` sets both cut-offs.
``alpha`` itself only moves work between the two sums; it is chosen to balance
their cost, ``alpha = sqrt(pi) (w N / V²)^(1/6)`` (Fincham, Mol. Simul. 13, 1
(1994)), with ``w`` the measured cost ratio of a real-space pair to an
(atom, k-vector) term.

With Gaussian smearing ``sigma`` the kernel is erf(r / (√2 sigma)) / r, whose
Fourier transform is already damped by exp(-sigma² k² / 2); ``alpha`` is
capped at ``1 / (√2 sigma)``, and at the cap the real-space part vanishes.

Both sums are switched off smoothly (:mod:`.switching`) rather than truncated,
so that energies, forces and stresses stay continuous when pairs or k-vectors
cross a cut-off: terms keep full weight up to the accuracy cut-offs
``r_switch`` and ``k_switch`` and fade to zero at ``r_cut`` and ``k_cut``,
:data:`SWITCH_WIDTH` further out.  The switch only adds (partially weighted)
terms beyond the accuracy cut-offs, so the accuracy guarantee is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Cost of one real-space pair relative to one (atom, k-vector) term, measured
#: on CPU with benchmarks/bench_engine_scaling.py.
REAL_TO_RECIPROCAL_COST = 4.0

#: Extra margin on ``s`` so that the *measured* relative force error stays below
#: the request (verified in tests/test_electrostatics_accuracy.py; 0.3 kept
#: the worst case there, a rattled NaCl crystal with small forces, at 0.8x with
#: hard cut-offs, and keeps it at 0.25x with the smooth switch-off below, which
#: would allow 0.15 (0.8x) for Ewald alone; PME shares this margin).
S_MARGIN = 0.3

#: Width of the switching region relative to the accuracy cut-off: r_cut =
#: (1 + SWITCH_WIDTH) r_switch and k_cut = (1 + SWITCH_WIDTH) k_switch.  Costs
#: (1 + SWITCH_WIDTH)³ ≈ 1.33x more pairs and k-vectors than a hard cut-off.
SWITCH_WIDTH = 0.1


@dataclass(frozen=True)
class EwaldParameters:
    """Parameters of one structure's Ewald sum.

    Attributes:
        alpha: splitting parameter, 1/Å.
        r_switch: real-space accuracy cut-off, Å, where the switch-off begins.
        r_cut: real-space cut-off, Å, where pair weights reach zero (0 when the
            real-space sum vanishes).
        k_switch: reciprocal-space accuracy cut-off, 1/Å, where the switch-off begins.
        k_cut: reciprocal-space cut-off, 1/Å, where k-vector weights reach zero.
    """

    alpha: float
    r_switch: float
    r_cut: float
    k_switch: float
    k_cut: float


def accuracy_to_s(accuracy: float) -> float:
    """Dimensionless cut-off ``s`` with exp(-s²) ≈ accuracy, plus a safety margin."""
    if not 0.0 < accuracy < 1.0:
        raise ValueError(f"accuracy must lie in (0, 1), got {accuracy}; 1e-6 is a good default.")
    return math.sqrt(-math.log(accuracy)) + S_MARGIN


def smearing_alpha(smearing: float) -> float:
    """Inverse Gaussian width of the smeared kernel erf(alpha r)/r; inf for point charges."""
    return math.inf if smearing == 0.0 else 1.0 / (math.sqrt(2.0) * smearing)


def ewald_parameters(
    n_atoms: int, volume: float, accuracy: float, smearing: float = 0.0
) -> EwaldParameters:
    """Choose ``alpha``, ``r_cut`` and ``k_cut`` for one periodic structure.

    Args:
        n_atoms: number of charges in the cell.
        volume: cell volume, Å³.
        accuracy: target relative error of energy and forces.
        smearing: Gaussian charge width sigma, Å.
    """
    s = accuracy_to_s(accuracy)
    alpha = math.sqrt(math.pi) * (REAL_TO_RECIPROCAL_COST * n_atoms / volume**2) ** (1.0 / 6.0)
    alpha_smear = smearing_alpha(smearing)
    alpha = min(alpha, alpha_smear)
    r_switch = 0.0 if alpha == alpha_smear else s / alpha
    k_switch = 2.0 * s * alpha
    return EwaldParameters(
        alpha=alpha,
        r_switch=r_switch,
        r_cut=(1.0 + SWITCH_WIDTH) * r_switch,
        k_switch=k_switch,
        k_cut=(1.0 + SWITCH_WIDTH) * k_switch,
    )
