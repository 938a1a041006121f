"""Checking and normalising the inputs of :func:`latent_lr.coulomb_energy`.

Every check raises :class:`ValueError` (or :class:`NotImplementedError` for
features that do not exist yet) with a message that names the problem and the
fix, so that bad input never surfaces as a NaN or a deep torch traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

#: Smallest perpendicular width (Å) accepted for a periodic cell.  Anything
#: thinner cannot hold atoms at physical distances and is almost always a units
#: mistake (nm instead of Å) or an uninitialised cell.
MIN_CELL_WIDTH = 1.0

#: Two point charges closer than this (Å) are treated as overlapping.
OVERLAP_DISTANCE = 1e-4

PbcLike = Union[bool, torch.Tensor, None]


def require_autograd(function: str) -> None:
    """Raise if ``function`` (which differentiates the energy internally) runs under torch.inference_mode()."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{function} differentiates the Coulomb energy internally and cannot run under "
            "torch.inference_mode() (the result would be silently wrong); use torch.no_grad() instead."
        )


@dataclass
class Structures:
    """Validated, normalised description of a batch of structures.

    Attributes:
        positions: (N, 3) Cartesian positions in Å.
        charges: (N,) charges in e.
        cell: (B, 3, 3) lattice vectors as rows, in Å (zeros where open).
        pbc: (B, 3) periodicity flags.
        batch: (N,) structure index of every atom, sorted, covering 0..B-1.
        n_structures: B.
        counts: (B,) number of atoms per structure.
        periodic: (B,) True where a structure is periodic in all three directions.
        slab: (B,) True where a structure is a slab, pbc = (True, True, False):
            periodic along the first two cell vectors, open along the third.
    """

    positions: torch.Tensor
    charges: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    batch: torch.Tensor
    n_structures: int
    counts: torch.Tensor
    periodic: torch.Tensor
    slab: torch.Tensor


def _fail(message: str) -> None:
    raise ValueError(message)


