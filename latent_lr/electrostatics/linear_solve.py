"""Batched conjugate gradients for symmetric positive-definite operators, with implicit gradients.

:func:`solve_spd` solves ``H x = b`` for a batch of independent structures, where
``H`` is given only as a callable ``matvec(v, *operator_tensors) -> H v``
(matrix-free, e.g. the Coulomb matrix applied through the Ewald engine), and
optionally imposes one linear equality per structure: the unknowns of each
structure sum to a given total.  With the constraint the solution is the
minimiser of ``½ xᵀHx − bᵀx`` subject to ``Σ_{i∈g} x_i = c_g``, i.e. of the KKT
system ``H x + 1 μ_g = b``, ``1ᵀx_g = c_g``.  With ``constrained`` the sum
constraint applies only to some trailing components (e.g. the charge column of
a joint charge-and-dipole unknown (N, 4)); the other components are free.

Method: preconditioned conjugate gradients (Hestenes & Stiefel 1952) with one
set of CG scalars per structure, so every structure converges independently
and ``matvec`` is called once per iteration for the whole batch.  The
constraint is handled by the constraint preconditioner
``z = D⁻¹r − D⁻¹1 (1ᵀD⁻¹r)/(1ᵀD⁻¹1)`` (the exact KKT solve for a diagonal
``H ≈ D``), whose range is the constraint subspace: started from a feasible
point, every iterate stays feasible to round-off, and CG works on ``H``
restricted to that subspace, where it is positive definite.

Gradients (implicit differentiation, no unrolled iterations): the converged
x̄ (no graph) is returned as ``x = x̄ + S(r)`` with the residual
``r = b − H(θ) x̄`` (a differentiable expression, ≈ 0 in value) and S = H(θ)⁻¹
applied on the constraint set by an autograd Function whose value is 0 (it is
O(residual)).  Its backward solves the adjoint system ``H λ + 1ν = g``,
``1ᵀλ_g = 0`` (g = ∂L/∂x) with the same CG and returns ∂L/∂r = λ, ∂L/∂c = ν.
Hence dx = H⁻¹(db − dH x̄) exactly; and since the adjoint solve is differentiable
in turn, the second derivative is H⁻¹(d²b − d²H x − 2 dH dx) — mixed
derivatives such as ∂/∂θ of ∂(energy)/∂positions, needed to train on forces,
are exact up to the solver tolerance (checked against finite differences in
tests/test_qeq.py).

Requirements on ``matvec``: linear in ``v``, symmetric positive definite (on the
constraint subspace when a total is given), block diagonal over structures
(no coupling between structures), and differentiable in ``operator_tensors``.
Every tensor ``H`` depends on with a gradient must be passed in
``operator_tensors``; tensors captured by a closure get no gradient.

Optionally ``matvec.frozen(*operator_tensors)`` returns a faster ``v ↦ H v`` for
fixed (detached) operator tensors, e.g. one that reuses a retained graph; the CG
iterations use it and drop it when the solve returns.

Fast solves (all optional, none changes the solution beyond the tolerance):

* ``initial``: a starting guess (e.g. the previous MD step's solution, a warm
  start).  It is first moved onto the constraint set along P⁻¹1, so any guess is
  safe.  Only the forward solve starts there; the adjoint solves of the backward
  pass start from their own preconditioned right-hand side, and the implicit
  derivatives dx = H⁻¹(db − dH x̄) do not depend on where CG started.
* ``preconditioner``: any fixed symmetric positive-definite approximation
  ``r ↦ P⁻¹ r`` of H⁻¹ (block diagonal over structures), e.g. the k-space
  preconditioner of :mod:`.kspace_preconditioner`; it replaces the Jacobi
  ``diagonal``.  With a total constraint the constraint preconditioner becomes
  ``z = P⁻¹r − w (1ᵀP⁻¹r)/(1ᵀw)``, w = P⁻¹1, which reduces to the one above for
  diagonal P.  With several constrained components (``constrained``) the 1 of each is
  its indicator c_k, and z = P⁻¹r − W G⁻¹ Cᵀ P⁻¹ r with W = P⁻¹C and G = CᵀW per
  structure, so P⁻¹ may couple constrained and free components (e.g. the joint
  charge–dipole near-field blocks).
* ``statistics``: a :class:`SolveStatistics` that records the iteration count of
  every CG run (forward, then each adjoint solve).
* ``matvec.approximate(*operator_tensors)`` (optional, like ``frozen``): a cheaper
  ``v ↦ H̃ v`` with H̃ ≈ H (e.g. a coarser PME mesh), or None.  The solve then runs as
  iterative refinement: x ← x + d, H̃ d = r by CG to :data:`REFINEMENT_INNER_RTOL`,
  r = b − H x with the exact operator, until CG's own stopping test holds for the
  exact residual (so the tolerance is the same); each correction contracts the
  error by about ‖I − H̃⁻¹H‖ + the inner tolerance, so most products use H̃.  A
  correction that gains less than :data:`REFINEMENT_MIN_GAIN` hands over to CG
  with H.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

#: Default relative tolerance on the (projected) residual, by dtype.
DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

#: Default cap on CG iterations (exact arithmetic needs at most N per structure).
DEFAULT_MAX_ITER = 1000

#: Iterative refinement (``matvec.approximate``): tolerance of each correction solve with the cheap operator,
#: relative to the current residual.
REFINEMENT_INNER_RTOL = 0.01

#: Iterative refinement: a correction solve whose residual is already within 1/x of the tolerance is solved to
#: this fraction of that need (at least :data:`REFINEMENT_INNER_RTOL`, at most :data:`REFINEMENT_INNER_MAX_RTOL`),
#: leaving room for the cheap operator's own error.
REFINEMENT_MARGIN = 0.5

#: Iterative refinement: loosest tolerance of one correction solve.
REFINEMENT_INNER_MAX_RTOL = 0.3

#: Iterative refinement: cap on the CG iterations of one correction solve.
REFINEMENT_INNER_MAX_ITER = 60

#: Iterative refinement: most corrections of one solve.
REFINEMENT_MAX_STEPS = 10

#: Iterative refinement: a correction must shrink the exact residual at least this much, else CG with the
#: exact operator takes over from there.
REFINEMENT_MIN_GAIN = 0.5

MatVec = Callable[..., torch.Tensor]

#: ``r ↦ P⁻¹ r`` on (N, ...) rows: a fixed SPD approximate inverse of H, block diagonal over structures.
Preconditioner = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SolveStatistics:
    """Iteration counts of the CG runs of one or more :func:`solve_spd` calls.

    Attributes:
        iterations: one entry per CG run, in call order (the forward solve, then
            any adjoint solves of the backward pass): the iterations of the
            slowest structure.  A refined solve (``matvec.approximate``) counts its
            products with the cheap and the exact operator after the first residual.
        exact_products: one entry per refined solve: its products with the exact
            operator (residuals and any finishing CG iterations).
    """

    iterations: list[int] = field(default_factory=list)
    exact_products: list[int] = field(default_factory=list)


class ConvergenceError(RuntimeError):
    """Conjugate gradients did not reach the requested tolerance."""


@dataclass(frozen=True)
class _SolveSpec:
    """Everything about a solve that is not a tensor input of the autograd Function."""

    matvec: MatVec
    batch: torch.Tensor
    n_groups: int
    diagonal: Optional[torch.Tensor]
    constrained: Optional[torch.Tensor]
    rtol: float
    atol: float
    max_iter: int
    on_failure: str
    preconditioner: Optional[Preconditioner] = None
    statistics: Optional[SolveStatistics] = None
    #: Tolerance relative to the full ‖b‖ instead of the projected ‖P b‖ (adjoint solves, see ``backward``).
    full_reference: bool = False


def solve_spd(
    matvec: MatVec,
    rhs: torch.Tensor,
    operator_tensors: Sequence[torch.Tensor] = (),
    *,
    batch: Optional[torch.Tensor] = None,
    total: Optional[torch.Tensor] = None,
    diagonal: Optional[torch.Tensor] = None,
    rtol: Optional[float] = None,
    atol: float = 0.0,
    max_iter: int = DEFAULT_MAX_ITER,
    on_failure: str = "raise",
    constrained: Optional[torch.Tensor] = None,
    initial: Optional[torch.Tensor] = None,
    preconditioner: Optional[Preconditioner] = None,
    statistics: Optional[SolveStatistics] = None,
) -> torch.Tensor:
    """Solve ``H x = b`` (optionally with ``Σ_{i∈g} x_i = total_g``) by batched CG.

    Args:
        matvec: ``matvec(v, *operator_tensors)`` returns ``H v`` with the shape of
            ``v`` (N, ...).  Must be linear and symmetric in ``v``, positive
            definite, block diagonal over structures and differentiable in
            ``operator_tensors``.
        rhs: b, (N, ...) — rows are atoms (or other items), trailing dims free.
        operator_tensors: the tensors ``H`` depends on; gradients reach them.
        batch: (N,) sorted structure index of each row; None means one structure.
        total: (B, ...) the required sum over each structure's rows (same
            trailing shape as ``rhs``), or None for no constraint.  Gradients
            reach it (∂L/∂c is the adjoint Lagrange multiplier).
        diagonal: (N, ...) positive approximation of diag(H) used as a Jacobi
            preconditioner (not differentiated); None means the identity.
        rtol: stop a structure when ‖P r‖ ≤ rtol·max(‖P b‖, ‖P r₀‖) + atol, with
            r the residual and P the projection onto the constraint subspace
            (identity without a constraint); the adjoint solves of the backward
            pass use the full ‖g‖ in place of ‖P g‖.  Default: 1e-10 in float64, 1e-5 in
            float32.
        atol: absolute residual floor (units of b).
        max_iter: iteration cap per solve (forward and each adjoint solve).
        on_failure: ``"raise"`` (default) raises :class:`ConvergenceError` if a
            structure is not converged after ``max_iter`` iterations;
            ``"warn"`` emits a RuntimeWarning and returns the last iterate.
        constrained: bool mask of shape ``rhs.shape[1:]``, the trailing
            components that ``total`` constrains (None: all of them); the
            entries of ``total`` outside the mask are ignored.
        initial: (N, ...) starting guess of the forward solve (a warm start), not
            differentiated; it need not meet the constraint.  None: P⁻¹b.
        preconditioner: ``r ↦ P⁻¹ r`` for a fixed SPD P ≈ H, replacing ``diagonal``.
        statistics: records the iteration count of every CG run of this solve.

    Returns:
        x, (N, ...), with the dtype and device of ``rhs``.

    Raises:
        ValueError: inconsistent shapes, a non-positive preconditioner, or an
            operator found not to be positive definite.
        ConvergenceError: no convergence within ``max_iter`` (``on_failure="raise"``).
    """
    if rhs.ndim < 1 or rhs.shape[0] == 0:
        raise ValueError(f"rhs must have shape (N, ...) with N ≥ 1, got {tuple(rhs.shape)}.")
    if on_failure not in ("raise", "warn"):
        raise ValueError(f"on_failure must be 'raise' or 'warn', got {on_failure!r}.")
    if max_iter < 1:
        raise ValueError(f"max_iter must be ≥ 1, got {max_iter}.")
    if batch is None:
        batch = torch.zeros(rhs.shape[0], dtype=torch.long, device=rhs.device)
    if batch.shape != rhs.shape[:1]:
        raise ValueError(f"batch has shape {tuple(batch.shape)}; expected ({rhs.shape[0]},), one index per row of rhs.")
    n_groups = int(total.shape[0]) if total is not None else int(batch.max()) + 1
    if total is not None and tuple(total.shape) != (n_groups, *rhs.shape[1:]):
        raise ValueError(
            f"total has shape {tuple(total.shape)}; expected (n_structures, *rhs.shape[1:]) = "
            f"({n_groups}, {', '.join(map(str, rhs.shape[1:]))})."
        )
    if total is not None and int(batch.max()) >= n_groups:
        raise ValueError(f"batch refers to structure {int(batch.max())} but total has only {n_groups} rows.")
    if total is not None and bool((torch.bincount(batch, minlength=n_groups) == 0).any()):
        raise ValueError("a structure in total has no rows in batch; its sum constraint cannot be met.")
    if diagonal is not None:
        if diagonal.shape != rhs.shape:
            raise ValueError(f"diagonal has shape {tuple(diagonal.shape)}; expected rhs's shape {tuple(rhs.shape)}.")
        if not bool((diagonal > 0).all()):
            raise ValueError("diagonal (the Jacobi preconditioner) must be positive everywhere.")
        diagonal = diagonal.detach()
    mask: Optional[torch.Tensor] = None
    if constrained is not None:
        if total is None:
            raise ValueError("constrained selects components of the total constraint; pass total as well.")
        if tuple(constrained.shape) != tuple(rhs.shape[1:]) or constrained.dtype != torch.bool:
            raise ValueError(
                f"constrained must be a bool mask of shape rhs.shape[1:] = {tuple(rhs.shape[1:])}, "
                f"got {constrained.dtype} of shape {tuple(constrained.shape)}."
            )
        mask = constrained.to(device=rhs.device, dtype=rhs.dtype)
    for index, tensor in enumerate(operator_tensors):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"operator_tensors[{index}] is a {type(tensor).__name__}; pass tensors only.")
    if initial is not None:
        if initial.shape != rhs.shape:
            raise ValueError(f"initial has shape {tuple(initial.shape)}; expected rhs's shape {tuple(rhs.shape)}.")
        if not bool(torch.isfinite(initial).all()):
            raise ValueError("initial (the CG starting guess) has non-finite entries; pass None for a cold start.")
        initial = initial.detach().to(rhs.dtype)
    spec = _SolveSpec(
        matvec=matvec,
        batch=batch,
        n_groups=n_groups,
        diagonal=diagonal,
        constrained=mask,
        rtol=DEFAULT_RTOL.get(rhs.dtype, 1e-6) if rtol is None else float(rtol),
        atol=float(atol),
        max_iter=int(max_iter),
        on_failure=on_failure,
        preconditioner=preconditioner,
        statistics=statistics,
    )
    return _solve(spec, rhs, total, tuple(operator_tensors), initial)


def _solve(
    spec: _SolveSpec, rhs: torch.Tensor, total: Optional[torch.Tensor], operators: tuple[torch.Tensor, ...],
    initial: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x̄ from CG, plus a zero-valued correction that carries the exact implicit derivatives.

    x = x̄ + S(r),  r = b − H(θ) x̄,  S = H(θ)⁻¹ on the constraint set (adjusted
    total c − Σx̄).  The value of S(r) is O(residual) and is not computed; its
    derivatives are: dx = H⁻¹(db − dH x̄) to first order and, differentiating
    once more, H⁻¹(d²b − d²H x − 2 dH dx), the exact second derivative.
    """
    detached = [o.detach() for o in operators]
    frozen = getattr(spec.matvec, "frozen", None)
    approximate = getattr(spec.matvec, "approximate", None)
    with torch.no_grad():
        apply = frozen(*detached) if frozen is not None else (lambda v: spec.matvec(v, *detached))
        cheap = None if approximate is None else approximate(*detached)
        fixed_total = None if total is None else total.detach()
        if cheap is None:
            solution = _conjugate_gradients(spec, apply, rhs.detach(), fixed_total, initial)
        else:
            solution = _refined_solve(spec, apply, cheap, rhs.detach(), fixed_total, initial)
    del apply, cheap
    tracked = [rhs, *operators] + ([] if total is None else [total])
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tracked):
        return solution
    residual = rhs - spec.matvec(solution, *operators)
    remaining = None if total is None else total - _group_sum(solution, spec)
    return solution + _ImplicitCorrection.apply(spec, residual, remaining, *operators)


