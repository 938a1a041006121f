"""Switched real-space pair energies with an analytic first derivative.

The periodic real-space sum evaluates, per pair, q_i q_j f(r) with
f(r) = S(r) (erfc(α r) - erfc(β r)) / r (:func:`.kernels.switched_real_space_kernel`).
Recording its ~20 elementwise operations for autograd makes the backward
replay each of them; here the forward computes f and f'(r)/r together without
a graph and the backward is three products:

    ∂E/∂r_vec = q_i q_j f'(r)/r r_vec,   ∂E/∂q_i = q_j f,   ∂E/∂q_j = q_i f,

with f' = S' K + S K', K = (erfc(α r) - erfc(β r))/r and K' from
:func:`.kernels.screened_pair_kernel_and_slope`, S = 1 - (10t³ - 15t⁴ + 6t⁵),
S' = -30 t² (1 - t)² / (r_cut - r_switch), t = (r - r_switch)/(r_cut - r_switch) in [0, 1].

When the backward itself is differentiated (``create_graph=True``: training
on forces) it recomputes the same terms with recorded operations from the
saved inputs, so higher derivatives are exact.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .kernels import screened_pair_kernel_and_slope
from .switching import switch_off_and_slope


def switched_pair_energies(
    vectors: torch.Tensor,
    charges_first: torch.Tensor,
    charges_second: torch.Tensor,
    alpha_split: torch.Tensor,
    alpha_smear: Optional[torch.Tensor],
    r_switch: torch.Tensor,
    r_cut: torch.Tensor,
) -> torch.Tensor:
    """q_i q_j f(|r_vec|) per pair, in e²/Å (units of k_e), differentiable in vectors and charges.

    Args:
        vectors: (P, 3) pair vectors, Å; |r| > 0.
        charges_first, charges_second: (P,) charges of the pairs' atoms, e.
        alpha_split: (P,) Ewald splitting parameter per pair, 1/Å.
        alpha_smear: scalar tensor 1/(√2 σ), 1/Å, or None for point charges.
        r_switch, r_cut: (P,) switch-off start and end per pair, Å (r_cut > r_switch).

    The parameters are constants here: pass tensors that need no gradient
    (use :func:`.kernels.switched_real_space_kernel` otherwise).
    """
    smear = alpha_smear if alpha_smear is not None else torch.full_like(alpha_split[:1], math.inf)
    return _SwitchedPairEnergies.apply(
        vectors, charges_first, charges_second, alpha_split, smear.reshape(1), r_switch, r_cut
    )


def _kernel_and_slope(
    distance: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, r_switch: torch.Tensor, r_cut: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """f(r) and f'(r)/r of the switched kernel (β = inf: point charges)."""
    inverse = 1.0 / distance
    smear = beta if bool(torch.isfinite(beta).all()) else None
    kernel, kernel_slope = screened_pair_kernel_and_slope(distance, inverse, alpha, smear)
    switch, switch_slope = switch_off_and_slope(distance, r_switch, r_cut)
    return switch * kernel, (switch_slope * kernel + switch * kernel_slope) * inverse


class _SwitchedPairEnergies(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vectors, charges_first, charges_second, alpha, beta, r_switch, r_cut):  # type: ignore[override]
        distance = vectors.norm(dim=1)
        kernel, slope = _kernel_and_slope(distance, alpha, beta, r_switch, r_cut)
        ctx.save_for_backward(vectors, charges_first, charges_second, alpha, beta, r_switch, r_cut, kernel, slope)
        return charges_first * charges_second * kernel

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        vectors, charges_first, charges_second, alpha, beta, r_switch, r_cut, kernel, slope = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: recompute with recorded operations
            kernel, slope = _kernel_and_slope(vectors.norm(dim=1), alpha, beta, r_switch, r_cut)
        product = grad * charges_first * charges_second
        grad_vectors = (product * slope).unsqueeze(1) * vectors
        weighted = grad * kernel
        return grad_vectors, weighted * charges_second, weighted * charges_first, None, None, None, None

