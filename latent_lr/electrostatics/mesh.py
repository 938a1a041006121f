"""Reciprocal-space energy on a mesh: smooth particle-mesh Ewald (SPME).

Essmann et al., J. Chem. Phys. 103, 8577 (1995).  The Ewald reciprocal sum

    E_k = (2π / V) Σ_{k ≠ 0} exp(-k² / 4α²) / k² |S(k)|²     (units of k_e)

is evaluated with the structure factor S(k) interpolated by cardinal B-splines
M_p of order p on a K1 × K2 × K3 mesh over the cell:

    Q(n) = Σ_i q_i Π_a M_p(u_ia - n_a),    u_ia = K_a s_ia  (s = fractional coordinates),
    E_k ≈ Σ_{m ≠ 0} θ(m) |FFT(Q)(m)|²,    θ(m) = (2π/V) exp(-k²/4α²) / k² Π_a |b_a(m_a)|²,

with k = 2π m @ inv(cell).T and the Euler exponential-spline factors
|b_a(m)|⁻² = |Σ_{j=0}^{p-2} M_p(j+1) exp(2πi m j / K_a)|².

Everything is plain torch, so autograd gives forces, stress (the cell enters
through the fractional coordinates, the wave vectors and the volume), charge
and α gradients, and double backward.  Grid indices are index data (computed
without gradients); the spline weights carry the gradients.  In eager mode the
mesh sum Σ θ |FFT(Q)|² has its own backward (:class:`_MeshEnergy`: the mesh
potential by one inverse real FFT, instead of autograd through ``rfftn`` and
|·|²), and with an engine state θ is reused between calls when neither the cell
nor α requires a gradient (:func:`_cached_influence`, kept in
:class:`.state.EngineState`); TorchScript runs the plain expression.

Batching: every structure has its own mesh.  All charges of all structures are
spread by one ``index_add`` into one flat buffer in which the structures are
laid out group by group, a group being the structures that share a mesh shape;
then one batched ``rfftn`` per group.  The only Python loop is over the
distinct mesh shapes (mesh sizes come from a small set of FFT-friendly numbers,
see :mod:`latent_lr.electrostatics.parameters`, so there are few).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Optional

import torch


def bspline_weights(t: torch.Tensor, order: int) -> torch.Tensor:
    """Cardinal B-spline values ``M_p(t + j)`` for ``j = 0 .. p-1``.

    Uses the recursion M_n(x) = [x M_{n-1}(x) + (n - x) M_{n-1}(x - 1)] / (n - 1)
    from M_2(x) = 1 - |x - 1|; polynomial in ``t``, so differentiable to any order.

    Args:
        t: (...) fractional offsets in [0, 1) from the mesh point below.
        order: spline order p ≥ 2.

    Returns:
        (..., p) weights, summing to 1 over the last dimension.
    """
    return _bspline_recursion(t, order)[-1]


def bspline_weights_and_derivatives(t: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_p(t + j), M_p'(t + j)) for j = 0 .. p-1, p ≥ 3, from one recursion: M_p'(x) = M_{p-1}(x) − M_{p-1}(x − 1).

    Returns two (..., p) tensors (:func:`bspline_weights` and its derivative in t)."""
    lower, weights = _bspline_recursion(t, order)[-2:]
    zero = torch.zeros_like(lower[..., :1])
    return weights, torch.cat([lower, zero], -1) - torch.cat([zero, lower], -1)


def _bspline_recursion(t: torch.Tensor, order: int) -> list[torch.Tensor]:
    """[M_2, ..., M_order] at t + j (each (..., n)), by the recursion of :func:`bspline_weights`."""
    weights = [torch.stack([t, 1.0 - t], dim=-1)]
    for n in range(3, order + 1):
        previous = weights[-1]
        zero = torch.zeros_like(previous[..., :1])
        shift = torch.arange(n, dtype=t.dtype, device=t.device)
        x = t.unsqueeze(-1) + shift
        weights.append((
            x * torch.cat([previous, zero], dim=-1)
            + (n - x) * torch.cat([zero, previous], dim=-1)
        ) / (n - 1))
    return weights


