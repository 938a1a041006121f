"""A wrapped model evaluated on one subdomain of a domain-decomposed periodic box.

Each MPI rank owns its *local* atoms and sees *ghost* atoms (periodic images
and other ranks' atoms) out to :meth:`DecomposedModel.ghost_cutoff` beyond its
subdomain, as LAMMPS provides them.  The rank evaluates, for its local atoms
only: host per-atom energies and features (exact, since ghosts reach the
host's receptive field), latent charges, the real-space Ewald sum over pairs
(local, local-or-ghost), and its part of the structure factor.  The global
quantities are sums over ranks, done by an ``allreduce`` callable (MPI's
``Allreduce`` with ``SUM``; the identity on one process):

==========================  ===============================  ==========================
communicated per step       size                             why
==========================  ===============================  ==========================
charge sums Σ q̃, Σ w, n     3 numbers                        total-charge redistribution
charges by atom ID          N numbers                        ghost charges (real space)
structure factor C, S       2 K numbers                      k-space energy and φ
Σ q², Σ φ w, Σ φ, energy    4 numbers                        self term, ∂E/∂(charge sums)
gradients by atom ID        3 N numbers                      ghost forces to their owners
virial shares               9 numbers                        the box's virial (stress)
==========================  ===============================  ==========================

No rank holds other ranks' positions.  The charge-transfer force
−Σ_i φ_i ∂q_i/∂r_k (φ_i = ∂E/∂q_i, charges depend on positions) is included:
every rank back-propagates φ_i of its local atoms through their charges (and
the redistribution's global sums) into local and ghost positions; ghost
gradients are summed into their owners by atom ID.  The long-range sum is the
engine's Ewald sum with the engine's parameters (:func:`.setup_cache.ewald_setup`
for the whole box), so the result equals the single-process model to
round-off where the engine uses Ewald (below 300 atoms, or ``method="ewald"``)
and to the engine's accuracy where it uses PME.

Supported: fully periodic boxes, the latent charge head
(:class:`~latent_lr.charges.ChargeHead`, any redistribution), backbones with
:meth:`~latent_lr.backbone.Backbone.per_atom_energies` (built-in radial, MACE, NequIP, CHGNet, CACE), no
polarisabilities, no external field.  The virial comes from a homogeneous
strain of all positions (ghost images included) and of the cell, summed over
the ranks' shares (9 more numbers per step).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .charges import ChargeHead, LearnedChargeRedistribution, NoChargeConstraint, TotalChargeConstraint
from .data import AtomsBatch
from .electrostatics.kernels import switched_real_space_kernel
from .electrostatics.reciprocal import k_space_weights
from .electrostatics.setup_cache import ewald_setup
from .errors import UserInputError
from .model import LongRangeModel
from .units import COULOMB_CONSTANT

#: Sum of an array over all ranks (same shape back); the identity on one process.
Allreduce = Callable[[np.ndarray], np.ndarray]

#: Real-space pairs are searched for this many local atoms at a time (memory: chunk × cluster distances).
PAIR_CHUNK = 256


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
    """

    positions: torch.Tensor
    numbers: torch.Tensor
    tags: torch.Tensor
    n_local: int
    cell: torch.Tensor
    n_atoms: int
    total_charge: float


