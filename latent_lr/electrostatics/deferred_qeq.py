"""Qeq charges and energy whose derivatives are built only when a backward pass asks for them.

:func:`~.qeq.equilibrate_charges` returns charges that carry their implicit
derivatives from the start: the forward pass records one differentiable engine
product (the residual b − H q̄) so that any later loss on the charges, the
energy or the forces can be differentiated, to any order.  During MD only the
energy and its first derivatives are needed, and for those no derivative of the
charges is (Hellmann–Feynman): the charges minimise

    E(q; θ) = Σ_i χ_i q_i + ½ Σ_i (J_i + k_e√(2/π)/σ) q_i² + E_coul(q),   Σ_{i∈b} q_i = Q_b,

so ∂E_b/∂q_i = −μ_b (the Lagrange multiplier) for every atom i of structure b,
and with Σ_{i∈b} dq_i/dθ = dQ_b/dθ,

    dE_b/dθ = ∂E_b/∂θ|_q − μ_b dQ_b/dθ,   θ = χ, J, positions, cell, σ, Q.

Here the forward pass only solves for q̄ (no graph) and evaluates E(q̄); the
two autograd Functions below defer the rest to the backward pass:

* :class:`_StationaryEnergy`: a first-order backward (``create_graph=False``,
  e.g. forces in MD, the energy term of a loss) is the Hellmann–Feynman
  expression above, one engine energy-and-gradient at fixed q̄ and no adjoint
  solve; its error is first order in the CG residual (the residual times
  dq/dθ).  A backward that builds a graph (training on forces, Hessians)
  re-runs the implicit solve from q̄ (0 CG iterations) and differentiates
  E(q(θ); θ), so second derivatives are exact.
* :class:`_DeferredCharges`: the charges' value is q̄; their backward re-runs
  the implicit solve from q̄ and returns its vector-Jacobian product (losses on
  charges or dipoles, Born charges), to any order.

The results equal :func:`~.qeq.equilibrate_charges` and :func:`~.qeq.qeq_energy`
to the CG tolerance; only where the cost falls differs.  Several outputs
differentiated together each re-run the solve, so training, which
differentiates energy, forces and charges together, keeps the eager path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .qeq import equilibrate_charges, qeq_energy

#: Index of each differentiable input in the tensors the two Functions receive.
_INPUTS = ("electronegativity", "hardness", "positions", "cell", "smearing", "total_charge")


@dataclass(frozen=True)
class _Settings:
    """The non-tensor arguments of the solve and the energy."""

    pbc: torch.Tensor
    batch: torch.Tensor
    options: dict[str, Any]  # keyword options of equilibrate_charges

    def charges(self, inputs: tuple[torch.Tensor, ...], initial: Optional[torch.Tensor]) -> torch.Tensor:
        chi, hardness, positions, cell, smearing, total = inputs
        return equilibrate_charges(
            chi, hardness, positions, cell, self.pbc, self.batch, total, smearing, **{**self.options, "initial": initial}
        )

    def energy(self, charges: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        chi, hardness, positions, cell, smearing, _ = inputs
        accuracy, state = self.options.get("accuracy", 1e-6), self.options.get("state")
        return qeq_energy(charges, chi, hardness, positions, cell, self.pbc, self.batch, smearing, accuracy, state)


def deferred_equilibration(
    electronegativity: torch.Tensor,
    hardness: torch.Tensor,
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    batch: torch.Tensor,
    total_charge: torch.Tensor,
    smearing: torch.Tensor,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qeq charges q* (N,) e and the minimised E(q*) (B,) eV, derivatives deferred (module docstring).

    Arguments and keyword ``options`` (accuracy, solver, rtol, state, initial,
    statistics, ...) as in :func:`~.qeq.equilibrate_charges`; ``electronegativity``
    is the χ the charges minimise with (including any field shift), and the
    energy is E(q*) with that χ.  ``statistics`` records the forward solve and,
    when a backward pass re-runs it, that solve (0 iterations) and its adjoint solves.
    """
    smearing = torch.as_tensor(smearing, dtype=positions.dtype, device=positions.device)
    initial = options.pop("initial", None)
    settings = _Settings(pbc, batch, options)
    inputs = (electronegativity, hardness, positions, cell, smearing, total_charge)
    with torch.no_grad():
        solution = settings.charges(tuple(t.detach() for t in inputs), initial)
    charges = _DeferredCharges.apply(settings, solution, *inputs)
    energy = _StationaryEnergy.apply(settings, solution, *inputs)
    return charges, energy


def _wanted(inputs: tuple[torch.Tensor, ...], needs: tuple[bool, ...]) -> list[torch.Tensor]:
    return [tensor for tensor, need in zip(inputs, needs) if need]


