"""The smeared Coulomb matrix as an explicit linear operator at fixed geometry: v ↦ K v, no autograd.

E_coul(q) of :func:`~.coulomb.coulomb_energy` is quadratic in the charges,
E_coul = ½ qᵀ K q, so its charge gradient is K q.  An iterative solve (Qeq by
CG) applies K tens of times at one geometry; differentiating the engine for
every product replays the whole energy graph.  Here the pieces of K are set up
once, from the engine's own functions and parameters, and each product is

* real-space pairs (periodic, PME) or all pairs (open): one sparse
  matrix–vector product with the pair kernel values k_e f(r_ij) (the switched
  kernel of :func:`.kernels.switched_real_space_kernel`, the full smeared one
  :func:`.kernels.screened_pair_kernel` for open structures);
* the PME mesh: spread by the sparse B-spline matrix of the engine's stencil
  (:func:`.mesh.spline_points`, as :func:`.mesh.spread_charges`), the mesh
  potential by one real FFT pair (:func:`.mesh.mesh_potential` with the
  influence function θ of the same mesh and α), interpolation back by the
  transpose (as :func:`.mesh.interpolate_mesh`);
* the Ewald self and neutralising-background terms of
  :func:`.coulomb._self_and_background` (diagonal plus a constant per structure).

The same mesh parameters as the engine's call with the same ``state`` are used
(:meth:`.state.EngineState.mesh_parameters` returns the kept mesh), so K v
equals the engine's ∂E_coul/∂q at q = v to round-off
(tests/test_coulomb_operator.py).  With ``precision=torch.float32`` the mesh part
(spreading, FFT pair, interpolation) runs in single precision and is added back
in the input dtype: about 1.7x faster per product at 10,000 atoms, relative
error ~1e-7, for loose (MD) solves only (:data:`.qeq.SINGLE_PRECISION_RTOL`).
Only fully periodic structures summed by
PME and open structures are covered; :func:`coulomb_operator` returns None for
batches with slabs or Ewald-summed cells (fewer than
:data:`~.coulomb.PME_MIN_ATOMS` atoms), and callers fall back to autograd.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterator, Optional

import torch

from ..units import COULOMB_CONSTANT
from .coulomb import PME_MIN_ATOMS
from .kernels import screened_pair_kernel, switched_real_space_kernel
from .mesh import (
    _cached_influence,
    bspline_weights,
    influence_function,
    interpolation_matrix,
    mesh_layout,
    mesh_potential,
    spline_points,
)
from .mesh_parameters import MeshParameters, mesh_parameters
from .pairs import all_pairs_within, periodic_pairs_within_cutoff
from .state import EngineState
from .validation import validate_structures


@contextlib.contextmanager
def _quiet_sparse() -> Iterator[None]:
    """Silence torch's one-time 'sparse CSR support is in beta' notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        yield


