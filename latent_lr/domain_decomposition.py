"""A wrapped model evaluated on one subdomain of a domain-decomposed periodic box.

Each MPI rank owns its *local* atoms and sees *ghost* atoms (periodic images
and other ranks' atoms) out to :meth:`DecomposedModel.ghost_cutoff` beyond its
subdomain, as LAMMPS provides them.  The rank evaluates, for its local atoms
only: host per-atom energies and features (exact, since ghosts reach the
host's receptive field; along directions the subdomain spans whole, the host
sees the box as periodic with one copy of each atom instead of ghost images,
:attr:`Subdomain.spans`), latent charges, the real-space sum over pairs
(local, local-or-ghost; one vesin cell-list search per step), and its part of
the k-space sum.  The k-space sum is the engine's, with the engine's
parameters for the whole box and the engine's choice of method
(:data:`~.electrostatics.coulomb.PME_MIN_ATOMS`):

* **PME** (from 300 atoms): each rank spreads its own charges on the global
  mesh (:func:`.electrostatics.mesh.spread_charges`), the mesh is summed over
  the ranks, every rank solves it (one FFT pair, redundant) and interpolates
  the mesh potential at its own atoms (:func:`.electrostatics.mesh.interpolate_mesh`):
  φ_i and the k-space forces.  Ghosts need only reach the PME real-space
  cut-off (0 where α sits at the smearing cap, as for σ = 1 Å at accuracy 1e-6),
  so the host's receptive field sets the ghost shell.
* **Ewald** (below): the structure factor S(k) is summed over the ranks
  instead of the mesh (ghosts to the longer Ewald real-space cut-off).

Global quantities are sums over ranks, done by an ``allreduce`` callable
(MPI's ``Allreduce`` with ``SUM``; the identity on one process), four per step,
each one packed array:

====  ==========================================  ========================  ==================================
call  contents                                    size                      why
====  ==========================================  ========================  ==================================
1     Σ q̃, Σ w, local atoms, ranks                 4 numbers                 total-charge redistribution
2     charges by atom ID; PME mesh or S(k);       N + K1 K2 K3 (or 2 K)     ghost charges (real space);
      Σ q², Σ q                                   + 2                       k-space energy and φ; self term
3     Σ φ w (or Σ φ)                              1 number                  ∂E/∂(charge sums) (skipped for
                                                                            charge_redistribution="none")
4     gradients by atom ID, virial share, energy  3 N + 9 + 1               ghost forces to their owners;
                                                                            the box's virial and energy
====  ==========================================  ========================  ==================================

No rank holds other ranks' positions.  The charge-transfer force
−Σ_i φ_i ∂q_i/∂r_k (φ_i = ∂E/∂q_i, charges depend on positions) is included:
every rank back-propagates φ_i of its local atoms through their charges (and
the redistribution's global sums) into local and ghost positions; ghost
gradients are summed into their owners by atom ID.  With the same parameters
as the single-process engine, the result equals the wrapped model to
round-off (Ewald, and PME with the same mesh; the decomposition keeps its
mesh along a trajectory like the engine's :class:`~.electrostatics.EngineState`).

Supported: fully periodic boxes, the latent charge head
(:class:`~latent_lr.charges.ChargeHead`, any redistribution), backbones with
:meth:`~latent_lr.backbone.Backbone.per_atom_energies` (built-in radial, MACE, NequIP, CHGNet, CACE), no
polarisabilities, no external field, no spin channel (each refused with a one-line error).
The virial comes from a homogeneous strain of all positions (ghost images
included) and of the cell, summed over the ranks' shares.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch
import vesin

from .charges import ChargeHead, LearnedChargeRedistribution, NoChargeConstraint, TotalChargeConstraint
from .data import AtomsBatch
from .electrostatics.coulomb import PME_MIN_ATOMS
from .electrostatics.kernels import switched_real_space_kernel
from .electrostatics.mesh import (
    bspline_weights,
    influence_function,
    interpolate_mesh,
    solve_mesh,
    spread_charges,
    structure_spline_points,
)
from .electrostatics.mesh_parameters import MeshParameters, mesh_parameters
from .electrostatics.parameters import EwaldParameters
from .electrostatics.reciprocal import k_space_weights
from .electrostatics.setup_cache import EwaldSetup, ewald_setup
from .electrostatics.state import EngineState
from .errors import UserInputError
from .model import LongRangeModel
from .units import COULOMB_CONSTANT

#: Sum of an array over all ranks (same shape back); the identity on one process.
Allreduce = Callable[[np.ndarray], np.ndarray]

#: k-space methods of the decomposition ("auto": the engine's rule, PME from PME_MIN_ATOMS atoms).
METHODS = ("auto", "ewald", "pme")


@dataclass
class Subdomain:
    """One rank's atoms: local atoms first, then ghosts.

    Attributes:
        positions: (M, 3) Å, local then ghost atoms (ghosts at their image positions).
        numbers: (M,) atomic numbers.
        tags: (M,) global atom IDs in 1..n_atoms (a ghost carries its owner's ID).
        n_local: number of local atoms (the first rows).
        cell: (3, 3) lattice vectors as rows, Å, of the whole periodic box.
        n_atoms: atoms in the whole box.
        total_charge: net charge of the whole box, e.
        spans: (3,) whether the subdomain is the whole periodic box along each lattice
            vector (LAMMPS's processor grid is 1 there); the host then sees that
            direction as periodic, one copy of each atom, instead of ghost images.
    """

    positions: torch.Tensor
    numbers: torch.Tensor
    tags: torch.Tensor
    n_local: int
    cell: torch.Tensor
    n_atoms: int
    total_charge: float
    spans: tuple[bool, bool, bool] = (False, False, False)


@dataclass
class _PairsOfLocalAtoms:
    """Pairs (a, b) within the real-space cut-off with ``a`` local, each pair once over all ranks
    (``weight`` 1 for local-local pairs, ½ for local-ghost pairs, whose other half the ghost's owner has)."""

    first: torch.Tensor
    second: torch.Tensor
    weight: torch.Tensor
    both_local: torch.Tensor


class DecomposedModel:
    """Energy and local-atom forces of a wrapped model from one subdomain (see the module docstring).

    Args:
        model: a model from :func:`latent_lr.wrap` or :func:`latent_lr.load`.
        allreduce: sum over ranks of a float64 numpy array.
        charge_transfer_forces: include −Σ φ_i ∂q_i/∂r (always True in use;
            False exists to show that tests detect the term).
        method: k-space sum, one of :data:`METHODS`.
        external_field: the run's uniform field (3,), V/Å, or None; only None or zero is supported.

    Raises:
        UserInputError: a model this decomposition does not support.
    """

    def __init__(
        self,
        model: LongRangeModel,
        allreduce: Allreduce,
        charge_transfer_forces: bool = True,
        method: str = "auto",
        external_field: Optional[np.ndarray] = None,
    ):
        long_range = model.long_range
        if external_field is not None and np.any(np.asarray(external_field) != 0.0):
            raise UserInputError(
                "an external field is not supported on several MPI ranks; run on one rank or drop external_field."
            )
        if long_range is None or not isinstance(long_range.charge_head, ChargeHead):
            raise UserInputError("several MPI ranks need a model with latent charges (charge_model='latent').")
        if long_range.config.spin_channel:
            raise UserInputError("several MPI ranks do not support the spin channel (spin_channel) yet; run on one rank.")
        if long_range.config.charge_redistribution == "fragments":
            raise UserInputError(
                "several MPI ranks do not support charge_redistribution='fragments' (fragments span subdomains); "
                "train with charge_redistribution='learned' or run on one rank."
            )
        if long_range.polarizability_head is not None:
            raise UserInputError(
                "several MPI ranks do not support latent polarisabilities (polarizability != 'none'); run on one rank."
            )
        if model.backbone.receptive_field is None:
            raise UserInputError(
                f"the {model.backbone.label or model.backbone.name} adapter does not state its receptive field; "
                "several MPI ranks need it (run on one rank)."
            )
        if method not in METHODS:
            raise UserInputError(f"method must be one of {METHODS}, got {method!r}.")
        self.model = model.eval()
        self.head: ChargeHead = long_range.charge_head
        self.method = method
        #: Å, how far ghosts reach (LAMMPS's ``comm_modify cutoff``, set by :func:`latent_lr.lammps.attach`); None: not checked.
        self.ghost_reach: Optional[float] = None
        self.allreduce = allreduce
        self.charge_transfer_forces = charge_transfer_forces
        self.accuracy = float(long_range.accuracy)
        #: Keeps the PME mesh along a trajectory and the influence function at fixed cell, as on one rank.
        self.engine_state = EngineState()
        #: Wall time spent in ``allreduce`` so far, s (communication plus waiting for slower ranks).
        self.communication_seconds = 0.0

    @property
    def smearing(self) -> float:
        """σ, Å: the model's at call time (it is learnable: ``learnable_smearing``)."""
        assert self.model.long_range is not None
        return float(self.model.long_range.smearing)

    @property
    def charge_sign(self) -> torch.Tensor:
        """The model's charge sign s = ±1 at call time (the sign convention may flip it)."""
        assert self.model.long_range is not None
        return self.model.long_range.charge_sign

    def _sum(self, values: np.ndarray) -> np.ndarray:
        """``allreduce(values)``, timed into :attr:`communication_seconds`."""
        start = time.perf_counter()
        summed = self.allreduce(np.ascontiguousarray(values, dtype=np.float64))
        self.communication_seconds += time.perf_counter() - start
        return summed

    def uses_pme(self, n_atoms: int) -> bool:
        """Whether the k-space sum of a box of ``n_atoms`` is PME (else Ewald)."""
        return self.method == "pme" or (self.method == "auto" and n_atoms >= PME_MIN_ATOMS)

    def ghost_cutoff(self, cell: np.ndarray, n_atoms: int) -> float:
        """Å: ghosts must reach the host's receptive field and the real-space cut-off (PME's or Ewald's)."""
        if self.uses_pme(n_atoms):
            volume = abs(float(np.linalg.det(cell)))
            lengths = tuple(float(x) for x in np.linalg.norm(cell, axis=1))
            r_cut = mesh_parameters(n_atoms, lengths, volume, self.accuracy, self.smearing).r_cut  # type: ignore[arg-type]
        else:
            r_cut = ewald_setup(cell, n_atoms, self.accuracy, self.smearing).parameters.r_cut
        return max(float(self.model.backbone.receptive_field or 0.0), r_cut)

    def _parameters(self, sub: Subdomain) -> Union[MeshParameters, EwaldSetup]:
        cell = sub.cell.detach().cpu().double().numpy()
        if not self.uses_pme(sub.n_atoms):
            return ewald_setup(cell, sub.n_atoms, self.accuracy, self.smearing)
        lengths = tuple(float(x) for x in np.linalg.norm(cell, axis=1))
        volume = abs(float(np.linalg.det(cell)))
        return self.engine_state.mesh_parameters(sub.n_atoms, lengths, volume, self.accuracy, self.smearing)  # type: ignore[arg-type]

    def __call__(self, sub: Subdomain) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Total energy of the box (eV, the same on every rank), forces (n_local, 3) eV/Å and
        latent charges (n_local,) e of the local atoms, and the box's virial (3, 3)
        W = -sym(∂E/∂ε) = -V σ, eV (the same on every rank)."""
        with torch.enable_grad():
            return self._evaluate(sub)

    def _evaluate(self, sub: Subdomain) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
        model, n_local = self.model, sub.n_local
        setup = self._parameters(sub)
        parameters: Union[MeshParameters, EwaldParameters] = (
            setup if isinstance(setup, MeshParameters) else setup.parameters
        )
        receptive_field = float(model.backbone.receptive_field or 0.0)
        needed = max(receptive_field, parameters.r_cut)
        if self.ghost_reach is not None and needed > self.ghost_reach:
            raise UserInputError(
                f"the box grew: the model needs ghosts out to {needed:.3f} Å but LAMMPS's ghost cut-off is "
                f"{self.ghost_reach:.3f} Å (set by attach); call latent_lr.lammps.attach again after large volume changes."
            )
        positions = sub.positions.detach().clone().requires_grad_(True)
        # A homogeneous strain ε of all positions (ghost images included) and of the cell gives the virial.
        strain = positions.new_zeros(3, 3, requires_grad=True)
        deformation = torch.eye(3, dtype=positions.dtype, device=positions.device) + strain
        strained, strained_cell = positions @ deformation, sub.cell.to(positions) @ deformation
        host_atoms, pairs = _neighbours(positions.detach(), n_local, receptive_field, parameters.r_cut)
        # The host sees the local atoms and the ghosts within its receptive field of them, periodic
        # (one copy of each atom) along the directions the subdomain spans whole.
        spans = torch.tensor(sub.spans, dtype=torch.bool, device=positions.device)
        if bool(spans.any()):
            host_atoms = _one_copy_along(spans, host_atoms, positions.detach(), sub.tags, sub.cell.to(positions))
        cluster = AtomsBatch(
            positions=strained[host_atoms], numbers=sub.numbers[host_atoms],
            cell=strained_cell[None] if bool(spans.any()) else positions.new_zeros(1, 3, 3),
            pbc=spans[None],
            batch=torch.zeros(len(host_atoms), dtype=torch.long, device=positions.device),
            total_charge=positions.new_zeros(1), external_field=positions.new_zeros(1, 3),
        )
        atomic, features = model.backbone.per_atom_energies(cluster)
        atomic = atomic[:n_local] + model.reference_energy.to(atomic)[sub.numbers[:n_local]]
        features = features[:n_local].to(positions.dtype)
        charges, chain, ranks = self._charges(features, sub)
        own = charges.detach()

        k_space: _KSpace = (
            _MeshKSpace(setup, sub.cell.to(positions), self.engine_state)
            if isinstance(setup, MeshParameters)
            else _EwaldKSpace(setup, sub.cell.to(positions))
        )
        local_tags = sub.tags[:n_local]
        by_tag = np.zeros(sub.n_atoms + 1)
        by_tag[local_tags.cpu().numpy()] = own.cpu().numpy()
        k_part = k_space.local_part(positions.detach()[:n_local], own)
        sums = [float((own**2).sum()), float(own.sum())]
        summed = self._sum(np.concatenate([by_tag, k_part, sums]))
        cluster_charges = torch.from_numpy(summed[: sub.n_atoms + 1]).to(positions)[sub.tags]
        squares, net = (float(x) for x in summed[-2:])

        real_energy, real_potential, real_surrogate = self._real_space(strained, cluster_charges, pairs, n_local, parameters)
        k_energy, k_potential, k_surrogate = k_space.solve(
            summed[sub.n_atoms + 1 : -2], positions[:n_local], own, strained_cell, ranks
        )
        alpha = parameters.alpha
        variance = 1.0 / (2.0 * alpha**2) - self.smearing**2
        volume = abs(float(torch.linalg.det(sub.cell)))
        constant_energy = -alpha / math.sqrt(math.pi) * squares - math.pi * net**2 * variance / volume
        # φ_i = ∂E/∂q_i of the local atoms, eV/e.
        potential = COULOMB_CONSTANT * (
            real_potential + k_potential - 2.0 * alpha / math.sqrt(math.pi) * own - 2.0 * math.pi * net * variance / volume
        )
        # The background's dependence on the volume, counted once over the ranks.
        background = -math.pi * net**2 * variance / torch.linalg.det(strained_cell).abs() / ranks
        surrogate = atomic.sum() + COULOMB_CONSTANT * (real_surrogate + k_surrogate + background)
        if self.charge_transfer_forces:
            surrogate = surrogate + (potential * charges).sum() + chain(potential)
        local_energy = float(atomic.detach().sum()) + COULOMB_CONSTANT * real_energy

        gradient, strain_gradient = torch.autograd.grad(surrogate, (positions, strain))
        gradient_by_tag = np.zeros((sub.n_atoms + 1, 3))
        np.add.at(gradient_by_tag, sub.tags.cpu().numpy(), gradient.detach().cpu().numpy())
        share = -0.5 * (strain_gradient + strain_gradient.T).detach().cpu().numpy()
        summed = self._sum(np.concatenate([gradient_by_tag.ravel(), share.ravel(), [local_energy]]))
        forces = -torch.from_numpy(summed[: 3 * (sub.n_atoms + 1)].reshape(-1, 3)).to(positions)[local_tags]
        virial = torch.from_numpy(summed[3 * (sub.n_atoms + 1) : -1].reshape(3, 3)).to(positions)
        energy = float(summed[-1]) + COULOMB_CONSTANT * (k_energy + constant_energy)
        return energy, forces, own, virial

    def _charges(
        self, features: torch.Tensor, sub: Subdomain
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], float]:
        """Local latent charges (n_local,) e, the chain term of the redistribution's global sums,
        and the number of ranks.

        The charges use the global sums as constants; ``chain(φ)`` (φ detached) returns the
        scalar whose gradient adds Σ_i φ_i ∂q_i/∂(sums) · ∂(sums)/∂r (all ranks' φ).
        """
        head, numbers = self.head, sub.numbers[: sub.n_local]
        raw = head.raw_charges(features, numbers, self.charge_sign)
        constraint, total = head.constraint, sub.total_charge
        learned = isinstance(constraint, LearnedChargeRedistribution)
        weights = raw.new_ones(len(raw))
        if isinstance(constraint, LearnedChargeRedistribution):
            weights = constraint.weights(features)
        raw_sum, weight_sum, _, ranks = self._sum(
            np.array([float(raw.detach().sum()), float(weights.detach().sum()), float(sub.n_local), 1.0])
        )
        if isinstance(constraint, NoChargeConstraint):
            return raw, lambda potential: raw.new_zeros(()), ranks
        if not (learned or isinstance(constraint, TotalChargeConstraint)):
            raise UserInputError(f"several MPI ranks do not support the charge constraint {type(constraint).__name__}; "
                                 "use charge_redistribution='learned' (or 'uniform', 'none') or run on one rank.")
        # Uniform shift: weights 1 (their sum, the atom count, does not depend on positions).
        share = (total - raw_sum) / weight_sum

        def redistribution_chain(potential: torch.Tensor) -> torch.Tensor:
            weighted = float(self._sum(np.array([float((potential.detach() * weights.detach()).sum())]))[0])
            # ∂E/∂(Σ q̃) = -Σ φ w / Σ w;  ∂E/∂(Σ w) = -Σ φ w (Q - Σ q̃) / (Σ w)².
            return -weighted / weight_sum * raw.sum() - weighted * share / weight_sum * weights.sum()

        return raw + weights * share, redistribution_chain, ranks

    def _real_space(
        self,
        positions: torch.Tensor,
        charges: torch.Tensor,
        pairs: _PairsOfLocalAtoms,
        n_local: int,
        parameters: Union[MeshParameters, EwaldParameters],
    ) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Real-space part over the pairs of local atoms, / k_e.

        Returns this rank's energy share ½ Σ_i q_i φ_i, the local potentials
        φ_i = Σ_j q_j ψ(r_ij) (n_local,) and the same share as a function of the
        (strained) positions of both atoms of each pair, charges fixed: its
        gradients, summed over ranks by atom ID, are the real-space forces and virial.
        """
        potential = positions.new_zeros(n_local)
        if parameters.r_cut == 0.0 or pairs.first.numel() == 0:
            return 0.0, potential, positions.new_zeros(())
        alpha_smear = None if self.smearing == 0.0 else positions.new_tensor(1.0 / (math.sqrt(2.0) * self.smearing))
        first, second = pairs.first, pairs.second
        distance = (positions[first] - positions[second]).norm(dim=1)
        kernel = switched_real_space_kernel(
            distance, positions.new_full(distance.shape, parameters.alpha), alpha_smear,
            positions.new_full(distance.shape, parameters.r_switch), positions.new_full(distance.shape, parameters.r_cut),
        )
        surrogate = (pairs.weight * charges[first] * charges[second] * kernel).sum()
        fixed = kernel.detach()
        potential = potential.index_add(0, first, charges[second] * fixed)
        potential = potential.index_add(0, second[pairs.both_local], (charges[first] * fixed)[pairs.both_local])
        return float(0.5 * (charges[:n_local] * potential).sum()), potential, surrogate


class _KSpace:
    """One step's k-space sum over the ranks: ``local_part`` (summed by the caller), then ``solve``."""

    def local_part(self, positions: torch.Tensor, charges: torch.Tensor) -> np.ndarray:
        """This rank's share of the summed quantity (mesh or structure factor), from its local atoms."""
        raise NotImplementedError

    def solve(
        self, summed: np.ndarray, positions: torch.Tensor, charges: torch.Tensor, strained_cell: torch.Tensor, ranks: float
    ) -> tuple[float, torch.Tensor, torch.Tensor]:
        """From the sum over ranks of :meth:`local_part`: the k-space energy of the box / k_e, the
        potentials of the local atoms (n_local,) / k_e, and a scalar whose gradients are the k-space
        forces on the local atoms (unstrained ``positions``, charges fixed) and this rank's share
        (1/ranks) of the k-space virial (``strained_cell``)."""
        raise NotImplementedError


class _MeshKSpace(_KSpace):
    """Smooth particle-mesh Ewald with the engine's mesh code: spread, sum over ranks, solve, interpolate."""

    def __init__(self, parameters: MeshParameters, cell: torch.Tensor, state: EngineState):
        self.parameters, self.cell, self.state = parameters, cell, state
        self.shape = parameters.mesh
        self.size = self.shape[0] * self.shape[1] * self.shape[2]

    def _stencil(self, positions: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat, t = structure_spline_points(positions, cell, self.shape, self.parameters.order)
        return flat, bspline_weights(t, self.parameters.order)

    def local_part(self, positions: torch.Tensor, charges: torch.Tensor) -> np.ndarray:
        flat, weights = self._stencil(positions, self.cell)
        return spread_charges(charges, flat, weights, self.size).cpu().numpy()

    def solve(
        self, summed: np.ndarray, positions: torch.Tensor, charges: torch.Tensor, strained_cell: torch.Tensor, ranks: float
    ) -> tuple[float, torch.Tensor, torch.Tensor]:
        p, cell = self.parameters, self.cell
        alpha = cell.new_tensor([p.alpha])
        grid = torch.from_numpy(summed).to(cell).reshape(1, *self.shape)
        energy, mesh, power = solve_mesh(
            grid, cell[None], alpha, p.order, self.state.influence, self.state.influence_cache_size
        )
        potential = interpolate_mesh(mesh.reshape(-1), *self._stencil(positions, cell))
        # Fractional coordinates do not change under the strain: only the influence function does.
        strained_theta = influence_function(strained_cell[None], alpha, self.shape, p.order)
        surrogate = (charges * potential).sum() + (strained_theta * power).sum() / ranks
        return float(energy[0]), potential.detach(), surrogate


class _EwaldKSpace(_KSpace):
    """The Ewald sum with the structure factor S(k) summed over the ranks."""

    def __init__(self, setup: EwaldSetup, cell: torch.Tensor):
        p = setup.parameters
        self.integer_k = torch.from_numpy(np.array(setup.k_indices, dtype=float)).to(cell)[None]
        self.valid = torch.ones(self.integer_k.shape[:2], dtype=torch.bool, device=cell.device)
        self.cutoffs = tuple(cell.new_tensor([value]) for value in (p.alpha, p.k_switch, p.k_cut))
        self.k_vectors, weight = k_space_weights(cell[None], self.integer_k, self.valid, *self.cutoffs)
        self.k_vectors, self.weight = self.k_vectors[0], weight[0]
        self.volume = abs(float(torch.linalg.det(cell)))

    def local_part(self, positions: torch.Tensor, charges: torch.Tensor) -> np.ndarray:
        phase = positions @ self.k_vectors.T
        return torch.cat([charges @ torch.cos(phase), charges @ torch.sin(phase)]).cpu().numpy()

    def solve(
        self, summed: np.ndarray, positions: torch.Tensor, charges: torch.Tensor, strained_cell: torch.Tensor, ranks: float
    ) -> tuple[float, torch.Tensor, torch.Tensor]:
        if len(self.weight) == 0:
            return 0.0, positions.new_zeros(len(positions)), positions.new_zeros(())
        total = torch.from_numpy(summed).to(positions)
        cos_sum, sin_sum = total[: len(self.weight)], total[len(self.weight) :]
        prefactor = 2.0 * math.pi / self.volume
        energy = prefactor * float((self.weight * (cos_sum**2 + sin_sum**2)).sum())
        phase = positions @ self.k_vectors.T
        field_sum = 2.0 * prefactor * (torch.cos(phase) * (self.weight * cos_sum) + torch.sin(phase) * (self.weight * sin_sum)).sum(dim=1)
        _, strained_weight = k_space_weights(strained_cell[None], self.integer_k, self.valid, *self.cutoffs)
        volume_share = (strained_weight[0] * (cos_sum**2 + sin_sum**2)).sum() / ranks
        surrogate = (charges * field_sum).sum() + 2.0 * math.pi / torch.linalg.det(strained_cell).abs() * volume_share
        return energy, field_sum.detach(), surrogate


def _neighbours(
    positions: torch.Tensor, n_local: int, receptive_field: float, r_cut: float
) -> tuple[torch.Tensor, _PairsOfLocalAtoms]:
    """One cell-list search (vesin) over local and ghost atoms (M, 3) Å, out to the larger cut-off.

    Returns the atoms the host needs (local atoms, then the ghosts within ``receptive_field``
    of a local atom, ascending) and the real-space pairs of local atoms within ``r_cut``.
    """
    device = positions.device
    reach = max(receptive_field, r_cut)
    search = vesin.NeighborList(cutoff=reach, full_list=False)
    i, j, d = search.compute(positions.cpu().double().numpy(), np.zeros((3, 3)), False, quantities="ijd")
    # Local atoms come first, so the smaller index of a pair is local whenever either is.
    first, second = np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)
    keep = first < n_local
    first, second, d = first[keep], second[keep], d[keep]
    near_ghosts = second[(d < receptive_field) & (second >= n_local)]
    host_atoms = np.union1d(np.arange(n_local), near_ghosts)
    real = d < r_cut
    first, second = first[real], second[real]
    both_local = second < n_local
    pairs = _PairsOfLocalAtoms(
        first=torch.from_numpy(first).to(device),
        second=torch.from_numpy(second).to(device),
        weight=torch.from_numpy(np.where(both_local, 1.0, 0.5)).to(device=device, dtype=positions.dtype),
        both_local=torch.from_numpy(both_local).to(device),
    )
    return torch.from_numpy(host_atoms).to(device), pairs


def _one_copy_along(
    spans: torch.Tensor, atoms: torch.Tensor, positions: torch.Tensor, tags: torch.Tensor, cell: torch.Tensor
) -> torch.Tensor:
    """The rows of ``atoms`` (ascending, local atoms first) left when copies of one atom that differ by
    lattice vectors along the ``spans`` directions only are reduced to the first one.

    Copies of one atom differ by integer fractional shifts, so (tag, ⌊fractional coordinate⌋ along
    the other directions) names one copy up to shifts along ``spans``.
    """
    fractional = positions[atoms] @ torch.linalg.inv(cell)
    image = torch.floor(fractional).long() * (~spans).long()
    keys = torch.cat([tags[atoms, None], image], dim=1).cpu().numpy()
    _, first = np.unique(keys, axis=0, return_index=True)
    return atoms[torch.from_numpy(np.sort(first)).to(atoms.device)]


__all__ = ["Allreduce", "DecomposedModel", "METHODS", "Subdomain"]