def _check_tensor(name: str, value, dtype_kind: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        _fail(
            f"{name} must be a torch.Tensor, got {type(value).__name__}; "
            f"convert it with torch.as_tensor({name}, dtype=torch.float64)."
        )
    if dtype_kind == "float" and not value.dtype.is_floating_point:
        _fail(
            f"{name} has dtype {value.dtype}; it must be float32 or float64 "
            f"(call {name}.double() or {name}.float())."
        )
    if dtype_kind == "float" and value.dtype not in (torch.float32, torch.float64):
        _fail(f"{name} has dtype {value.dtype}; only float32 and float64 are supported.")
    return value


def _normalise_pbc(pbc: PbcLike, n_structures: int, device: torch.device) -> torch.Tensor:
    if pbc is None:
        return torch.zeros(n_structures, 3, dtype=torch.bool, device=device)
    if isinstance(pbc, bool):
        return torch.full((n_structures, 3), pbc, dtype=torch.bool, device=device)
    pbc = torch.as_tensor(pbc, device=device).to(torch.bool)
    if pbc.shape == (3,):
        return pbc.expand(n_structures, 3).clone()
    if pbc.shape == (n_structures, 3):
        return pbc
    _fail(
        f"pbc has shape {tuple(pbc.shape)}; expected a bool, shape (3,) or "
        f"shape (n_structures, 3) = ({n_structures}, 3)."
    )
    raise AssertionError  # unreachable


def validate_structures(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: Optional[torch.Tensor],
    pbc: PbcLike,
    batch: Optional[torch.Tensor],
) -> Structures:
    """Check every input and return a :class:`Structures` in normal form."""
    positions = _check_tensor("positions", positions, "float")
    charges = _check_tensor("charges", charges, "float")
    if positions.ndim != 2 or positions.shape[1] != 3:
        _fail(f"positions has shape {tuple(positions.shape)}; expected (n_atoms, 3) in Å.")
    n_atoms = positions.shape[0]
    if n_atoms == 0:
        _fail("positions holds zero atoms; pass at least one atom per structure.")
    if charges.shape != (n_atoms,):
        _fail(
            f"charges has shape {tuple(charges.shape)} but positions has {n_atoms} atoms; "
            f"expected charges of shape ({n_atoms},) in e."
        )
    if charges.dtype != positions.dtype:
        _fail(
            f"charges ({charges.dtype}) and positions ({positions.dtype}) must share one dtype; "
            "cast one of them."
        )
    if charges.device != positions.device:
        _fail(
            f"charges are on {charges.device} but positions on {positions.device}; "
            "move them to the same device."
        )
    if not torch.isfinite(positions).all():
        bad = torch.nonzero(~torch.isfinite(positions).all(dim=1)).flatten()[:5].tolist()
        _fail(f"positions contain NaN or inf (atoms {bad}); every coordinate must be finite.")
    if not torch.isfinite(charges).all():
        bad = torch.nonzero(~torch.isfinite(charges)).flatten()[:5].tolist()
        _fail(f"charges contain NaN or inf (atoms {bad}); every charge must be finite.")

    device = positions.device
    if batch is None:
        batch = torch.zeros(n_atoms, dtype=torch.long, device=device)
    else:
        if not isinstance(batch, torch.Tensor) or batch.dtype not in (
            torch.int64,
            torch.int32,
        ):
            _fail("batch must be an integer tensor (torch.long) of shape (n_atoms,).")
        if batch.shape != (n_atoms,):
            _fail(
                f"batch has shape {tuple(batch.shape)}; expected ({n_atoms},), one structure "
                "index per atom."
            )
        if batch.device != device:
            _fail(f"batch is on {batch.device} but positions on {device}; move it.")
        batch = batch.long()
        if bool((batch < 0).any()):
            _fail("batch contains negative structure indices; use 0..n_structures-1.")
        if n_atoms > 1 and bool((batch[1:] < batch[:-1]).any()):
            _fail(
                "batch is not sorted: the atoms of each structure must be contiguous, "
                "with structure indices 0..B-1 in increasing order "
                "(sort atoms by structure first)."
            )

    n_from_batch = int(batch.max().item()) + 1
    if cell is not None:
        cell = _check_tensor("cell", cell, "float")
        if cell.dtype != positions.dtype:
            _fail(f"cell ({cell.dtype}) and positions ({positions.dtype}) must share one dtype.")
        if cell.device != device:
            _fail(f"cell is on {cell.device} but positions on {device}; move it.")
        if cell.shape == (3, 3):
            cell = cell.unsqueeze(0).expand(n_from_batch, 3, 3)
        elif cell.ndim != 3 or cell.shape[1:] != (3, 3):
            _fail(
                f"cell has shape {tuple(cell.shape)}; expected (3, 3) or (n_structures, 3, 3) "
                "with lattice vectors as rows."
            )
        if not torch.isfinite(cell).all():
            _fail("cell contains NaN or inf; every lattice vector must be finite.")
    n_structures = cell.shape[0] if cell is not None else n_from_batch
    counts = torch.bincount(batch, minlength=n_structures)
    if n_structures < n_from_batch:
        _fail(
            f"batch refers to {n_from_batch} structures but cell holds only {n_structures}; "
            "give one cell per structure."
        )
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten()[:5].tolist()
        _fail(
            f"structures {empty} have zero atoms: batch must use every index 0..B-1 "
            "contiguously (an empty structure has no electrostatic energy; drop it)."
        )
    if cell is None:
        cell = torch.zeros(n_structures, 3, 3, dtype=positions.dtype, device=device)

    pbc = _normalise_pbc(pbc, n_structures, device)
    slab = pbc[:, 0] & pbc[:, 1] & ~pbc[:, 2]
    partial = pbc.any(dim=1) & ~pbc.all(dim=1) & ~slab
    if bool((partial & (pbc.sum(dim=1) == 2)).any()):
        which = torch.nonzero(partial).flatten()[:5].tolist()
        _fail(
            f"structures {which} are slabs whose open axis is not the third cell vector; "
            "order the cell vectors so that pbc = (True, True, False), the third vector "
            "being the open axis perpendicular to the periodic plane."
        )
    if bool(partial.any()):
        which = torch.nonzero(partial).flatten()[:5].tolist()
        raise NotImplementedError(
            f"structures {which} are periodic in one direction only (wires); this partial "
            "periodicity is not supported. Use pbc=True with enough vacuum, or pbc=False."
        )
    periodic = pbc.all(dim=1)
    if bool(periodic.any()):
        _check_cells(cell[periodic], torch.nonzero(periodic).flatten())
    return Structures(positions, charges, cell, pbc, batch, n_structures, counts, periodic, slab)


def perpendicular_widths(cell: torch.Tensor) -> torch.Tensor:
    """Distances (Å) between opposite faces of each cell, shape (B, 3)."""
    volume = torch.linalg.det(cell).abs()
    cross = torch.stack(
        [
            torch.linalg.cross(cell[:, 1], cell[:, 2]),
            torch.linalg.cross(cell[:, 2], cell[:, 0]),
            torch.linalg.cross(cell[:, 0], cell[:, 1]),
        ],
        dim=1,
    )
    return volume.unsqueeze(1) / cross.norm(dim=2)


def _check_cells(cell: torch.Tensor, indices: torch.Tensor) -> None:
    with torch.no_grad():
        volume = torch.linalg.det(cell.double())
        lengths = cell.double().norm(dim=2).prod(dim=1)
        singular = volume.abs() <= 1e-8 * lengths.clamp_min(1e-300)
        if bool(singular.any()):
            which = indices[singular][:5].tolist()
            _fail(
                f"the cell of structures {which} is singular (zero volume) but pbc is on; "
                "give three linearly independent lattice vectors (rows) or set pbc=False."
            )
        widths = perpendicular_widths(cell.double()).min(dim=1).values
        thin = widths < MIN_CELL_WIDTH
        if bool(thin.any()):
            which = indices[thin][:5].tolist()
            _fail(
                f"the cell of structures {which} is too small: its thinnest width is "
                f"{widths[thin].min().item():.3g} Å, below {MIN_CELL_WIDTH} Å. Cells are in Å "
                "(check for nm or fractional units)."
            )