class DecomposedModel:
    """Energy and local-atom forces of a wrapped model from one subdomain (see the module docstring).

    Args:
        model: a model from :func:`latent_lr.wrap` or :func:`latent_lr.load`.
        allreduce: sum over ranks of a float64 numpy array.
        charge_transfer_forces: include −Σ φ_i ∂q_i/∂r (always True in use;
            False exists to show that tests detect the term).

    Raises:
        UserInputError: a model this decomposition does not support.
    """

    def __init__(self, model: LongRangeModel, allreduce: Allreduce, charge_transfer_forces: bool = True):
        long_range = model.long_range
        if long_range is None or not isinstance(long_range.charge_head, ChargeHead):
            raise UserInputError("several MPI ranks need a model with latent charges (charge_model='latent').")
        if long_range.config.spin_channel:
            raise UserInputError("several MPI ranks do not support the spin channel (spin_channel) yet; run on one rank.")
        if long_range.polarizability_head is not None:
            raise UserInputError("several MPI ranks do not support latent polarisabilities yet; run on one rank.")
        if model.backbone.receptive_field is None:
            raise UserInputError(
                f"the {model.backbone.label or model.backbone.name} adapter does not state its receptive field; "
                "several MPI ranks need it (run on one rank)."
            )
        self.model = model.eval()
        self.head: ChargeHead = long_range.charge_head
        self.charge_sign = long_range.charge_sign
        #: Å, how far ghosts reach (LAMMPS's ``comm_modify cutoff``, set by :func:`latent_lr.lammps.attach`); None: not checked.
        self.ghost_reach: Optional[float] = None
        self.allreduce = allreduce
        self.charge_transfer_forces = charge_transfer_forces
        self.smearing = float(long_range.smearing)
        self.accuracy = float(long_range.accuracy)
        #: Wall time spent in ``allreduce`` so far, s (communication plus waiting for slower ranks).
        self.communication_seconds = 0.0

    def _sum(self, values: np.ndarray) -> np.ndarray:
        """``allreduce(values)``, timed into :attr:`communication_seconds`."""
        start = time.perf_counter()
        summed = self.allreduce(values)
        self.communication_seconds += time.perf_counter() - start
        return summed

    def ghost_cutoff(self, cell: np.ndarray, n_atoms: int) -> float:
        """Å: ghosts must reach the host's receptive field and the Ewald real-space cut-off."""
        ewald = ewald_setup(cell, n_atoms, self.accuracy, self.smearing).parameters
        return max(float(self.model.backbone.receptive_field or 0.0), ewald.r_cut)

    def __call__(self, sub: Subdomain) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Total energy of the box (eV, the same on every rank), forces (n_local, 3) eV/Å and
        latent charges (n_local,) e of the local atoms, and the box's virial (3, 3)
        W = -sym(∂E/∂ε) = -V σ, eV (the same on every rank)."""
        with torch.enable_grad():
            return self._evaluate(sub)

    def _evaluate(self, sub: Subdomain) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
        model, n_local = self.model, sub.n_local
        positions = sub.positions.detach().clone().requires_grad_(True)
        # A homogeneous strain ε of all positions (ghost images included) and of the cell gives the virial.
        strain = positions.new_zeros(3, 3, requires_grad=True)
        deformation = torch.eye(3, dtype=positions.dtype, device=positions.device) + strain
        strained, strained_cell = positions @ deformation, sub.cell.to(positions) @ deformation
        # The host sees the local atoms and the ghosts within its receptive field of them.
        receptive_field = float(model.backbone.receptive_field or 0.0)
        host_atoms = torch.nonzero(_distance_to(positions.detach(), n_local) < receptive_field).squeeze(1)
        cluster = AtomsBatch(
            positions=strained[host_atoms], numbers=sub.numbers[host_atoms], cell=positions.new_zeros(1, 3, 3),
            pbc=torch.zeros(1, 3, dtype=torch.bool, device=positions.device),
            batch=torch.zeros(len(host_atoms), dtype=torch.long, device=positions.device),
            total_charge=positions.new_zeros(1), external_field=positions.new_zeros(1, 3),
        )
        atomic, features = model.backbone.per_atom_energies(cluster)
        atomic = atomic[:n_local] + model.reference_energy.to(atomic)[sub.numbers[:n_local]]
        features = features[:n_local].to(positions.dtype)
        charges, chain = self._charges(features, sub)

        local_tags = sub.tags[:n_local]
        by_tag = np.zeros(sub.n_atoms + 1)
        by_tag[local_tags.cpu().numpy()] = charges.detach().cpu().numpy()
        cluster_charges = torch.from_numpy(self._sum(by_tag)).to(positions)[sub.tags]

        ewald = ewald_setup(sub.cell.detach().cpu().numpy(), sub.n_atoms, self.accuracy, self.smearing)
        needed = max(receptive_field, ewald.parameters.r_cut)
        if self.ghost_reach is not None and needed > self.ghost_reach:
            raise UserInputError(
                f"the box grew: the model needs ghosts out to {needed:.3f} Å but LAMMPS's ghost cut-off is "
                f"{self.ghost_reach:.3f} Å (set by attach); call latent_lr.lammps.attach again after large volume changes."
            )
        real_energy, real_potential, real_surrogate = self._real_space(strained, cluster_charges, n_local, ewald)
        k_energy, k_potential, k_surrogate = self._k_space(
            positions[:n_local], cluster_charges[:n_local], sub, strained_cell, ewald
        )
        alpha = ewald.parameters.alpha
        own = cluster_charges[:n_local]
        squares, net = (float(x) for x in self._sum(np.array([float((own**2).sum()), float(own.sum())])))
        variance = 1.0 / (2.0 * alpha**2) - (0.0 if self.smearing == 0.0 else self.smearing**2)
        volume = abs(float(torch.linalg.det(sub.cell)))
        constant_energy = -alpha / math.sqrt(math.pi) * squares - math.pi * net**2 * variance / volume
        # φ_i = ∂E/∂q_i of the local atoms, eV/e.
        potential = COULOMB_CONSTANT * (
            real_potential + k_potential - 2.0 * alpha / math.sqrt(math.pi) * own - 2.0 * math.pi * net * variance / volume
        )
        # The background's dependence on the volume, counted once over the ranks.
        ranks = float(self._sum(np.array([1.0]))[0])
        background = -math.pi * net**2 * variance / torch.linalg.det(strained_cell).abs() / ranks
        surrogate = atomic.sum() + COULOMB_CONSTANT * (real_surrogate + k_surrogate + background)
        if self.charge_transfer_forces:
            surrogate = surrogate + (potential.detach() * charges).sum() + chain(potential.detach())
        local_energy = float(atomic.detach().sum()) + COULOMB_CONSTANT * real_energy
        energy = float(self._sum(np.array([local_energy]))[0]) + COULOMB_CONSTANT * (k_energy + constant_energy)

        gradient, strain_gradient = torch.autograd.grad(surrogate, (positions, strain))
        gradient_by_tag = np.zeros((sub.n_atoms + 1, 3))
        np.add.at(gradient_by_tag, sub.tags.cpu().numpy(), gradient.detach().cpu().numpy())
        forces = -torch.from_numpy(self._sum(gradient_by_tag)).to(positions)[local_tags]
        share = -0.5 * (strain_gradient + strain_gradient.T).detach().cpu().numpy()
        virial = torch.from_numpy(self._sum(share)).to(positions)
        return energy, forces, charges.detach(), virial

    def _charges(
        self, features: torch.Tensor, sub: Subdomain
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Local latent charges (n_local,) e, and the chain term of the redistribution's global sums.

        The charges use the global sums as constants; ``chain(φ)`` returns the
        scalar whose gradient adds Σ_i φ_i ∂q_i/∂(sums) · ∂(sums)/∂r (all ranks' φ).
        """
        head, numbers = self.head, sub.numbers[: sub.n_local]
        raw = head.raw_charges(features, numbers, self.charge_sign)
        constraint, total = head.constraint, sub.total_charge
        if isinstance(constraint, NoChargeConstraint):
            return raw, lambda potential: raw.new_zeros(())
        if isinstance(constraint, TotalChargeConstraint):
            raw_sum, count = self._sum(np.array([float(raw.detach().sum()), float(sub.n_local)]))
            shift = (total - raw_sum) / count

            def uniform_chain(potential: torch.Tensor) -> torch.Tensor:
                potential_sum = float(self._sum(np.array([float(potential.sum())]))[0])
                return -potential_sum / count * raw.sum()

            return raw + shift, uniform_chain
        if isinstance(constraint, LearnedChargeRedistribution):
            weights = constraint.weights(features)
            raw_sum, weight_sum = self._sum(np.array([float(raw.detach().sum()), float(weights.detach().sum())]))
            share = (total - raw_sum) / weight_sum

            def learned_chain(potential: torch.Tensor) -> torch.Tensor:
                weighted = float(self._sum(np.array([float((potential * weights.detach()).sum())]))[0])
                # ∂E/∂(Σ q̃) = -Σ φ w / Σ w;  ∂E/∂(Σ w) = -Σ φ w (Q - Σ q̃) / (Σ w)².
                return -weighted / weight_sum * raw.sum() - weighted * share / weight_sum * weights.sum()

            return raw + weights * share, learned_chain
        raise UserInputError(f"several MPI ranks do not support the charge constraint {type(constraint).__name__}.")

    def _real_space(
        self, positions: torch.Tensor, charges: torch.Tensor, n_local: int, ewald
    ) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Real-space Ewald part over pairs (local i, any j ≠ i within r_cut), / k_e.

        Returns this rank's energy share ½ Σ_i q_i φ_i, the local potentials
        φ_i = Σ_j q_j ψ(r_ij) (n_local,) and the same share as a function of the
        (strained) positions of both atoms of each pair, charges fixed: its
        gradients, summed over ranks by atom ID, are the real-space forces and virial.
        """
        p = ewald.parameters
        potential = positions.new_zeros(n_local)
        surrogate = positions.new_zeros(())
        if p.r_cut == 0.0:
            return 0.0, potential, surrogate
        alpha_smear = None if self.smearing == 0.0 else positions.new_tensor(1.0 / (math.sqrt(2.0) * self.smearing))
        fixed = positions.detach()
        for start in range(0, n_local, PAIR_CHUNK):
            stop = min(start + PAIR_CHUNK, n_local)
            distances = torch.cdist(fixed[start:stop], fixed, compute_mode="donot_use_mm_for_euclid_dist")
            rows, columns = torch.nonzero(distances < p.r_cut, as_tuple=True)
            first = rows + start
            first, columns = first[first != columns], columns[first != columns]
            distance = (positions[first] - positions[columns]).norm(dim=1)
            kernel = switched_real_space_kernel(
                distance, positions.new_full(distance.shape, p.alpha), alpha_smear,
                positions.new_full(distance.shape, p.r_switch), positions.new_full(distance.shape, p.r_cut),
            )
            surrogate = surrogate + 0.5 * (charges[first] * charges[columns] * kernel).sum()
            potential = potential.index_add(0, first, (charges[columns] * kernel).detach())
        return float(0.5 * (charges[:n_local] * potential).sum()), potential, surrogate

    def _k_space(
        self, positions: torch.Tensor, charges: torch.Tensor, sub: Subdomain, strained_cell: torch.Tensor, ewald
    ) -> tuple[float, torch.Tensor, torch.Tensor]:
        """k-space Ewald part, / k_e: total energy, local potentials (n_local,), and a scalar whose
        gradients are the k-space forces on the local atoms and this rank's share of the k-space
        virial (S(k) is invariant under strain; the weights and the volume are not)."""
        p = ewald.parameters
        cell = sub.cell.to(positions)[None]
        integer_k = torch.from_numpy(np.array(ewald.k_indices, dtype=float)).to(positions)[None]
        if integer_k.shape[1] == 0:
            zero = positions.new_zeros(())
            return 0.0, positions.new_zeros(len(positions)), zero
        valid = torch.ones(integer_k.shape[:2], dtype=torch.bool, device=positions.device)
        alpha, k_switch, k_cut = (positions.new_tensor([value]) for value in (p.alpha, p.k_switch, p.k_cut))
        k_vectors, weight = k_space_weights(cell, integer_k, valid, alpha, k_switch, k_cut)
        k_vectors, weight = k_vectors[0], weight[0]
        phase = positions @ k_vectors.T
        cos_phase, sin_phase = torch.cos(phase), torch.sin(phase)
        q = charges.detach()
        parts = np.concatenate([(q @ cos_phase).detach().cpu().numpy(), (q @ sin_phase).detach().cpu().numpy()])
        total = torch.from_numpy(self._sum(parts)).to(positions)
        cos_sum, sin_sum = total[: len(weight)], total[len(weight):]
        prefactor = 2.0 * math.pi / abs(float(torch.linalg.det(sub.cell)))
        energy = prefactor * float((weight * (cos_sum**2 + sin_sum**2)).sum())
        field_sum = 2.0 * prefactor * (cos_phase * (weight * cos_sum) + sin_phase * (weight * sin_sum)).sum(dim=1)
        _, strained_weight = k_space_weights(strained_cell[None], integer_k, valid, alpha, k_switch, k_cut)
        own_cos, own_sin = (torch.from_numpy(part).to(positions) for part in np.split(parts, 2))
        share = (strained_weight[0] * (own_cos * cos_sum + own_sin * sin_sum)).sum()
        share = 2.0 * math.pi / torch.linalg.det(strained_cell).abs() * share
        return energy, field_sum.detach(), (q * field_sum).sum() + share


def _distance_to(positions: torch.Tensor, n_local: int) -> torch.Tensor:
    """(M,) distance of every atom to the nearest of the first ``n_local`` atoms, Å (0 for those)."""
    nearest = positions.new_full((len(positions),), math.inf)
    for start in range(0, n_local, PAIR_CHUNK):
        chunk = torch.cdist(positions[start : start + PAIR_CHUNK], positions, compute_mode="donot_use_mm_for_euclid_dist")
        nearest = torch.minimum(nearest, chunk.min(dim=0).values)
    return nearest


__all__ = ["Allreduce", "DecomposedModel", "PAIR_CHUNK", "Subdomain"]