def coulomb_operator(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    batch: torch.Tensor,
    smearing: float,
    accuracy: float,
    state: Optional[EngineState] = None,
    precision: Optional[torch.dtype] = None,
    include_mesh: bool = True,
) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """``v ↦ K v`` (N,) e -> (N,) eV/e for the batch, built without gradients; None where not covered.

    Args:
        positions: (N, 3) Å; cell: (B, 3, 3) Å; pbc: (B, 3); batch: (N,) sorted.
        smearing: Gaussian width σ > 0, Å.
        accuracy: the engine accuracy of the energy this operator differentiates.
        state: the engine state of that energy's calls (its kept PME meshes).
        precision: dtype of the PME mesh work (None: the positions' dtype); the product keeps v's dtype.
        include_mesh: False leaves out the PME mesh part (pairs, self and background terms only), for a
            caller that sums the mesh part with another density on the same mesh (the joint charge–dipole
            product, :mod:`.joint_equilibration`); :func:`mesh_parameters_of` gives that mesh.
    """
    with torch.no_grad():
        positions, cell = positions.detach(), cell.detach()
        structures = validate_structures(positions, torch.zeros_like(positions[:, 0]), cell, pbc, batch)
        periodic, counts = structures.periodic, structures.counts
        if bool(structures.slab.any()) or bool((periodic & (counts < PME_MIN_ATOMS)).any()) or not smearing > 0:
            return None
        n_atoms = positions.shape[0]
        alpha_smear = torch.tensor(1.0 / (math.sqrt(2.0) * smearing), dtype=positions.dtype, device=positions.device)
        first, second, values = [], [], []
        if bool((~periodic).any()):
            pairs = all_pairs_within(structures.batch, counts, ~periodic, positions.dtype)
            if pairs.first.numel():
                distance = pairs.vectors(structures.positions, structures.cell).norm(dim=1)
                first.append(pairs.first)
                second.append(pairs.second)
                values.append(screened_pair_kernel(distance, torch.zeros_like(distance), alpha_smear))
        mesh_term: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        if bool(periodic.any()):
            mesh_term = _periodic_terms(
                structures, alpha_smear, smearing, accuracy, state, first, second, values, precision or positions.dtype,
                include_mesh,
            )
        matrix = None
        if first:
            rows, columns, kernel = torch.cat(first), torch.cat(second), torch.cat(values)
            with _quiet_sparse():
                matrix = torch.sparse_coo_tensor(
                    torch.stack([torch.cat([rows, columns]), torch.cat([columns, rows])]),
                    COULOMB_CONSTANT * torch.cat([kernel, kernel]), (n_atoms, n_atoms), check_invariants=False,
                ).coalesce().to_sparse_csr()

    def apply(v: torch.Tensor) -> torch.Tensor:
        product = torch.zeros_like(v) if matrix is None else torch.mv(matrix, v)
        return product if mesh_term is None else product + mesh_term(v)

    return apply


def mesh_parameters_of(
    cell: torch.Tensor, periodic: torch.Tensor, counts: torch.Tensor, smearing: float, accuracy: float,
    state: Optional[EngineState] = None,
) -> dict[int, MeshParameters]:
    """The PME parameters of every periodic structure (index -> parameters), as the engine's call with ``state``.

    Args: cell (B, 3, 3) Å; periodic (B,) bool; counts (B,) atoms; smearing σ, Å; accuracy; state.
    """
    rows_list = torch.nonzero(periodic).flatten().tolist()
    volumes = torch.linalg.det(cell[rows_list]).abs().tolist()
    lengths = cell[rows_list].norm(dim=2).tolist()
    counts_list = counts.tolist()
    choose = mesh_parameters if state is None else state.mesh_parameters
    return {
        index: choose(counts_list[index], tuple(lengths[row]), volumes[row], accuracy, smearing)
        for row, index in enumerate(rows_list)
    }