def _aliases(inputs: tuple[torch.Tensor, ...], needs: tuple[bool, ...]) -> tuple[torch.Tensor, ...]:
    """Detached copies of ``inputs``, requiring grad where needed."""
    return tuple(t.detach().requires_grad_(need) for t, need in zip(inputs, needs))


def _scatter(grads: tuple[Optional[torch.Tensor], ...], needs: tuple[bool, ...]) -> list[Optional[torch.Tensor]]:
    """Gradients of the wanted inputs back in input order (None for the others)."""
    found = iter(grads)
    return [next(found) if need else None for need in needs]


def multiplier_gradient(charge_gradient: torch.Tensor, batch: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """dE_b/dQ_b = −μ_b (B,) of a stationary energy: the mean over structure b's atoms of ∂E/∂q_i (N,),
    which the total-charge constraint makes equal on every atom of b."""
    counts = torch.bincount(batch, minlength=total.shape[0]).to(total.dtype)
    return torch.zeros_like(total).index_add(0, batch, charge_gradient) / counts


class _DeferredCharges(torch.autograd.Function):
    """Value q̄; backward: the vector-Jacobian product of the implicit solve, re-run from q̄."""

    @staticmethod
    def forward(ctx: Any, settings: _Settings, solution: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.settings = settings
        ctx.save_for_backward(solution, *inputs)
        return solution.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        solution, *saved = ctx.saved_tensors
        inputs, needs = tuple(saved), tuple(ctx.needs_input_grad[2:])
        # Nothing to do (e.g. the field energy −Σ q r·E_ext at zero field): no solve.
        if not any(needs) or (not grad.requires_grad and not bool(grad.any())):
            return (None, None, *([None] * len(inputs)))
        create = torch.is_grad_enabled()
        if not create:  # a graph of its own: the caller's graph is not traversed (or freed) here
            inputs = _aliases(inputs, needs)
        with torch.enable_grad():
            charges = ctx.settings.charges(inputs, solution)
            grads = torch.autograd.grad(charges, _wanted(inputs, needs), grad, create_graph=create, allow_unused=True)
        return (None, None, *_scatter(grads, needs))


class _StationaryEnergy(torch.autograd.Function):
    """Value E(q̄); backward: Hellmann–Feynman to first order, the implicit solve under ``create_graph``."""

    @staticmethod
    def forward(ctx: Any, settings: _Settings, solution: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.settings = settings
        ctx.save_for_backward(solution, *inputs)
        needs = tuple(ctx.needs_input_grad[2:])
        ctx.recorded = None
        if not any(needs):
            return settings.energy(solution, inputs)
        # The Hellmann–Feynman graph at fixed q̄ is recorded now, so that a first-order backward (MD forces)
        # does not evaluate the energy a second time.
        aliases = _aliases(inputs, needs)
        fixed = solution.detach().requires_grad_(needs[_INPUTS.index("total_charge")])
        with torch.enable_grad():
            energy = settings.energy(fixed, aliases)
        ctx.recorded = (energy, aliases, fixed)
        return energy.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        settings: _Settings = ctx.settings
        solution, *saved = ctx.saved_tensors
        inputs, needs = tuple(saved), tuple(ctx.needs_input_grad[2:])
        if not any(needs):
            return (None, None, *([None] * len(inputs)))
        if torch.is_grad_enabled():  # a graph is being built: exact higher derivatives through the solve
            with torch.enable_grad():
                energy = settings.energy(settings.charges(inputs, solution), inputs)
                exact = torch.autograd.grad(energy, _wanted(inputs, needs), grad, create_graph=True, allow_unused=True)
            return (None, None, *_scatter(exact, needs))
        total_index = _INPUTS.index("total_charge")
        if ctx.recorded is None:
            aliases = _aliases(inputs, needs)
            fixed = solution.detach().requires_grad_(needs[total_index])
            with torch.enable_grad():
                energy = settings.energy(fixed, aliases)
        else:
            energy, aliases, fixed = ctx.recorded
        with torch.enable_grad():
            wanted = _wanted(aliases, needs) + ([fixed] if needs[total_index] else [])
            grads: list[Optional[torch.Tensor]] = list(
                torch.autograd.grad(energy, wanted, grad, allow_unused=True, retain_graph=True)
            )
        if needs[total_index]:
            # dE_b/dQ_b = −μ_b = the mean of ∂E_b/∂q_i over the structure's atoms.
            charge_gradient = grads.pop()
            assert charge_gradient is not None, "the energy depends on the charges"
            per_structure = multiplier_gradient(charge_gradient, settings.batch, inputs[total_index])
            last = grads[-1]
            grads[-1] = per_structure if last is None else last + per_structure
        return (None, None, *_scatter(tuple(grads), needs))