class _ImplicitCorrection(torch.autograd.Function):
    """y = H(θ)⁻¹ r on the constraint set, for a residual r ≈ 0: value 0, exact derivatives.

    Backward: λ = H⁻¹g (adjoint solve, itself differentiable), ∂L/∂r = λ,
    ∂L/∂c = ν (the adjoint multiplier, group mean of g − Hλ) and
    ∂L/∂θ = −λᵀ(∂H/∂θ) y, which is zero in value (y = 0) but, under
    ``create_graph``, keeps its graph through y for second derivatives.
    """

    @staticmethod
    def forward(ctx, spec: _SolveSpec, residual: torch.Tensor, remaining: Optional[torch.Tensor], *operators: torch.Tensor):
        ctx.spec = spec
        ctx.has_total = remaining is not None
        output = torch.zeros_like(residual)
        ctx.save_for_backward(output, *operators)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        spec: _SolveSpec = ctx.spec
        output, *operators = ctx.saved_tensors
        create_graph = torch.is_grad_enabled()
        zero_total = grad_output.new_zeros(spec.n_groups, *grad_output.shape[1:]) if ctx.has_total else None
        # The adjoint's tolerance is relative to the whole ‖g‖, the scale of the gradients it feeds (∂L/∂c = ν
        # carries g's component along 1).  For a loss stationary on the constraint set, e.g. the Qeq energy, g is
        # along 1 up to the forward residual, λ ≈ 0 and no iteration is spent on that round-off.
        adjoint = _solve(dataclasses.replace(spec, full_reference=True), grad_output, zero_total, tuple(operators))

        grad_total = None
        if ctx.has_total and ctx.needs_input_grad[2]:
            remainder = grad_output - spec.matvec(adjoint, *operators)
            counts = torch.bincount(spec.batch, minlength=spec.n_groups).to(grad_output.dtype)
            grad_total = _constrained(_group_sum(remainder, spec) / counts.reshape(-1, *([1] * (grad_output.ndim - 1))), spec)

        needs = ctx.needs_input_grad[3:]
        grad_operators: list[Optional[torch.Tensor]] = [None] * len(operators)
        if create_graph and any(needs):
            # Fresh aliases of θ: the graph of the result runs through y and λ only,
            # which is all a second derivative needs because y = 0.
            aliases = [o.detach().requires_grad_(n) for o, n in zip(operators, needs)]
            with torch.enable_grad():
                product = spec.matvec(output, *aliases)
                wanted = [a for a, n in zip(aliases, needs) if n]
                grads = torch.autograd.grad(product, wanted, grad_outputs=adjoint, create_graph=True, allow_unused=True)
            grads_iter = iter(grads)
            for index, need in enumerate(needs):
                if need:
                    grad = next(grads_iter)
                    grad_operators[index] = None if grad is None else -grad
        grad_residual = adjoint if ctx.needs_input_grad[1] else None
        return (None, grad_residual, grad_total, *grad_operators)