def _periodic_terms(
    structures, alpha_smear: torch.Tensor, smearing: float, accuracy: float, state: Optional[EngineState],
    first: list[torch.Tensor], second: list[torch.Tensor], values: list[torch.Tensor], precision: torch.dtype,
    include_mesh: bool = True,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Append the real-space pairs of the PME structures; return v ↦ (mesh + self + background) part of K v.

    Follows :func:`.coulomb._pme_energy` step by step (same parameter choice, same functions).
    """
    positions, cell = structures.positions, structures.cell
    rows = torch.nonzero(structures.periodic).flatten()
    rows_list = rows.tolist()
    volumes = torch.linalg.det(cell[rows]).abs()
    parameters = mesh_parameters_of(cell, structures.periodic, structures.counts, smearing, accuracy, state)
    alpha_rows, r_switch, r_cut = positions.new_tensor(
        [[parameters[i].alpha, parameters[i].r_switch, parameters[i].r_cut] for i in rows_list]
    ).reshape(-1, 3).unbind(1)
    alpha_rows = torch.where(r_cut == 0.0, alpha_smear.expand_as(alpha_rows), alpha_rows)
    per_structure = [
        positions.new_zeros(structures.n_structures).index_put((rows,), v) for v in (alpha_rows, r_switch, r_cut)
    ]
    pairs = periodic_pairs_within_cutoff(
        positions, cell, structures.batch, structures.counts, {i: parameters[i].r_cut for i in rows_list}
    )
    if pairs.first.numel():
        distance = pairs.vectors(positions, cell).norm(dim=1)
        alpha_all, switch_all, cut_all = (values_[pairs.structure] for values_ in per_structure)
        first.append(pairs.first)
        second.append(pairs.second)
        values.append(switched_real_space_kernel(distance, alpha_all, alpha_smear, switch_all, cut_all))

    in_periodic = structures.periodic[structures.batch]
    atoms = torch.nonzero(in_periodic).flatten()
    atom_row = (torch.cumsum(structures.periodic.long(), 0) - 1)[structures.batch][in_periodic]
    # ∂/∂q of _self_and_background: −α q²/√π per atom, −π Q² (1/(2α²) − 1/(2α_s²))/V per structure.
    self_coefficient = (-2.0 / math.sqrt(math.pi) * alpha_rows)[atom_row]
    background_coefficient = -2.0 * math.pi * (1.0 / (2.0 * alpha_rows**2) - 1.0 / (2.0 * alpha_smear**2)) / volumes

    def local_part(charges: torch.Tensor) -> torch.Tensor:
        total = charges.new_zeros(len(rows_list)).index_add(0, atom_row, charges)
        return self_coefficient * charges + background_coefficient[atom_row] * total[atom_row]

    if not include_mesh:  # no mesh set-up at all
        return lambda v: torch.zeros_like(v).index_add(0, atoms, COULOMB_CONSTANT * local_part(v[atoms]))
    mesh_shapes = [parameters[i].mesh for i in rows_list]
    order = parameters[rows_list[0]].order
    shapes, groups, offset, cursor = mesh_layout(mesh_shapes, positions.device)
    flat, offsets = spline_points(positions[atoms], cell[rows], atom_row, mesh_shapes, offset, order)
    weights = bspline_weights(offsets, order)  # (M, 3, p), as spme_reciprocal_energy
    # The interpolation matrix A (M atoms × mesh points, p³ entries per row, the product of the three axes'
    # spline weights as in interpolate_mesh) in CSR form; spreading applies Aᵀ by one index_add.
    weights = weights.to(precision)
    stencil = (weights[:, 0, :, None, None] * weights[:, 1, None, :, None] * weights[:, 2, None, None, :]).reshape(
        len(atoms), -1
    )
    points = flat.reshape(len(atoms), -1).to(torch.int32)  # int32: half the index traffic of each product
    interpolation = interpolation_matrix(points, stencil, cursor)
    blocks = []
    for shape, group in zip(shapes, groups):
        group_rows = torch.tensor(group, dtype=torch.long, device=positions.device)
        if state is None:
            theta = influence_function(cell[rows][group_rows], alpha_rows[group_rows], shape, order)
        else:
            theta = _cached_influence(
                cell[rows][group_rows], alpha_rows[group_rows], shape, order, state.influence, state.influence_cache_size
            )
        blocks.append((shape, len(group), theta.to(precision)))

    def mesh_and_constant(v: torch.Tensor) -> torch.Tensor:
        charges = v[atoms]
        local = local_part(charges)
        low = charges.to(precision)
        grid = low.new_zeros(cursor).index_add_(0, points.reshape(-1), (stencil * low[:, None]).reshape(-1))
        potentials, start = [], 0
        for shape, size, theta in blocks:
            length = size * shape[0] * shape[1] * shape[2]
            block = grid[start : start + length].reshape(size, *shape)
            start += length
            spectrum = torch.fft.rfftn(block, dim=(1, 2, 3))
            potentials.append(mesh_potential(spectrum, theta, list(shape)).reshape(-1))
        mesh = torch.mv(interpolation, potentials[0] if len(potentials) == 1 else torch.cat(potentials)).to(v.dtype)
        return torch.zeros_like(v).index_add(0, atoms, COULOMB_CONSTANT * (mesh + local))

    return mesh_and_constant
