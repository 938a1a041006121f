"""Charge equilibration (Qeq) with learned electronegativities and hardnesses.

Charges minimise, for each structure with total charge Q (Rappé & Goddard,
J. Phys. Chem. 95, 3358 (1991); with Gaussian charges and learned,
environment-dependent parameters as in the 4G-HDNNP, Ko et al., Nat. Commun.
12, 398 (2021))::

    E(q) = Σ_i χ_i q_i + ½ Σ_i (J_i + k_e √(2/π)/σ) q_i² + E_coul(q),   Σ_i q_i = Q,

with χ_i (eV/e) the electronegativity, J_i > 0 (eV/e²) the hardness and
E_coul the smeared Coulomb energy of the engine (:func:`latent_lr.coulomb_energy`,
pair kernel k_e erf(r/(√2σ))/r, no self-interaction).  The term k_e √(2/π)/σ is
the kernel at r = 0, i.e. the self-energy of each Gaussian charge; with it the
Coulomb part is the full electrostatic energy of the Gaussian charges, whose
matrix K (∂²E/∂q² of the Coulomb part) is positive definite, so
H = diag(J) + K is too and the minimiser is unique.  J is therefore the
hardness *beyond* the Gaussian self-energy (k_e √(2/π)/σ = 11.5 eV/e² at σ = 1 Å).

Stationarity, H q + χ + μ 1 = 0, gives the linear KKT system solved here:

* ``"dense"``: K is built from the engine (one call on replicas of each
  structure carrying unit charges, K's columns are ∂E_coul/∂q), then the
  (N+1)×(N+1) KKT system is solved with :func:`torch.linalg.solve`; cost
  O(N²) engine pairs and O(N³) algebra, fully differentiable.
* ``"cg"``: matrix-free conjugate gradients (:func:`latent_lr.electrostatics.linear_solve.solve_spd`),
  one engine energy-and-gradient per iteration (H v = J v + ∂E_coul/∂q at q = v),
  implicit derivatives; no N×N matrix.  Preconditioned by the k-space model of
  :mod:`.kspace_preconditioner` for periodic structures (iteration counts grow
  like log L instead of L) or by the diagonal; optionally warm-started.
* ``"auto"``: dense for structures with at most :data:`DENSE_MAX_ATOMS` atoms,
  CG for larger ones (mixed batches are split).

The reported energy is E(q*) (eV).  Because E is stationary at q* on the
constraint set, forces are −∂E/∂r at fixed q*.  In a uniform external field
E_ext (V/Å) the minimised functional also contains −Σ q_i r_i·E_ext, i.e.
χ_i → χ_i − r_i·E_ext; the charges respond to the field, the returned energy
excludes that term (the model adds −μ·E_ext itself).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..units import COULOMB_CONSTANT
from .block_preconditioner import near_field_preconditioner
from .coulomb import PME_MIN_ATOMS, coulomb_energy
from .coulomb_operator import coulomb_operator, mesh_parameters_of
from .kspace_preconditioner import kspace_preconditioner
from .linear_solve import Preconditioner, SolveStatistics, lazy_operator, solve_spd
from .mesh_parameters import MeshParameters
from .preconditioner_memory import kept_preconditioner
from .state import EngineState
from .validation import require_autograd

#: Accepted ``solver`` values.
SOLVERS = ("auto", "dense", "cg")

#: Accepted CG ``preconditioner`` values: k-space (:mod:`.kspace_preconditioner`, periodic structures;
#: Jacobi elsewhere), Jacobi (the diagonal) everywhere, or ``"blocks"``: near-field blocks
#: (:mod:`.block_preconditioner`) around the k-space model (periodic) or block Jacobi (elsewhere).
PRECONDITIONERS = ("kspace", "jacobi", "blocks")

#: ``"auto"`` solves structures with at most this many atoms densely, larger
#: ones by CG.  Measured crossover on 1 CPU thread (README): about 40 (open) and
#: 20 (periodic) atoms for a forward solve, 50 and 28 for a force-training step.
DENSE_MAX_ATOMS = 32

#: CG solves of float64 charges with a tolerance at least this loose (MD, inference; the eval tolerance
#: is accuracy/10) apply the PME mesh part of H and the k-space preconditioner in float32: each
#: product then carries a relative error of ~1e-7, far below the tolerance, and costs ~40 % less.
#: Training (rtol 1e-10) and tight solves stay in float64 throughout.
SINGLE_PRECISION_RTOL = 1e-6

#: Accuracy of the PME mesh of the cheap operator that carries most CG products of MD-tolerance solves
#: (:meth:`_Geometry.approximate`, iterative refinement in :func:`~.linear_solve.solve_spd`).
REFINEMENT_ACCURACY = 3e-2


def product_precision(dtype: torch.dtype, rtol: Optional[float]) -> Optional[torch.dtype]:
    """float32 for the mesh work of float64 solves at rtol ≥ :data:`SINGLE_PRECISION_RTOL`, else None (as is)."""
    return torch.float32 if dtype == torch.float64 and rtol is not None and rtol >= SINGLE_PRECISION_RTOL else None


def gaussian_self_hardness(smearing: torch.Tensor) -> torch.Tensor:
    """k_e √(2/π)/σ (eV/e²): the smeared kernel at r = 0 (Gaussian self-energy ×2/q²)."""
    return COULOMB_CONSTANT * math.sqrt(2.0 / math.pi) / smearing


class _Geometry:
    """The non-differentiable settings of an engine call on one batch, and the Qeq operator H.

    Calling it is the matvec of :func:`latent_lr.electrostatics.linear_solve.solve_spd`;
    :meth:`frozen` is its fast form at fixed geometry.
    """

    def __init__(
        self, pbc: torch.Tensor, batch: torch.Tensor, n_structures: int, accuracy: float,
        state: Optional[EngineState] = None,
    ):
        self.pbc = pbc
        self.batch = batch
        self.n_structures = n_structures
        self.accuracy = accuracy
        self.state = state
        self.product_precision: Optional[torch.dtype] = None

    def coulomb(
        self, positions: torch.Tensor, charges: torch.Tensor, cell: torch.Tensor, smearing: torch.Tensor,
        include_mesh: bool = True,
    ) -> torch.Tensor:
        """(B,) smeared Coulomb energy, eV, self-interaction excluded (PME mesh part left out unless ``include_mesh``)."""
        return coulomb_energy(
            positions, charges, cell=cell, pbc=self.pbc, batch=self.batch, smearing=smearing, accuracy=self.accuracy,
            state=self.state, include_mesh=include_mesh,
        )

    def __call__(
        self, v: torch.Tensor, positions: torch.Tensor, cell: torch.Tensor, smearing: torch.Tensor, hardness: torch.Tensor
    ) -> torch.Tensor:
        """H v = (J + k_e√(2/π)/σ) v + ∂E_coul/∂q|_{q=v}, (N,) eV/e; differentiable in all tensors."""
        build = torch.is_grad_enabled() and any(t.requires_grad for t in (v, positions, cell, smearing))
        with torch.enable_grad():
            charges = v if v.requires_grad else v.detach().requires_grad_()
            energy = self.coulomb(positions, charges, cell, smearing).sum()
            product = _charge_gradient(energy, charges, create_graph=build)
        return product + (hardness + gaussian_self_hardness(smearing)) * v

    def frozen(
        self, positions: torch.Tensor, cell: torch.Tensor, smearing: torch.Tensor, hardness: torch.Tensor,
        include_mesh: bool = True,
    ) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """v ↦ H v at fixed geometry, without gradients.

        The explicit operator of :mod:`.coulomb_operator` where it covers the
        batch (PME cells, open structures): a sparse pair product and one mesh
        FFT pair per product, no autograd.  Elsewhere (Ewald cells, slabs): one
        engine call, then one backward per product: E_coul is quadratic in q,
        so g = ∂E_coul/∂q at q₀ = 1 is K q₀ and the vector-Jacobian product of
        g with v is Kᵀv = K v; the graph of g is built once and reused by every
        CG iteration.  ``include_mesh=False`` (explicit operator only) leaves out its PME mesh part, for
        the joint product that sums it with the dipoles' density; returns None where that is not available.
        """
        diagonal = hardness + gaussian_self_hardness(smearing)
        explicit = coulomb_operator(
            positions, cell, self.pbc, self.batch, float(smearing.detach()), self.accuracy, self.state,
            self.product_precision, include_mesh,
        )
        if explicit is None and not include_mesh:
            return None
        if explicit is not None:
            return lambda v: diagonal * v + explicit(v)
        reference = torch.ones_like(hardness).requires_grad_()
        with torch.enable_grad():
            energy = self.coulomb(positions, reference, cell, smearing).sum()
            gradient = _charge_gradient(energy, reference, create_graph=True)

        def apply(v: torch.Tensor) -> torch.Tensor:
            if not gradient.requires_grad:  # no pairs at all (single atoms)
                return diagonal * v
            with torch.enable_grad():
                (product,) = torch.autograd.grad(gradient, reference, grad_outputs=v, retain_graph=True, allow_unused=True)
            return diagonal * v + (torch.zeros_like(v) if product is None else product)

        return apply

    def refinement_pays(self, cell: torch.Tensor, smearing: torch.Tensor) -> bool:
        """True when this solve runs at MD tolerance (``product_precision`` set), the batch has no slabs, every
        periodic cell is PME-summed (:data:`~.coulomb.PME_MIN_ATOMS` atoms or more), σ > 0, and some cell
        gets a smaller mesh or a lower spline order at :data:`REFINEMENT_ACCURACY` than at the solve's
        accuracy."""
        counts = torch.bincount(self.batch, minlength=self.n_structures)
        periodic = self.pbc.all(dim=1)
        slab = self.pbc.any(dim=1) & ~periodic
        if self.product_precision is None or not bool(periodic.any()) or bool(slab.any()):
            return False
        sigma = float(smearing.detach())
        if not sigma > 0 or bool((counts[periodic] < PME_MIN_ATOMS).any()):  # Ewald cells: plain CG
            return False
        exact = mesh_parameters_of(cell, periodic, counts, sigma, self.accuracy, self.state)
        cheap = mesh_parameters_of(cell, periodic, counts, sigma, REFINEMENT_ACCURACY, self.state)
        return any(_mesh_work(cheap[i]) < _mesh_work(exact[i]) for i in exact)

    def approximate(
        self, positions: torch.Tensor, cell: torch.Tensor, smearing: torch.Tensor, hardness: torch.Tensor
    ) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """v ↦ H̃ v: H with the PME meshes chosen for :data:`REFINEMENT_ACCURACY`, in single precision.

        The cheap operator of the iterative refinement of :func:`~.linear_solve.solve_spd` (most products use
        it; the exact H checks every correction, so the solution meets the same tolerance).  None unless this
        solve runs at MD tolerance (``product_precision`` set) and some PME cell gets a smaller mesh or a
        lower spline order than the exact operator's.  Built on its first product (a start that already
        meets the tolerance never needs it).
        """
        if not self.refinement_pays(cell, smearing):
            return None

        def build() -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
            explicit = coulomb_operator(
                positions, cell, self.pbc, self.batch, float(smearing.detach()), REFINEMENT_ACCURACY, self.state,
                torch.float32,
            )
            if explicit is None:
                return None
            diagonal = hardness + gaussian_self_hardness(smearing)
            return lambda v: diagonal * v + explicit(v)

        return lazy_operator(build)


def _mesh_work(parameters: MeshParameters) -> int:
    """Mesh points plus spline terms per atom of one PME choice: a rough cost of one mesh product."""
    return parameters.mesh[0] * parameters.mesh[1] * parameters.mesh[2] + parameters.order**3


def _charge_gradient(energy: torch.Tensor, charges: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """∂energy/∂charges, zero where no pair exists (e.g. a batch of single open-boundary atoms)."""
    if not energy.requires_grad:
        return torch.zeros_like(charges)
    (gradient,) = torch.autograd.grad(energy, charges, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(charges) if gradient is None else gradient


def coulomb_matrices(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    batch: torch.Tensor,
    smearing: torch.Tensor,
    accuracy: float = 1e-6,
) -> torch.Tensor:
    """Per-structure Coulomb matrices K (B, n_max, n_max), eV/e², zero-padded.

    K_ij = ∂²E_coul/∂q_i∂q_j from the engine (periodic images, Ewald self and
    background terms included) plus k_e√(2/π)/σ on the diagonal, so that
    ½ qᵀKq is the full energy of the Gaussian charges.  Built with one engine
    call on Σ_b n_b² atoms (replica i of structure b carries a unit charge on
    atom i); differentiable in positions, cell and σ.
    """
    n_structures = cell.shape[0]
    counts = torch.bincount(batch, minlength=n_structures)
    starts = torch.cumsum(counts, 0) - counts
    n_max = int(counts.max())
    owner = batch  # replica r (one per atom r) belongs to structure batch[r]
    replica_sizes = counts[owner]
    replica_of = torch.repeat_interleave(torch.arange(len(owner), device=batch.device), replica_sizes)
    offset = torch.arange(len(replica_of), device=batch.device) - (torch.cumsum(replica_sizes, 0) - replica_sizes)[replica_of]
    atom = starts[owner[replica_of]] + offset
    build = torch.is_grad_enabled() and any(t.requires_grad for t in (positions, cell, smearing))
    with torch.enable_grad():
        unit = (atom == replica_of).to(positions.dtype).requires_grad_()
        energy = coulomb_energy(
            positions[atom], unit, cell=cell[owner], pbc=pbc[owner], batch=replica_of,
            smearing=smearing, accuracy=accuracy,
        )
        columns = _charge_gradient(energy.sum(), unit, create_graph=build)
    local = torch.arange(len(batch), device=batch.device) - starts[batch]
    matrix = positions.new_zeros(n_structures, n_max, n_max)
    matrix = matrix.index_put((owner[replica_of], local[replica_of], offset), columns)
    diagonal = torch.arange(n_max, device=batch.device) < counts[:, None]
    return matrix + torch.diag_embed(diagonal.to(positions.dtype) * gaussian_self_hardness(smearing))


def _dense_charges(
    electronegativity: torch.Tensor,
    hardness: torch.Tensor,
    geometry: _Geometry,
    positions: torch.Tensor,
    cell: torch.Tensor,
    total_charge: torch.Tensor,
    smearing: torch.Tensor,
) -> torch.Tensor:
    """Solve the padded (n_max+1)² KKT systems of all structures at once; (N,) e."""
    batch, n_structures = geometry.batch, geometry.n_structures
    counts = torch.bincount(batch, minlength=n_structures)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(len(batch), device=batch.device) - starts[batch]
    n_max = int(counts.max())
    occupied = (torch.arange(n_max, device=batch.device) < counts[:, None]).to(positions.dtype)
    padded_hardness = positions.new_zeros(n_structures, n_max).index_put((batch, local), hardness)
    padded_hardness = padded_hardness + (1.0 - occupied)  # unit diagonal on padding rows
    matrix = coulomb_matrices(positions, cell, geometry.pbc, batch, smearing, geometry.accuracy)
    matrix = matrix + torch.diag_embed(padded_hardness)
    top = torch.cat([matrix, occupied[:, :, None]], 2)
    bottom = torch.cat([occupied, occupied.new_zeros(n_structures, 1)], 1)[:, None, :]
    kkt = torch.cat([top, bottom], 1)  # [[H, 1], [1ᵀ, 0]]
    rhs = positions.new_zeros(n_structures, n_max).index_put((batch, local), -electronegativity)
    rhs = torch.cat([rhs, total_charge[:, None]], 1)
    solution = torch.linalg.solve(kkt, rhs)
    return solution[batch, local]


def _cg_charges(
    electronegativity: torch.Tensor, hardness: torch.Tensor, geometry: _Geometry, positions: torch.Tensor,
    cell: torch.Tensor, total_charge: torch.Tensor, smearing: torch.Tensor, rtol: Optional[float], max_iter: int,
    initial: Optional[torch.Tensor] = None, statistics: Optional[SolveStatistics] = None,
    preconditioner: str = "blocks",
) -> torch.Tensor:
    """Matrix-free constrained CG with implicit derivatives; (N,) e."""
    diagonal = (hardness + gaussian_self_hardness(smearing)).detach()
    geometry.product_precision = product_precision(positions.dtype, rtol)

    def build() -> Optional[Preconditioner]:
        inverse = None
        if preconditioner in ("kspace", "blocks") and bool(geometry.pbc.all(dim=1).any()):
            inverse = kspace_preconditioner(
                positions, cell, geometry.pbc, geometry.batch, diagonal, smearing, precision=geometry.product_precision
            )
        if preconditioner == "blocks":
            inverse = near_field_preconditioner(
                positions, cell, geometry.pbc, geometry.batch, diagonal, float(smearing.detach()), inverse
            ) or inverse
        return inverse

    inverse = kept_preconditioner(
        f"qeq/{preconditioner}/{geometry.product_precision}", geometry.state, positions, cell, geometry.pbc,
        geometry.batch, diagonal, smearing, build,
    )
    return solve_spd(
        geometry, -electronegativity, (positions, cell, smearing, hardness),
        batch=geometry.batch, total=total_charge, diagonal=diagonal, rtol=rtol, max_iter=max_iter,
        initial=initial, statistics=statistics, preconditioner=inverse,
    )


def _subset(mask: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Atoms and structures of the structures in ``mask``: (atom index, structure index, new batch)."""
    structures = torch.nonzero(mask).flatten()
    renumber = torch.full_like(mask, -1, dtype=torch.long)
    renumber[structures] = torch.arange(len(structures), device=mask.device)
    atoms = torch.nonzero(mask[batch]).flatten()
    return atoms, structures, renumber[batch[atoms]]


