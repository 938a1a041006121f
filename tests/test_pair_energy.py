"""The analytic-backward real-space pair energy against recorded autograd and finite differences."""

from __future__ import annotations

import pytest
import torch

from latent_lr.electrostatics.kernels import switched_real_space_kernel
from latent_lr.electrostatics.pair_energy import switched_pair_energies


def pairs(seed=0, n_pairs=40):
    """Pair vectors of 0.5-6 Å, many inside the 3-4.5 Å switching region."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_pairs, 3, generator=generator, dtype=torch.float64), dim=1)
    lengths = 0.5 + 5.5 * torch.rand(n_pairs, 1, generator=generator, dtype=torch.float64)
    charges = torch.randn(2, n_pairs, generator=generator, dtype=torch.float64)
    constant = torch.ones(n_pairs, dtype=torch.float64)
    return (directions * lengths).requires_grad_(), charges[0].requires_grad_(), charges[1].requires_grad_(), constant


@pytest.mark.parametrize("sigma", [None, 0.9])
def test_values_and_first_and_second_derivatives(sigma):
    vectors, q_first, q_second, one = pairs()
    alpha, r_switch, r_cut = 0.6 * one, 3.0 * one, 4.5 * one
    smear = None if sigma is None else torch.tensor(1.0 / (2.0**0.5 * sigma), dtype=torch.float64)

    def fused(v, a, b):
        return switched_pair_energies(v, a, b, alpha, smear, r_switch, r_cut)

    def recorded(v, a, b):
        return a * b * switched_real_space_kernel(v.norm(dim=1), alpha, smear, r_switch, r_cut)

    inputs = (vectors, q_first, q_second)
    assert torch.allclose(fused(*inputs), recorded(*inputs), rtol=1e-14, atol=1e-16)
    # finite differences of the first and second derivatives (forces, and training on forces)
    assert torch.autograd.gradcheck(fused, inputs)
    assert torch.autograd.gradgradcheck(fused, inputs)
    weights = torch.rand(len(vectors), dtype=torch.float64)
    ours = torch.autograd.grad((weights * fused(*inputs)).sum(), inputs)
    reference = torch.autograd.grad((weights * recorded(*inputs)).sum(), inputs)
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    # beyond r_cut every term and slope vanishes
    far = fused(vectors.detach() * 10.0, q_first, q_second)
    assert bool((far[vectors.detach().norm(dim=1) * 10.0 > 4.5] == 0.0).all())