def _spline_modulus(size: int, order: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """|b(m)|² for m = 0 .. size-1 along one mesh axis (0 where b is undefined)."""
    at_integers = bspline_weights(torch.zeros((), dtype=torch.float64), order)[1:]
    m = torch.arange(size, dtype=torch.float64)
    j = torch.arange(order - 1, dtype=torch.float64)
    phase = 2.0 * math.pi * m[:, None] * j[None, :] / size
    real = (at_integers * torch.cos(phase)).sum(-1)
    imag = (at_integers * torch.sin(phase)).sum(-1)
    denominator = real**2 + imag**2
    # Odd orders have a zero at the Nyquist frequency; that mode is dropped.
    modulus = torch.where(denominator > 1e-10, 1.0 / denominator.clamp_min(1e-10), torch.zeros_like(denominator))
    return modulus.to(dtype=dtype, device=device)


def influence_function(
    cell: torch.Tensor, alpha: torch.Tensor, shape: tuple[int, int, int], order: int
) -> torch.Tensor:
    """θ(m) on the half spectrum of ``rfftn`` (the weight 2 of the omitted half is
    :func:`_half_weights`).

    Args:
        cell: (G, 3, 3) cells sharing the mesh ``shape``, Å.
        alpha: (G,) Ewald splitting parameters, 1/Å.

    Returns:
        (G, K1, K2, K3 // 2 + 1) weights, 1/Å: energy / k_e per unit |FFT(Q)|² (Q in e).
    """
    dtype, device = cell.dtype, cell.device
    k1, k2, k3 = shape
    m1 = torch.fft.fftfreq(k1, 1.0 / k1, dtype=dtype, device=device)
    m2 = torch.fft.fftfreq(k2, 1.0 / k2, dtype=dtype, device=device)
    m3 = torch.arange(k3 // 2 + 1, dtype=dtype, device=device)
    reciprocal = 2.0 * math.pi * torch.linalg.inv(cell).transpose(1, 2)
    metric = torch.bmm(reciprocal, reciprocal.transpose(1, 2))[:, :, :, None, None, None]
    x, y, z = m1[:, None, None], m2[None, :, None], m3[None, None, :]
    k_squared = (
        metric[:, 0, 0] * x * x
        + metric[:, 1, 1] * y * y
        + metric[:, 2, 2] * z * z
        + 2.0 * (metric[:, 0, 1] * x * y + metric[:, 0, 2] * x * z + metric[:, 1, 2] * y * z)
    )
    nonzero = k_squared > 0
    safe = torch.where(nonzero, k_squared, torch.ones_like(k_squared))
    volume = torch.linalg.det(cell).abs()
    gaussian = torch.exp(-safe / (4.0 * alpha[:, None, None, None] ** 2)) / safe
    gaussian = torch.where(nonzero, gaussian, torch.zeros_like(gaussian))

    modulus = (
        _spline_modulus(k1, order, dtype, device)[:, None, None]
        * _spline_modulus(k2, order, dtype, device)[None, :, None]
        * _spline_modulus(k3, order, dtype, device)[: k3 // 2 + 1][None, None, :]
    )
    return (2.0 * math.pi / volume)[:, None, None, None] * (gaussian * modulus)


def _half_weights(k3: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(K3 // 2 + 1,) weights of the ``rfftn`` half spectrum: 2 for the modes whose
    conjugate partner is omitted, 1 for m3 = 0 and (even K3) the Nyquist plane."""
    half = torch.full((k3 // 2 + 1,), 2.0, dtype=dtype, device=device)
    half[0] = 1.0
    if k3 % 2 == 0:
        half[-1] = 1.0
    return half


@torch.jit.unused
def _cached_influence(
    cell: torch.Tensor,
    alpha: torch.Tensor,
    shape: tuple[int, int, int],
    order: int,
    cache: Dict[str, torch.Tensor],
    capacity: int,
) -> torch.Tensor:
    """:func:`influence_function`, reused from ``cache`` when neither ``cell`` nor ``alpha``
    requires a gradient (keyed on their exact values, mesh, order, dtype and
    device; at most ``capacity`` entries, least recently used dropped first);
    recomputed otherwise, so stress and alpha gradients are exact.

    ``cache`` is an :class:`.state.EngineState`'s ``influence`` dictionary
    (insertion order is recency order).
    """
    if cell.requires_grad or alpha.requires_grad or capacity <= 0:
        return influence_function(cell, alpha, shape, order)
    key = "|".join(
        (
            cell.detach().cpu().numpy().tobytes().hex(),
            alpha.detach().cpu().numpy().tobytes().hex(),
            str(shape),
            str(order),
            str(cell.dtype),
            str(cell.device),
        )
    )
    theta = cache.pop(key, None)
    if theta is None:
        theta = influence_function(cell, alpha, shape, order)
    cache[key] = theta  # (re)inserted last: most recently used
    while len(cache) > capacity:
        del cache[next(iter(cache))]
    return theta


class _MeshEnergy(torch.autograd.Function):
    """E_g = Σ_m half(m3) θ_g(m) |rfftn(Q_g)(m)|² with a one-FFT backward.

    The gradient with respect to the mesh is the mesh potential
    dE/dQ = 2 irfftn(θ rfftn(Q)) (unnormalised inverse), one real-to-complex
    FFT less and no complex intermediates compared with autograd through
    ``rfftn`` and |·|².  The backward is written with differentiable torch
    operations (recomputing rfftn(Q) on the graph when a graph is being
    built), so double backward works.
    """

    @staticmethod
    def forward(ctx, grid: torch.Tensor, theta: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfftn(grid, dim=(1, 2, 3))
        ctx.save_for_backward(grid, theta, half)
        ctx.spectrum = spectrum
        return _weighted_power(spectrum, theta * half)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grid, theta, half = ctx.saved_tensors
        spectrum = torch.fft.rfftn(grid, dim=(1, 2, 3)) if torch.is_grad_enabled() else ctx.spectrum  # kept: retain_graph
        scale = grad[:, None, None, None]
        grad_grid = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_grid = mesh_potential(spectrum, theta * scale, list(grid.shape[1:]))
        if ctx.needs_input_grad[1]:
            real = torch.view_as_real(spectrum)
            grad_theta = (scale * half) * (real[..., 0] ** 2 + real[..., 1] ** 2)
        return grad_grid, grad_theta, None


def _weighted_power(spectrum: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_m weight(m) |spectrum(m)|² per structure: one product and a dot product of the
    real views (a reduction over the length-2 real/imaginary axis is slow)."""
    rows = spectrum.shape[0]
    real = torch.view_as_real(spectrum).reshape(rows, -1, 1)
    weighted = (torch.view_as_real(spectrum) * weight.unsqueeze(-1)).reshape(rows, 1, -1)
    return torch.bmm(weighted, real).reshape(rows)


@torch.jit.unused
def _mesh_energy(grid: torch.Tensor, theta: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Eager-mode :class:`_MeshEnergy` (TorchScript differentiates rfftn directly)."""
    return _MeshEnergy.apply(grid, theta, half)


def mesh_layout(
    mesh_shapes: list[tuple[int, int, int]], device: torch.device
) -> tuple[list[tuple[int, int, int]], list[list[int]], torch.Tensor, int]:
    """How R structures' meshes are laid out in one flat buffer, group by group of equal shape.

    Returns:
        (distinct shapes, the structures of each shape, (R,) offset of each structure's
        mesh in the buffer, buffer length).
    """
    shapes: list[tuple[int, int, int]] = []
    groups: list[list[int]] = []
    for row in range(len(mesh_shapes)):
        group = -1
        for index, shape in enumerate(shapes):
            if shape == mesh_shapes[row]:
                group = index
        if group < 0:
            shapes.append(mesh_shapes[row])
            groups.append([row])
        else:
            groups[group].append(row)
    offsets = [0] * len(mesh_shapes)
    cursor = 0
    for shape, rows in zip(shapes, groups):
        for row in rows:
            offsets[row] = cursor
            cursor += shape[0] * shape[1] * shape[2]
    return shapes, groups, torch.tensor(offsets, dtype=torch.long, device=device), cursor


def spline_points(
    positions: torch.Tensor,
    cell: torch.Tensor,
    atom_row: torch.Tensor,
    mesh_shapes: list[tuple[int, int, int]],
    offset: torch.Tensor,
    order: int,
    index_dtype: torch.dtype = torch.long,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The p³ mesh points each atom's B-spline touches, and its offsets from the point below.

    Args:
        positions: (M, 3) positions, Å; cell: (R, 3, 3) lattice vectors as rows, Å.
        atom_row: (M,) structure of each atom; mesh_shapes, offset: from :func:`mesh_layout`.
        order: B-spline order p.
        index_dtype: dtype of ``flat`` (int32 halves the memory of large supports; meshes below 2³¹ points).

    Returns:
        flat: (M, p, p, p) indices into the flat mesh buffer (index data; point (a, b, c)
        lies ``a, b, c`` mesh steps below the scaled position along each axis);
        t: (M, 3) offsets in [0, 1), differentiable in positions and cell (the weight of
        point ``below − j`` along an axis is M_p(t + j), :func:`bspline_weights`).
    """
    device, dtype = positions.device, positions.dtype
    mesh = torch.tensor([list(shape) for shape in mesh_shapes], dtype=torch.long, device=device)
    mesh = mesh.reshape(len(mesh_shapes), 3)
    fractional = torch.bmm(positions.unsqueeze(1), torch.linalg.inv(cell)[atom_row]).squeeze(1)
    atom_mesh = mesh[atom_row]
    scaled = fractional * atom_mesh.to(dtype)
    below = torch.floor(scaled.detach())
    steps = torch.arange(order, device=device)
    point = torch.remainder(below.long().unsqueeze(-1) - steps, atom_mesh.unsqueeze(-1))
    strides = torch.stack(
        [atom_mesh[:, 1] * atom_mesh[:, 2], atom_mesh[:, 2], torch.ones_like(atom_mesh[:, 2])], dim=1
    )
    point = (point * strides.unsqueeze(-1)).to(index_dtype)
    plane = offset[atom_row].to(index_dtype)[:, None, None] + point[:, 0, :, None] + point[:, 1, None, :]
    flat = plane[:, :, :, None] + point[:, 2, None, None, :]
    return flat, scaled - below


def structure_spline_points(
    positions: torch.Tensor, cell: torch.Tensor, shape: tuple[int, int, int], order: int,
    index_dtype: torch.dtype = torch.long,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`spline_points` of one structure on its own C-ordered mesh.

    Args:
        positions: (n, 3) Å; cell: (3, 3) lattice vectors as rows, Å; shape: mesh (K1, K2, K3);
        order: B-spline order p; index_dtype: as :func:`spline_points`.

    Returns:
        flat (n, p, p, p) indices into the mesh; t (n, 3) offsets (as :func:`spline_points`).
    """
    rows = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
    start = torch.zeros(1, dtype=torch.long, device=positions.device)
    return spline_points(positions, cell.unsqueeze(0), rows, [shape], start, order, index_dtype)


def spread_charges(charges: torch.Tensor, flat: torch.Tensor, weights: torch.Tensor, size: int) -> torch.Tensor:
    """Q(n) = Σ_i q_i Π_a M_p(u_ia - n_a): charges (M,) e spread on a flat mesh buffer of ``size`` points."""
    order = weights.shape[2]
    # Outer products by bmm: their backward is bmm too, cheaper than broadcast reductions.
    spread = torch.bmm((charges[:, None] * weights[:, 0]).unsqueeze(2), weights[:, 1].unsqueeze(1))
    spread = torch.bmm(spread.reshape(-1, order * order, 1), weights[:, 2].unsqueeze(1))
    # In place on a fresh buffer: the out-of-place index_add would copy it first.
    return weights.new_zeros(size).index_add_(0, flat.reshape(-1), spread.reshape(-1))


def interpolation_matrix(points: torch.Tensor, weights: torch.Tensor, n_points: int) -> torch.Tensor:
    """The (R, n_points) CSR matrix whose row r holds ``weights[r]`` at the mesh points ``points[r]``.

    Args: points (R, t) or (R t,) flat mesh indices (int32 halves the index traffic of each product);
    weights (R, t), every row the same length t (an atom's p³ spline terms); n_points: mesh size.
    ``matrix @ potential`` interpolates a mesh potential at the rows (as :func:`interpolate_mesh`).
    """
    rows, terms = weights.shape
    starts = torch.arange(rows + 1, device=weights.device, dtype=points.dtype) * terms
    with warnings.catch_warnings():  # torch's one-time "sparse CSR support is in beta" notice
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            starts, points.reshape(-1), weights.reshape(-1), (rows, n_points), check_invariants=False
        )


def spreading_matrix(points: torch.Tensor, weights: torch.Tensor, n_points: int) -> torch.Tensor:
    """The (n_points, R) CSR transpose of :func:`interpolation_matrix`: ``matrix @ values`` spreads values (R,)
    with the weights onto the mesh.  Cheaper than a scatter (``index_add_``) where many rows share few mesh
    points (a coarse mesh); its set-up is a sort of the R t entries."""
    rows, terms = weights.shape
    atoms = torch.div(torch.arange(rows * terms, device=weights.device), terms, rounding_mode="floor")
    return csr_from_entries(points.reshape(-1).long(), atoms, weights.reshape(-1), (n_points, rows))


def csr_from_entries(
    rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """The CSR matrix of ``shape`` with ``values`` at (``rows``, ``columns``) (long index tensors, no repeated
    entry), int32 indices."""
    order = torch.argsort(rows * shape[1] + columns)
    starts = torch.zeros(shape[0] + 1, dtype=torch.long, device=values.device)
    starts[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    with warnings.catch_warnings():  # torch's one-time "sparse CSR support is in beta" notice
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            starts.to(torch.int32), columns[order].to(torch.int32), values[order], shape, check_invariants=False
        )


def interpolate_mesh(values: torch.Tensor, flat: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_n values(n) Π_a M_p(u_ia - n_a) at each atom (M,): the transpose of :func:`spread_charges`
    (with ``values`` the mesh potential ∂E/∂Q, the atoms' potentials ∂E/∂q_i)."""
    stencil = weights[:, 0, :, None, None] * weights[:, 1, None, :, None] * weights[:, 2, None, None, :]
    return (values[flat] * stencil).sum((1, 2, 3))


def mesh_potential(spectrum: torch.Tensor, theta: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """∂E/∂Q = 2 irfftn(θ rfftn(Q)) (unnormalised inverse) from the half spectrum (G, K1, K2, K3//2+1)
    of the meshes (G, *shape), for E = Σ_m half(m3) θ(m) |rfftn(Q)(m)|²."""
    # Real view: a complex × real product would first convert θ to complex.
    potential = torch.view_as_real(spectrum) * (2.0 * theta).unsqueeze(-1)
    return torch.fft.irfftn(torch.view_as_complex(potential), s=shape, dim=(1, 2, 3), norm="forward")


def solve_mesh(
    grid: torch.Tensor,
    cell: torch.Tensor,
    alpha: torch.Tensor,
    order: int,
    influence_cache: Optional[Dict[str, torch.Tensor]] = None,
    influence_cache_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve G meshes of one shape: energies, mesh potentials and weighted powers (no autograd graph needed).

    Args:
        grid: (G, K1, K2, K3) spread charges Q, e; cell: (G, 3, 3) Å; alpha: (G,) 1/Å;
        order: B-spline order; influence_cache, influence_cache_size: as in :func:`spme_reciprocal_energy`.

    Returns:
        energy (G,) / k_e; potential ∂E/∂Q (G, K1, K2, K3) / k_e; power half(m3) |rfftn(Q)|²
        (G, K1, K2, K3 // 2 + 1), so that energy = Σ influence_function · power for any cell.
    """
    shape = (grid.shape[1], grid.shape[2], grid.shape[3])
    spectrum = torch.fft.rfftn(grid, dim=(1, 2, 3))
    if influence_cache is None:
        theta = influence_function(cell, alpha, shape, order)
    else:
        theta = _cached_influence(cell, alpha, shape, order, influence_cache, influence_cache_size)
    power = _half_weights(shape[2], grid.dtype, grid.device) * torch.view_as_real(spectrum).pow(2).sum(-1)
    energy = (theta * power).sum((1, 2, 3))
    return energy, mesh_potential(spectrum, theta, list(shape)), power


def spme_reciprocal_energy(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: torch.Tensor,
    atom_row: torch.Tensor,
    mesh_shapes: list[tuple[int, int, int]],
    alpha: torch.Tensor,
    order: int,
    influence_cache: Optional[Dict[str, torch.Tensor]] = None,
    influence_cache_size: int = 0,
) -> torch.Tensor:
    """SPME reciprocal-space energy of each periodic structure, in units of k_e (e²/Å).

    Args:
        positions: (M, 3) positions of the atoms of the R periodic structures, Å.
        charges: (M,) their charges, e.
        cell: (R, 3, 3) lattice vectors as rows, Å.
        atom_row: (M,) which of the R structures each atom belongs to.
        mesh_shapes: R mesh shapes (K1, K2, K3), one per structure.
        alpha: (R,) Ewald splitting parameters, 1/Å.
        order: B-spline order p ≥ 2 (a mesh smaller than p wraps correctly).
        influence_cache: where to keep influence functions between calls
            (an :class:`.state.EngineState`'s ``influence``); None recomputes
            them (no state is kept).  Ignored under TorchScript.
        influence_cache_size: most entries kept in ``influence_cache``.

    Returns:
        (R,) energies divided by k_e.  The k = 0 term is omitted.
    """
    device, dtype = positions.device, positions.dtype
    n_rows = len(mesh_shapes)
    shapes, groups, offset, cursor = mesh_layout(mesh_shapes, device)
    flat, t = spline_points(positions, cell, atom_row, mesh_shapes, offset, order)
    grid = spread_charges(charges, flat, bspline_weights(t, order), cursor)

    energy = positions.new_zeros(n_rows)
    start = 0
    for shape, rows in zip(shapes, groups):
        size = len(rows) * shape[0] * shape[1] * shape[2]
        # One group: the whole buffer, no slice (whose backward fills a zero buffer).
        flat_block = grid if size == cursor else grid[start : start + size]
        block = flat_block.reshape(len(rows), shape[0], shape[1], shape[2])
        start += size
        rows_tensor = torch.tensor(rows, dtype=torch.long, device=device)
        half = _half_weights(shape[2], dtype, device)
        if torch.jit.is_scripting():
            theta = influence_function(cell[rows_tensor], alpha[rows_tensor], shape, order)
            spectrum = torch.fft.rfftn(block, dim=(1, 2, 3))
            power = spectrum.real**2 + spectrum.imag**2
            contribution = (theta * half * power).sum((1, 2, 3))
        else:
            if influence_cache is None:
                theta = influence_function(cell[rows_tensor], alpha[rows_tensor], shape, order)
            else:
                theta = _cached_influence(
                    cell[rows_tensor], alpha[rows_tensor], shape, order, influence_cache, influence_cache_size
                )
            contribution = _mesh_energy(block, theta, half)
        energy = energy.index_add(0, rows_tensor, contribution)
    return energy