def _pick(values: torch.Tensor, structures: torch.Tensor | None) -> torch.Tensor:
    """Rows of the per-structure ``values`` for ``structures`` (all rows when None)."""
    return values if structures is None else values[structures]


def equilibrate_charges(
    electronegativity: torch.Tensor,
    hardness: torch.Tensor,
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    batch: torch.Tensor,
    total_charge: torch.Tensor,
    smearing: torch.Tensor,
    *,
    accuracy: float = 1e-6,
    solver: str = "auto",
    rtol: Optional[float] = None,
    max_iter: int = 1000,
    state: Optional[EngineState] = None,
    initial: Optional[torch.Tensor] = None,
    statistics: Optional[SolveStatistics] = None,
    preconditioner: str = "blocks",
) -> torch.Tensor:
    """Qeq charges q* = argmin E(q) subject to Σ_{i∈b} q_i = Q_b, (N,) e.

    Args:
        electronegativity: χ (N,) eV/e (include any field shift −r_i·E_ext).
        hardness: J (N,) eV/e², > 0 (beyond the Gaussian self-energy).
        positions: (N, 3) Å; cell: (B, 3, 3) Å; pbc: (B, 3); batch: (N,) sorted.
        total_charge: Q (B,) e.
        smearing: σ (scalar tensor), Å; must be > 0.
        accuracy: Ewald accuracy of the engine.
        solver: ``"dense"``, ``"cg"`` or ``"auto"`` (dense up to
            :data:`DENSE_MAX_ATOMS` atoms per structure; slabs always CG).
        rtol, max_iter: CG tolerance and iteration cap (see
            :func:`latent_lr.electrostatics.linear_solve.solve_spd`; CG raises
            :class:`~latent_lr.electrostatics.linear_solve.ConvergenceError` if not converged).
        state: the run's :class:`~.state.EngineState` for the engine calls (None: no mutable state).
        initial: (N,) e, starting charges of the CG solves (a warm start, e.g. the
            previous MD step's charges; any values are safe), None: cold start.
            The dense solver ignores it.
        statistics: records the CG iteration counts (:class:`~.linear_solve.SolveStatistics`).
        preconditioner: CG preconditioner, one of :data:`PRECONDITIONERS` (``"kspace"``:
            iteration counts that do not grow with the box for periodic structures; ``"blocks"``,
            the default: that plus exact near-field blocks, about 1.5× fewer iterations).

    Differentiable (first and second derivatives) in χ, J, positions, cell, σ
    and Q.
    """
    if solver not in SOLVERS:
        raise ValueError(f"Qeq solver must be one of {SOLVERS}, got {solver!r}.")
    require_autograd("charge equilibration (Qeq)")
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"Qeq preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}.")
    if not bool((hardness > 0).all()):
        raise ValueError("Qeq hardness J must be > 0 eV/e² for every atom (the energy must be convex).")
    smearing = torch.as_tensor(smearing, dtype=positions.dtype, device=positions.device)
    if not float(smearing.detach()) > 0:
        raise ValueError(f"Qeq needs Gaussian charges: smearing must be > 0 Å, got {float(smearing)}.")
    n_structures = cell.shape[0]
    counts = torch.bincount(batch, minlength=n_structures)
    if solver == "dense":
        dense = torch.ones(n_structures, dtype=torch.bool, device=batch.device)
    elif solver == "cg":
        dense = torch.zeros(n_structures, dtype=torch.bool, device=batch.device)
    else:
        # Slabs go to CG: the dense path batches one replica per atom, and the
        # engine's slab-cell check (electrostatics/slab.py) currently fails on
        # batches of more than two slabs.
        slab = pbc[:, :2].all(dim=1) & ~pbc[:, 2]
        dense = (counts <= DENSE_MAX_ATOMS) & ~slab
    parts, order = [], []
    for use_dense in (True, False):
        mask = dense if use_dense else ~dense
        if not bool(mask.any()):
            continue
        if bool(mask.all()):
            atoms, structures, sub_batch = torch.arange(len(batch), device=batch.device), None, batch
        else:
            atoms, structures, sub_batch = _subset(mask, batch)
        geometry = _Geometry(_pick(pbc, structures), sub_batch, int(mask.sum()), accuracy, state)
        picked = (_pick(cell, structures), _pick(total_charge, structures))
        args = (electronegativity[atoms], hardness[atoms], geometry, positions[atoms], *picked, smearing)
        if use_dense:
            charges = _dense_charges(*args)
        else:
            start = None if initial is None else initial[atoms]
            charges = _cg_charges(*args, rtol, max_iter, start, statistics, preconditioner)
        parts.append(charges)
        order.append(atoms)
    if len(parts) == 1:
        return parts[0]
    inverse = torch.argsort(torch.cat(order))
    return torch.cat(parts)[inverse]


def qeq_energy(
    charges: torch.Tensor,
    electronegativity: torch.Tensor,
    hardness: torch.Tensor,
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    batch: torch.Tensor,
    smearing: torch.Tensor,
    accuracy: float = 1e-6,
    state: Optional[EngineState] = None,
) -> torch.Tensor:
    """E(q) = Σ χ q + ½ Σ (J + k_e√(2/π)/σ) q² + E_coul(q) per structure, (B,) eV."""
    smearing = torch.as_tensor(smearing, dtype=positions.dtype, device=positions.device)
    n_structures = cell.shape[0]
    local = electronegativity * charges + 0.5 * (hardness + gaussian_self_hardness(smearing)) * charges**2
    geometry = _Geometry(pbc, batch, n_structures, accuracy, state)
    return positions.new_zeros(n_structures).index_add(0, batch, local) + geometry.coulomb(positions, charges, cell, smearing)