def _group_sum(values: torch.Tensor, spec: _SolveSpec) -> torch.Tensor:
    """(N, ...) -> (B, ...) sums over each structure's rows."""
    return values.new_zeros(spec.n_groups, *values.shape[1:]).index_add(0, spec.batch, values)


def _constrained(values: torch.Tensor, spec: _SolveSpec) -> torch.Tensor:
    """``values`` (M, ...) with the components outside the constraint mask set to zero."""
    return values if spec.constrained is None else values * spec.constrained


def _group_dot(a: torch.Tensor, b: torch.Tensor, spec: _SolveSpec) -> torch.Tensor:
    """(N, ...), (N, ...) -> (B,) inner products per structure."""
    return a.new_zeros(spec.n_groups).index_add(0, spec.batch, (a * b).reshape(a.shape[0], -1).sum(1))


def _per_row(values: torch.Tensor, like: torch.Tensor, spec: _SolveSpec) -> torch.Tensor:
    """(B,) -> broadcastable against (N, ...)."""
    return values[spec.batch].reshape(-1, *([1] * (like.ndim - 1)))


def lazy_operator(
    build: Callable[[], Optional[Callable[[torch.Tensor], torch.Tensor]]],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v ↦ A v`` with A = ``build()`` made on the first product, e.g. a cheap ``matvec.approximate`` operator
    that a solve whose start already meets the tolerance never uses.  A build that returns None raises
    ValueError on that product (a refined solve then finishes by CG with the exact operator)."""
    built: list[Callable[[torch.Tensor], torch.Tensor]] = []

    def apply(v: torch.Tensor) -> torch.Tensor:
        if not built:
            operator = build()
            if operator is None:
                raise ValueError("the approximate operator is not available for this batch.")
            built.append(operator)
        return built[0](v)

    return apply


class _Krylov:
    """The preconditioner, constraint projection and norms of one solve, shared by its CG runs."""

    def __init__(self, spec: _SolveSpec, rhs: torch.Tensor, constrained_total: bool):
        self.spec = spec
        if spec.preconditioner is not None:
            self.apply_inverse = spec.preconditioner
        else:
            inverse_diagonal = torch.ones_like(rhs) if spec.diagonal is None else 1.0 / spec.diagonal.to(rhs.dtype)
            self.apply_inverse = lambda residual: inverse_diagonal * residual
        # W_k = P⁻¹c_k for the indicator c_k of each constrained component k and the Gram matrices cᵀW per
        # structure: the constraint directions of the preconditioner (P⁻¹ may couple the components).
        self.directions: Optional[torch.Tensor] = None
        if constrained_total:
            mask = torch.ones(rhs.shape[1:], dtype=torch.bool, device=rhs.device) if spec.constrained is None else \
                spec.constrained.bool()
            self.components = torch.nonzero(mask.reshape(-1)).flatten()
            indicators = torch.zeros(len(self.components), *rhs.shape, dtype=rhs.dtype, device=rhs.device)
            indicators.reshape(len(self.components), rhs.shape[0], -1)[torch.arange(len(self.components)), :, self.components] = 1
            self.directions = torch.stack([self.apply_inverse(indicator) for indicator in indicators])
            gram = torch.stack([self._sums(direction) for direction in self.directions], -1)  # (B, K, K)
            self.gram_inverse = torch.linalg.inv(gram)
        self.counts = torch.bincount(spec.batch, minlength=spec.n_groups).to(rhs.dtype)

    def _sums(self, values: torch.Tensor) -> torch.Tensor:
        """(B, K) per-structure sums of the constrained components of values (N, ...)."""
        return _group_sum(values, self.spec).reshape(self.spec.n_groups, -1)[:, self.components]

    def _along_directions(self, sums: torch.Tensor) -> torch.Tensor:
        """Σ_k W_k (G⁻¹ sums)_k per structure, (N, ...), for sums (B, K) of the constrained components."""
        assert self.directions is not None
        coefficients = (self.gram_inverse @ sums[..., None])[..., 0][self.spec.batch]  # (N, K)
        shape = (-1,) + (1,) * (self.directions.ndim - 2)
        return sum((direction * coefficients[:, k].reshape(shape) for k, direction in enumerate(self.directions)),
                   torch.zeros_like(self.directions[0]))

    def precondition(self, residual: torch.Tensor) -> torch.Tensor:
        scaled = self.apply_inverse(residual)
        if self.directions is None:  # no total constraint
            return scaled
        return scaled - self._along_directions(self._sums(scaled))

    def project(self, residual: torch.Tensor) -> torch.Tensor:
        if self.directions is None:
            return residual
        mean = _group_sum(residual, self.spec) / self.counts.reshape(-1, *([1] * (residual.ndim - 1)))
        return residual - _constrained(mean, self.spec)[self.spec.batch]

    def norm(self, residual: torch.Tensor) -> torch.Tensor:
        projected = self.project(residual)
        return _group_dot(projected, projected, self.spec).sqrt()

    def start(self, rhs: torch.Tensor, total: Optional[torch.Tensor], initial: Optional[torch.Tensor]) -> torch.Tensor:
        """The first iterate: ``initial`` (or P⁻¹b) moved onto the constraint set along the directions W."""
        x = self.precondition(rhs) if initial is None else initial.clone()
        if total is None or self.directions is None:
            return x
        wanted = total.reshape(self.spec.n_groups, -1)[:, self.components]
        return x + self._along_directions(wanted - self._sums(x))

    def threshold(self, spec: _SolveSpec, rhs: torch.Tensor, residual_norm: torch.Tensor) -> torch.Tensor:
        """(B,) stopping residual norms of a run with ``spec``: rtol·max(reference, ‖P r₀‖) + atol + round-off."""
        full_norm = _group_dot(rhs, rhs, spec).sqrt()
        roundoff = 10.0 * torch.finfo(rhs.dtype).eps * full_norm
        reference = full_norm if spec.full_reference else self.norm(rhs)
        return spec.rtol * torch.maximum(reference, residual_norm) + spec.atol + roundoff


def _conjugate_gradients(
    spec: _SolveSpec, apply: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, total: Optional[torch.Tensor],
    initial: Optional[torch.Tensor] = None, krylov: Optional[_Krylov] = None,
) -> torch.Tensor:
    """Batched preconditioned CG; returns x (N, ...) without a graph."""
    krylov = krylov or _Krylov(spec, rhs, total is not None)
    x = krylov.start(rhs, total, initial)
    # Only the projected residual matters (its component along 1 is absorbed by the
    # multiplier), so it is kept projected: r·z then has no round-off from that part.
    residual = krylov.project(rhs - apply(x))
    residual_norm = krylov.norm(residual)
    threshold = krylov.threshold(spec, rhs, residual_norm)
    z = krylov.precondition(residual)
    direction = z
    rz = _group_dot(residual, z, spec)
    for iteration in range(spec.max_iter):
        active = residual_norm > threshold
        if not bool(active.any()):
            if spec.statistics is not None:
                spec.statistics.iterations.append(iteration)
            return x
        product = apply(direction)
        curvature = _group_dot(direction, product, spec)
        if bool((active & (curvature <= 0) & (rz > 0)).any()):
            raise ValueError(
                "the operator is not positive definite on the constraint subspace (pᵀHp ≤ 0 in CG); "
                "check that matvec is symmetric positive definite (for Qeq: hardness > 0)."
            )
        step = torch.where(active & (curvature > 0), rz / torch.where(curvature > 0, curvature, 1.0), 0.0)
        x = x + _per_row(step, x, spec) * direction
        residual = krylov.project(residual - _per_row(step, x, spec) * product)
        z = krylov.precondition(residual)
        rz_new = _group_dot(residual, z, spec)
        beta = torch.where(active & (rz > 0), rz_new / torch.where(rz > 0, rz, 1.0), 0.0)
        direction = z + _per_row(beta, x, spec) * direction
        rz = rz_new
        residual_norm = krylov.norm(residual)
    if spec.statistics is not None:
        spec.statistics.iterations.append(spec.max_iter)
    failed = residual_norm > threshold
    if bool(failed.any()) and spec.on_failure != "return":
        worst = int(torch.argmax(torch.where(failed, residual_norm / threshold.clamp_min(1e-300), 0.0)))
        message = (
            f"conjugate gradients did not converge in {spec.max_iter} iterations: structure {worst} has "
            f"residual {float(residual_norm[worst]):.3e} > tolerance {float(threshold[worst]):.3e}. "
            "Raise max_iter, loosen rtol/atol, or use a direct (dense) solve for small structures."
        )
        if spec.on_failure == "raise":
            raise ConvergenceError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    return x


def _refined_solve(
    spec: _SolveSpec, apply: Callable[[torch.Tensor], torch.Tensor], approximate: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor, total: Optional[torch.Tensor], initial: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Iterative refinement with a cheaper operator H̃ ≈ H; returns x (N, ...) without a graph.

    x ← x + d with H̃ d = r solved by CG to :data:`REFINEMENT_INNER_RTOL` (d sums to zero per structure) and
    r = b − H x from the exact operator; each correction contracts the error by about ‖I − H̃⁻¹H‖ plus the
    inner tolerance.  The stopping test is CG's own, on the exact residual, so the result meets the same
    tolerance.  Should a correction gain less than :data:`REFINEMENT_MIN_GAIN` (or H̃ prove indefinite), CG with
    H finishes the solve.
    """
    krylov = _Krylov(spec, rhs, total is not None)
    inner = dataclasses.replace(
        spec, rtol=REFINEMENT_INNER_RTOL, atol=0.0, max_iter=min(spec.max_iter, REFINEMENT_INNER_MAX_ITER),
        on_failure="return", statistics=SolveStatistics(), full_reference=False,
    )
    no_total = None if total is None else torch.zeros_like(total)
    x = krylov.start(rhs, total, initial)
    residual = krylov.project(rhs - apply(x))
    residual_norm = krylov.norm(residual)
    threshold = krylov.threshold(spec, rhs, residual_norm)
    products = 1
    for _ in range(REFINEMENT_MAX_STEPS):
        active = residual_norm > threshold
        if not bool(active.any()):
            break
        before = residual_norm
        # A correction need only reach the threshold: one that is close already takes a looser inner tolerance.
        needed = float((threshold / residual_norm.clamp_min(1e-300))[active].min())
        inner_rtol = min(REFINEMENT_INNER_MAX_RTOL, max(REFINEMENT_INNER_RTOL, REFINEMENT_MARGIN * needed))
        try:
            correction = _conjugate_gradients(
                dataclasses.replace(inner, rtol=inner_rtol), approximate, residual * _per_row(active, residual, spec),
                no_total, None, krylov,
            )
        except ValueError:  # H̃ not positive definite here: H decides (and reports) below
            break
        x = x + correction
        residual = krylov.project(rhs - apply(x))
        residual_norm = krylov.norm(residual)
        products += 1
        if bool((active & (residual_norm > REFINEMENT_MIN_GAIN * before)).any()):
            break
    assert inner.statistics is not None
    cheap = sum(inner.statistics.iterations)
    if bool((residual_norm > threshold).any()):
        finish = dataclasses.replace(spec, statistics=SolveStatistics())
        x = _conjugate_gradients(finish, apply, rhs, total, x, krylov)
        assert finish.statistics is not None
        products += finish.statistics.iterations[0] + 1  # its first residual, then one product per iteration
    if spec.statistics is not None:
        spec.statistics.iterations.append(cheap + products - 1)
        spec.statistics.exact_products.append(products)
    return x
