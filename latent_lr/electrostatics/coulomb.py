"""The public entry point: Coulomb energy of (smeared) point charges.

Conventions
-----------
* Every pair interacts through ``k_e q_i q_j erf(r / (√2 σ)) / r`` (``1/r`` for
  σ = 0); the self-interaction of each charge is excluded, so an isolated atom
  has zero energy.  Periodic images of an atom do interact with it.
* Periodic structures are summed over all images with tin-foil (conducting)
  boundary conditions: no surface-dipole term.
* Slabs (pbc = (True, True, False)) are summed with images in the plane only,
  via a vacuum-extended 3D sum and the Yeh–Berkowitz / Ballenegger–Arnold–Cerdà
  correction (:mod:`.slab`), whichever periodic method is used.
* A periodic cell with net charge Q is neutralised by a uniform background.
  The k = 0 term of the smeared kernel is omitted, which fixes the background
  energy at ``-k_e π Q² (1/(2α²) - σ²) / V`` in the Ewald split with parameter
  α, so the total does not depend on α.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Mapping, Optional, Union

import torch

from ..units import COULOMB_CONSTANT
from .kernels import screened_pair_kernel, switched_real_space_kernel
from .mesh import spme_reciprocal_energy
from .mesh_parameters import MeshParameters, mesh_parameters
from .pair_energy import switched_pair_energies
from .pairs import PairList, all_pairs_within, periodic_pairs_within_cutoff
from .parameters import EwaldParameters
from .reciprocal import reciprocal_energy
from .setup_cache import ewald_setup
from .slab import extend_slabs, slab_correction
from .state import EngineState
from .validation import OVERLAP_DISTANCE, PbcLike, Structures, validate_structures

logger = logging.getLogger(__name__)

#: Smallest relative force error float32 round-off allows on water-like cells
#: (measured: ~1.5e-6 for both ours and torch-pme at 1,000-3,000 atoms,
#: benchmarks/RESULTS.md §2c).
FLOAT32_ACCURACY_FLOOR = 1e-5

METHODS = ("auto", "direct", "ewald", "pme")

#: ``method="auto"`` uses particle-mesh Ewald for periodic structures with at
#: least this many atoms, Ewald below.  Measured by timing energy + forces
#: (float64, 1 thread, medians of 3) of water-like boxes (latent_lr.demo) of
#: 48-1,536 atoms: PME overtook Ewald at ~100 atoms for accuracy 1e-4 and at
#: ~250 atoms for 1e-6 (the default); at 384 atoms it was 2-3.5x faster.
PME_MIN_ATOMS = 300


def coulomb_energy(
    positions: torch.Tensor,
    charges: torch.Tensor,
    *,
    cell: Optional[torch.Tensor] = None,
    pbc: PbcLike = None,
    batch: Optional[torch.Tensor] = None,
    smearing: Union[float, torch.Tensor] = 0.0,
    accuracy: float = 1e-6,
    method: str = "auto",
    state: Optional[EngineState] = None,
    include_mesh: bool = True,
) -> torch.Tensor:
    """Electrostatic energy of each structure in a batch, in eV.

    Differentiable with respect to ``positions`` (forces), ``cell`` (stress,
    with positions held fixed: use the strain trick), ``charges`` and a tensor
    ``smearing``; double backward works.

    Args:
        positions: (N, 3) Cartesian positions, Å.
        charges: (N,) charges, e.
        cell: (3, 3) or (B, 3, 3) lattice vectors as rows (ASE convention), Å.
            Ignored for open-boundary structures.
        pbc: bool, (3,) or (B, 3) periodicity flags; None means open boundary.
            Fully periodic, fully open, or slabs (True, True, False): periodic
            along the first two cell vectors, open along the third, which
            must be perpendicular to them (see :mod:`.slab`).
        batch: (N,) sorted structure index 0..B-1 of every atom; None means
            one structure.
        smearing: Gaussian charge width σ ≥ 0, Å (float or scalar tensor).
            Pairs interact via erf(r/(√2σ))/r; 0 means point charges.
        accuracy: target relative error of energies and forces (periodic
            structures); the Ewald split and cut-offs follow from it.
        method: ``"direct"`` (exact pair sum, open boundary only), ``"ewald"``
            or ``"pme"`` (smooth particle-mesh Ewald; both periodic only), or
            ``"auto"`` (direct for open structures; for periodic ones Ewald
            below :data:`PME_MIN_ATOMS` atoms and PME from there on).
        state: the run's :class:`~.state.EngineState` (PME keeps its mesh while
            the cell deforms and reuses influence functions, within this state
            only), or None: no mutable state is used, PME chooses afresh for
            this call, and the result depends on the arguments only.
        include_mesh: False leaves out the SPME reciprocal (mesh) energy of the
            PME-summed structures (everything else stays), for a caller that
            adds that mesh energy for a larger density itself (the joint
            charge–dipole energy, :mod:`.joint_equilibration`).

    Returns:
        (B,) energies, eV (k_e = 14.399645 eV·Å/e²).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if state is not None and not isinstance(state, EngineState):
        raise TypeError(
            f"state must be a latent_lr.electrostatics.EngineState or None, got {type(state).__name__}."
        )
    structures = extend_slabs(validate_structures(positions, charges, cell, pbc, batch), accuracy)
    if structures.positions.dtype != torch.float64 and accuracy < FLOAT32_ACCURACY_FLOOR and bool(
        structures.periodic.any()
    ):
        warnings.warn(
            f"accuracy={accuracy:g} is below what {structures.positions.dtype} round-off allows "
            f"(relative force errors of ~1e-6 at best); the result will not reach it. Use float64 "
            f"positions and charges, or accuracy >= {FLOAT32_ACCURACY_FLOOR:g}.",
            stacklevel=2,
        )
    alpha_smear = _smearing_to_alpha(smearing, structures.positions)
    periodic = structures.periodic
    if method == "direct" and bool(periodic.any()):
        raise ValueError(
            "method='direct' sums open-boundary structures only, but some structures are "
            "periodic; use method='ewald' or 'auto', or set pbc=False."
        )
    if method in ("ewald", "pme") and not bool(periodic.all()):
        raise ValueError(
            f"method={method!r} needs periodic structures (pbc=True with a cell), but some are "
            "open; use method='auto' or 'direct' for those."
        )

    energy = structures.positions.new_zeros(structures.n_structures)
    if bool((~periodic).any()):
        pairs = all_pairs_within(
            structures.batch, structures.counts, ~periodic, structures.positions.dtype
        )
        energy = energy + _pair_energy(structures, pairs, None, alpha_smear)
    use_pme = periodic & (method == "pme")
    if method == "auto":
        use_pme = periodic & (structures.counts >= PME_MIN_ATOMS)
        logger.debug(
            "method='auto': direct for %d open, Ewald for %d and PME for %d periodic "
            "structures (PME from %d atoms)",
            int((~periodic).sum()), int((periodic & ~use_pme).sum()), int(use_pme.sum()),
            PME_MIN_ATOMS,
        )
    smearing_value = float(_as_float(smearing))
    if bool((periodic & ~use_pme).any()):
        energy = energy + _ewald_energy(
            dataclasses.replace(structures, periodic=periodic & ~use_pme), alpha_smear, smearing_value, accuracy
        )
    if bool(use_pme.any()):
        energy = energy + _pme_energy(
            dataclasses.replace(structures, periodic=use_pme), alpha_smear, smearing_value, accuracy, state,
            include_mesh,
        )
    if bool(structures.slab.any()):
        energy = energy + slab_correction(structures, alpha_smear)
    return COULOMB_CONSTANT * energy


