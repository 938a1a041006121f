"""Smooth switching function that turns truncated sums off without jumps.

A hard cut-off makes energies jump whenever a pair distance or a k-vector
length crosses it (in MD, or as the cell deforms under a barostat).  Every
term is multiplied instead by a weight that is 1 up to ``inner``, falls to 0 at
``outer`` and is twice continuously differentiable, so energies, forces and
stresses stay continuous: a term enters the sum with zero weight and zero
slope.
"""

from __future__ import annotations

import torch


def switch_off(x: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """C² weight 1 - (10t³ - 15t⁴ + 6t⁵), t = (x - inner)/(outer - inner) clamped to [0, 1].

    Args:
        x: any shape, the switched variable (a distance in Å or |k| in 1/Å).
        inner: broadcastable to ``x``, where the switch starts (weight 1 below).
        outer: broadcastable to ``x``, where the weight reaches 0; must exceed ``inner``.

    Returns:
        Weights in [0, 1], shape of ``x``.
    """
    t = ((x - inner) / (outer - inner)).clamp(0.0, 1.0)
    return _weight(t)


def switch_off_and_slope(x: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`switch_off` and its derivative with respect to ``x``, -30 t² (1 - t)² / (outer - inner), for
    hand-written backward passes; arguments as :func:`switch_off`."""
    width = outer - inner
    t = ((x - inner) / width).clamp(0.0, 1.0)
    one_minus = 1.0 - t
    return _weight(t), -30.0 * (t * t) * one_minus * one_minus / width


def _weight(t: torch.Tensor) -> torch.Tensor:
    return 1.0 - t * t * t * (10.0 + t * (-15.0 + 6.0 * t))
