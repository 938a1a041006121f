"""Pair kernels of the real-space and direct sums."""

from __future__ import annotations

from typing import Optional

import torch

from .switching import switch_off


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
    kernel = torch.erfc(alpha_split * distance)
    if alpha_smear is not None:
        kernel = kernel - torch.erfc(alpha_smear * distance)
    return kernel / distance


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