def _as_float(smearing: Union[float, torch.Tensor]) -> float:
    return float(smearing.detach()) if isinstance(smearing, torch.Tensor) else float(smearing)


def _smearing_to_alpha(
    smearing: Union[float, torch.Tensor], like: torch.Tensor
) -> Optional[torch.Tensor]:
    value = _as_float(smearing)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"smearing must be a finite width ≥ 0 in Å, got {value}.")
    if value == 0.0:
        return None
    sigma = torch.as_tensor(smearing, dtype=like.dtype, device=like.device)
    if sigma.numel() != 1:
        raise ValueError("smearing must be a scalar (one width for all atoms).")
    return 1.0 / (math.sqrt(2.0) * sigma.reshape(()))


def _pair_energy(
    structures: Structures,
    pairs: PairList,
    alpha_split: Optional[torch.Tensor],
    alpha_smear: Optional[torch.Tensor],
    switch: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Σ over pairs of q_i q_j kernel(r) per structure, in units of k_e.

    ``switch`` = (r_switch, r_cut), each (B,) in Å, switches the kernel off
    smoothly (periodic real-space sums); None keeps the full kernel.
    """
    energy = structures.positions.new_zeros(structures.n_structures)
    if pairs.first.numel() == 0:
        return energy
    vectors = pairs.vectors(structures.positions, structures.cell)
    _check_overlap(vectors.detach().norm(dim=1), pairs)
    split = (
        vectors.new_zeros(len(vectors)) if alpha_split is None else alpha_split[pairs.structure]
    )
    charges_first, charges_second = structures.charges[pairs.first], structures.charges[pairs.second]
    if switch is None:
        kernel = screened_pair_kernel(vectors.norm(dim=1), split, alpha_smear)
        pair = charges_first * charges_second * kernel
    else:
        r_switch, r_cut = switch[0][pairs.structure], switch[1][pairs.structure]
        constants = (split, r_switch, r_cut) + (() if alpha_smear is None else (alpha_smear,))
        if any(c.requires_grad for c in constants):
            kernel = switched_real_space_kernel(vectors.norm(dim=1), split, alpha_smear, r_switch, r_cut)
            pair = charges_first * charges_second * kernel
        else:
            pair = switched_pair_energies(
                vectors, charges_first, charges_second, split, alpha_smear, r_switch, r_cut
            )
    return energy.index_add(0, pairs.structure, pair)


def _check_overlap(distance: torch.Tensor, pairs: PairList) -> None:
    close = distance.detach() < OVERLAP_DISTANCE
    if bool(close.any()):
        k = int(torch.nonzero(close)[0])
        raise ValueError(
            f"atoms {int(pairs.first[k])} and {int(pairs.second[k])} (structure "
            f"{int(pairs.structure[k])}) overlap: they are {float(distance[k]):.2g} Å apart "
            "(or one sits on the other's periodic image). Remove duplicate atoms."
        )


def _ewald_energy(
    structures: Structures,
    alpha_smear: Optional[torch.Tensor],
    smearing: float,
    accuracy: float,
) -> torch.Tensor:
    """Real + reciprocal + self + background energy of the periodic structures, / k_e."""
    positions, charges, cell = structures.positions, structures.charges, structures.cell
    rows = torch.nonzero(structures.periodic).flatten()
    counts = structures.counts
    volumes = torch.linalg.det(cell[rows]).abs()
    cells_float = cell.detach().cpu().double().numpy()
    setups = {
        index: ewald_setup(cells_float[index], int(counts[index]), accuracy, smearing)
        for index in rows.tolist()
    }
    parameters: dict[int, EwaldParameters] = {i: setup.parameters for i, setup in setups.items()}
    for index, chosen in parameters.items():
        logger.debug("structure %d: Ewald %s", index, chosen)

    energy, alpha_rows = _real_space_energy(structures, rows, parameters, alpha_smear)
    k_cutoffs = torch.tensor(
        [[parameters[i].k_switch, parameters[i].k_cut] for i in rows.tolist()],
        dtype=positions.dtype,
        device=positions.device,
    ).reshape(-1, 2)

    row_of_structure = torch.full(
        (structures.n_structures,), -1, dtype=torch.long, device=positions.device
    )
    row_of_structure[rows] = torch.arange(len(rows), device=positions.device)
    atom_row = row_of_structure[structures.batch]
    in_periodic = atom_row >= 0
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(positions.shape[0], device=positions.device) - starts[structures.batch]
    k_indices = [setups[i].k_indices for i in rows.tolist()]
    reciprocal = reciprocal_energy(
        positions[in_periodic],
        charges[in_periodic],
        cell[rows],
        slot[in_periodic],
        atom_row[in_periodic],
        len(rows),
        k_indices,
        alpha_rows,
        k_cutoffs[:, 0],
        k_cutoffs[:, 1],
    )

    constant = _self_and_background(
        charges[in_periodic], atom_row[in_periodic], alpha_rows, alpha_smear, volumes
    )
    return energy.index_add(0, rows, reciprocal + constant)


def _real_space_energy(
    structures: Structures,
    rows: torch.Tensor,
    parameters: Mapping[int, Union[EwaldParameters, MeshParameters]],
    alpha_smear: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Switched real-space pair energy (B,) / k_e of the periodic structures ``rows``.

    Also returns their splitting parameters alpha (R,): where the smearing caps
    alpha (r_cut = 0) it is the smearing's own tensor, so that gradients reach a
    tensor ``smearing`` through the reciprocal and self terms.
    """
    positions = structures.positions
    alpha_rows, r_switch, r_cut = (
        positions.new_tensor([[parameters[i].alpha, parameters[i].r_switch, parameters[i].r_cut]
                              for i in rows.tolist()])
        .reshape(-1, 3)
        .unbind(1)
    )
    if alpha_smear is not None:
        alpha_rows = torch.where(r_cut == 0.0, alpha_smear.expand_as(alpha_rows), alpha_rows)
    alpha_all, r_switch_all, r_cut_all = (
        positions.new_zeros(structures.n_structures).index_put((rows,), values)
        for values in (alpha_rows, r_switch, r_cut)
    )
    pairs = periodic_pairs_within_cutoff(
        positions, structures.cell, structures.batch, structures.counts,
        {i: parameters[i].r_cut for i in rows.tolist()},
    )
    energy = _pair_energy(structures, pairs, alpha_all, alpha_smear, (r_switch_all, r_cut_all))
    return energy, alpha_rows


def _self_and_background(
    charges: torch.Tensor,
    atom_row: torch.Tensor,
    alpha: torch.Tensor,
    alpha_smear: Optional[torch.Tensor],
    volumes: torch.Tensor,
) -> torch.Tensor:
    """Self-interaction and neutralising-background energy of R periodic structures, / k_e.

    Keep it TorchScript-able: :class:`.deploy.EwaldEnergy` uses it too.

    Args:
        charges: (M,) charges of the atoms of the periodic structures, e.
        atom_row: (M,) which of the R structures each atom belongs to.
        alpha: (R,) Ewald splitting parameters, 1/Å.
        alpha_smear: scalar tensor 1/(√2 σ), 1/Å, or None for point charges.
        volumes: (R,) cell volumes, Å³.
    """
    q_squared = charges.new_zeros(len(alpha)).index_add(0, atom_row, charges * charges)
    q_total = charges.new_zeros(len(alpha)).index_add(0, atom_row, charges)
    self_energy = -alpha / math.sqrt(math.pi) * q_squared
    variance = 1.0 / (2.0 * alpha**2)
    if alpha_smear is not None:
        variance = variance - 1.0 / (2.0 * alpha_smear**2)
    background = -math.pi * q_total**2 * variance / volumes
    return self_energy + background


def _pme_energy(
    structures: Structures,
    alpha_smear: Optional[torch.Tensor],
    smearing: float,
    accuracy: float,
    state: Optional[EngineState],
    include_mesh: bool = True,
) -> torch.Tensor:
    """Real + SPME reciprocal (unless not ``include_mesh``) + self + background energy of the periodic
    structures, / k_e.

    With ``state`` the mesh is kept while the cell deforms and influence
    functions are reused (:class:`~.state.EngineState`); without, both are
    chosen or computed afresh.
    """
    positions, charges, cell = structures.positions, structures.charges, structures.cell
    rows = torch.nonzero(structures.periodic).flatten()
    rows_list = rows.tolist()
    volumes = torch.linalg.det(cell[rows]).abs()
    volumes_float = volumes.detach().tolist()
    lengths = cell[rows].detach().norm(dim=2).tolist()
    counts = structures.counts.tolist()

    choose = mesh_parameters if state is None else state.mesh_parameters
    parameters: dict[int, MeshParameters] = {}
    for row, index in enumerate(rows_list):
        parameters[index] = choose(counts[index], tuple(lengths[row]), volumes_float[row], accuracy, smearing)
        logger.debug("structure %d: PME %s", index, parameters[index])
    energy, alpha_rows = _real_space_energy(structures, rows, parameters, alpha_smear)

    in_periodic = structures.periodic[structures.batch]
    atom_row = (torch.cumsum(structures.periodic.long(), 0) - 1)[structures.batch][in_periodic]
    constant = _self_and_background(charges[in_periodic], atom_row, alpha_rows, alpha_smear, volumes)
    if not include_mesh:
        return energy.index_add(0, rows, constant)
    reciprocal = spme_reciprocal_energy(
        positions[in_periodic],
        charges[in_periodic],
        cell[rows],
        atom_row,
        [parameters[i].mesh for i in rows_list],
        alpha_rows,
        parameters[rows_list[0]].order,
        None if state is None else state.influence,
        0 if state is None else state.influence_cache_size,
    )
    return energy.index_add(0, rows, reciprocal + constant)
