"""Pair kernels of the real-space and direct sums."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .switching import switch_off


def _erfc_difference(
    distance: torch.Tensor, alpha_split: torch.Tensor, alpha_smear: Optional[torch.Tensor]
) -> torch.Tensor:
    """erfc(alpha_split r) - erfc(alpha_smear r) (erfc(alpha_split r) for point charges), dimensionless."""
    difference = torch.erfc(alpha_split * distance)
    if alpha_smear is not None:
        difference = difference - torch.erfc(alpha_smear * distance)
    return difference


def screened_pair_kernel(
    distance: torch.Tensor, alpha_split: torch.Tensor, alpha_smear: Optional[torch.Tensor]
) -> torch.Tensor:
    """(erfc(alpha_split r) - erfc(alpha_smear r)) / r, in 1/Å.

    This is the part of the smeared kernel erf(alpha_smear r)/r that the
    reciprocal sum erf(alpha_split r)/r leaves over.  ``alpha_split = 0`` gives
    the full smeared kernel (open boundaries); ``alpha_smear = None`` means
    point charges (alpha_smear = ∞).

    Args:
        distance: (P,) pair distances, Å; must be > 0.
        alpha_split: (P,) Ewald splitting parameter per pair, 1/Å.
        alpha_smear: scalar tensor 1/(√2 sigma), 1/Å, or None for point charges.
    """
    return _erfc_difference(distance, alpha_split, alpha_smear) / distance


def screened_pair_kernel_and_slope(
    distance: torch.Tensor,
    inverse: torch.Tensor,
    alpha_split: torch.Tensor,
    alpha_smear: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`screened_pair_kernel` K (1/Å) and its radial derivative dK/dr (1/Å²), (P,) each.

    dK/dr = (2/√π)(alpha_smear e^{-alpha_smear² r²} - alpha_split e^{-alpha_split² r²})/r - K/r
    (the first Gaussian absent for point charges).  ``inverse`` is 1/r, (P,) 1/Å, the caller's
    own (one node for autograd when the caller scales by it too); K is the erfc difference
    times it, so it can differ from :func:`screened_pair_kernel` in the last bit.
    """
    gaussian = alpha_split * torch.exp(-(alpha_split * distance) ** 2)
    if alpha_smear is not None:
        gaussian = gaussian - alpha_smear * torch.exp(-(alpha_smear * distance) ** 2)
    kernel = _erfc_difference(distance, alpha_split, alpha_smear) * inverse
    return kernel, -(2.0 / math.sqrt(math.pi)) * gaussian * inverse - kernel * inverse


def switched_real_space_kernel(
    distance: torch.Tensor,
    alpha_split: torch.Tensor,
    alpha_smear: Optional[torch.Tensor],
    r_switch: torch.Tensor,
    r_cut: torch.Tensor,
) -> torch.Tensor:
    """:func:`screened_pair_kernel` switched off smoothly between r_switch and r_cut, 1/Å.

    Args:
        distance: (P,) pair distances, Å; must be > 0.
        alpha_split: (P,) Ewald splitting parameter per pair, 1/Å.
        alpha_smear: scalar tensor 1/(√2 sigma), 1/Å, or None for point charges.
        r_switch: (P,) where the switch-off begins, Å.
        r_cut: (P,) where the kernel reaches zero, Å (> r_switch).
    """
    return screened_pair_kernel(distance, alpha_split, alpha_smear) * switch_off(
        distance, r_switch, r_cut
    )
