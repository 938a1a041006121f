"""A stand-in for a CACE model that keeps CACE's data contract but not its physics.

CACE (Cartesian Atomic Cluster Expansion, github.com/BingqingCheng/cace) is
not on PyPI (the PyPI name ``cace`` belongs to an unrelated project) and is
licensed CC BY-NC 4.0, so CI cannot install it; ``tests/test_adapter_cace_real.py``
runs the adapter against the real package where it is installed.  The CI tests
need something to run against, so this module rebuilds the *interface* of a
CACE potential from scratch, following the behaviour of the package at commit
19ae23c (read, not copied):

* the input is a plain ``dict[str, Tensor]`` with CACE's key names, shapes and
  dtypes (what CACE's trainer produces with ``Batch.to_dict()``);
* the representation writes its per-atom invariants under ``"node_feats"`` as a
  5-D tensor laid out the way CACE lays them out;
* an atom-wise read-out sums per-atom energies into one energy per structure
  under an ``output_key`` (CACE's examples use ``"CACE_energy"``);
* forces (and, on request, stress and virials) come from autograd of that
  energy with respect to ``data["positions"]`` and a symmetric strain
  ("displacement"), written under configurable keys.

The numbers inside are deliberately simple (Gaussian radial functions, element
embeddings and fully contracted Cartesian moment tensors); they are smooth and
invariant to rotations, translations and permutations of like atoms, which is
all an adapter test needs.  Nothing here is copied from CACE.

Where the contract is defined upstream (paths inside BingqingCheng/cace):

==========================================  ==============================================
``cace/data/atomic_data.py``                per-structure tensors built from ``ase.Atoms``
``cace/data/neighborhood.py``               neighbour list (matscipy, ``"ijS"``), shift convention
``cace/tools/torch_geometric/batch.py``     batching: index offsets, ``batch``, ``ptr``
``cace/tools/torch_geometric/data.py``      ``to_dict`` keeps only keys whose value is not None
``cace/modules/preprocess.py``              strain ("displacement") set-up for stress
``cace/modules/utils.py``                   edge vectors, symmetric strain, forces/virials/stress
``cace/representations/cace_representation.py``  ``Cace.forward`` and its returned dict
``cace/modules/symmetrize_basis.py``        size of the angular (B-basis) axis
``cace/modules/angular_tools.py``           which (l, nu) combinations exist
``cace/modules/atomwise.py``                read-out: flattens ``node_feats`` to (N, F)
``cace/modules/forces.py``                  ``Forces`` output module and its keys
``cace/models/atomistic.py``                ``NeuralNetworkPotential.forward`` order of work
==========================================  ==============================================

Units follow ASE: positions, cell and cutoff in Å; energy in the units of the
training labels (eV in practice, usually with per-element reference energies
removed); forces in energy/Å; stress in energy/Å^3.

Run ``python tests/cace_contract.py`` for a self-check.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from ase import Atoms
from ase.neighborlist import primitive_neighbor_list
from torch import nn
from torch.nn import functional

__all__ = [
    "CACE_INPUT_KEYS",
    "CACE_REPRESENTATION_OUTPUT_KEYS",
    "cace_angular_combinations",
    "cace_n_angular_sym",
    "cace_feature_dim",
    "cace_style_neighbours",
    "make_cace_batch",
    "refresh_shifts",
    "flatten_node_feats",
    "Preprocess",
    "CaceContractRepresentation",
    "Atomwise",
    "Forces",
    "CaceContractModel",
]

#: Keys present in the dict CACE's trainer and ASE calculator hand to the model
#: (``Batch.to_dict()`` drops keys whose value is None, and ``num_nodes`` /
#: ``num_graphs`` are attributes, not entries).  Label keys such as ``energy``,
#: ``forces`` and ``stress`` are added only when the structures carry them.
CACE_INPUT_KEYS = (
    "atomic_numbers",  # (N,) int64
    "positions",  # (N, 3) float, Å
    "cell",  # (3 * B, 3) float, Å: the B 3x3 cells stacked row-wise
    "batch",  # (N,) int64 structure index of each atom
    "ptr",  # (B + 1,) int64 first-atom offsets, ptr[-1] == N
    "edge_index",  # (2, E) int64, row 0 sender, row 1 receiver (global indices)
    "shifts",  # (E, 3) float, Å: Cartesian image offset of each edge
    "unit_shifts",  # (E, 3) float (integer-valued): image offset in lattice units
)

#: What CACE's representation returns: a new dict with exactly these entries,
#: so modules running after it see nothing else of the input.
CACE_REPRESENTATION_OUTPUT_KEYS = ("positions", "cell", "displacement", "batch", "node_feats")


# ----------------------------------------------------------------------------
# Sizes of CACE's feature tensor
# ----------------------------------------------------------------------------


def cace_angular_combinations(max_l: int, max_nu: int) -> List[Tuple[int, ...]]:
    """Labels of the slots on the angular axis of CACE's ``node_feats``.

    CACE's symmetriser keeps one rotation-invariant slot per group below
    (upstream: ``cace/modules/angular_tools.py`` builds the groups and
    ``cace/modules/symmetrize_basis.py`` stacks them, body order first):

    * nu = 1: a single slot, label ``(0,)``;
    * nu = 2: one slot per ``l`` in 1..max_l, label ``(l,)``;
    * nu = 3: one slot per pair ``l1 <= l2`` with ``l1 >= 1`` and ``l1 + l2 <= max_l``;
    * nu = 4: one slot per triple ``(l1, l2, dl)`` with ``1 <= l1 < l2``,
      ``dl >= 1`` and ``l2 + dl <= max_l``.

    The upstream symmetriser refuses max_nu > 4.  The order of slots inside one
    nu block is this module's own; only the count and the blocking by nu matter
    for the contract.
    """
    if max_nu < 1 or max_nu > 4:
        raise ValueError(f"CACE supports 1 <= max_nu <= 4, got {max_nu}.")
    if max_l < 0:
        raise ValueError(f"max_l must be >= 0, got {max_l}.")
    slots: List[Tuple[int, ...]] = [(0,)]
    if max_nu >= 2:
        slots += [(l,) for l in range(1, max_l + 1)]
    if max_nu >= 3:
        slots += [
            (l1, l2)
            for l1 in range(1, max_l + 1)
            for l2 in range(l1, max_l + 1)
            if l1 + l2 <= max_l
        ]
    if max_nu >= 4:
        slots += [
            (l1, l2, dl)
            for l1 in range(1, max_l + 1)
            for l2 in range(l1 + 1, max_l + 1)
            for dl in range(1, max_l + 1)
            if l2 + dl <= max_l
        ]
    return slots


def cace_n_angular_sym(max_l: int, max_nu: int) -> int:
    """Length of the angular axis of ``node_feats`` (e.g. 6 for max_l=3, max_nu=3)."""
    return len(cace_angular_combinations(max_l, max_nu))


def cace_feature_dim(representation: nn.Module) -> int:
    """F such that ``node_feats.reshape(N, -1)`` is (N, F), from a representation's settings.

    Works for this module's stand-in and, by attribute name, for a real
    ``cace.representations.Cace`` (attributes ``n_radial_basis``, ``max_l``,
    ``max_nu``, ``n_atom_basis``, ``num_message_passing``).  For a real CACE
    model a dry run on a tiny structure is the safer check.  When the object
    has CACE's ``symmetrizer.vec_dict_allnu`` (one dict of groups per body order
    nu >= 2), the angular length is counted from it instead of recomputed.
    """
    r = int(representation.n_radial_basis)
    groups = getattr(getattr(representation, "symmetrizer", None), "vec_dict_allnu", None)
    if isinstance(groups, dict):
        s = 1 + sum(len(per_nu) for nu, per_nu in groups.items() if nu >= 2)
    else:
        s = cace_n_angular_sym(int(representation.max_l), int(representation.max_nu))
    c = int(representation.n_atom_basis) ** 2
    layers = int(representation.num_message_passing) + 1
    return r * s * c * layers


def flatten_node_feats(node_feats: torch.Tensor) -> torch.Tensor:
    """(N, F) view of a CACE feature tensor, flattened exactly as CACE's read-outs do.

    CACE's ``Atomwise`` and ``LesWrapper`` both call ``reshape(n_nodes, -1)`` on
    the tensor stored under their ``feature_key`` (default ``"node_feats"``), so
    the feature order is C-order over (radial, angular, channel, layer).
    """
    return node_feats.reshape(node_feats.shape[0], -1)


# ----------------------------------------------------------------------------
# Building CACE-format input from ase.Atoms
# ----------------------------------------------------------------------------


def cace_style_neighbours(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: Sequence[bool],
    cutoff: float,
    backend: str = "matscipy",
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed neighbour pairs of one structure, following CACE's conventions.

    Mirrors what ``cace/data/neighborhood.py`` produces:

    * every ordered pair (i, j) closer than ``cutoff`` (Å), including an atom
      and its own periodic images, but not an atom paired with itself in the
      same image;
    * a cell that is all zeros (open boundaries) is replaced by a 1000 Å cube
      for the search only;
    * ``shifts = unit_shifts @ cell`` so that the edge vector is
      ``positions[j] - positions[i] + shifts`` with i the sender (row 0 of
      ``edge_index``) and j the receiver (row 1).

    Args:
        positions: (n, 3) Å.
        cell: (3, 3) lattice vectors as rows, Å (zeros for a molecule).
        pbc: three periodicity flags.
        cutoff: search radius, Å.
        backend: ``"matscipy"`` (what CACE uses), ``"ase"`` or ``"vesin"`` (same pairs).

    Returns:
        edge_index (2, E) int64, shifts (E, 3) float64 in Å, unit_shifts (E, 3) float64.
    """
    positions = np.asarray(positions, dtype=float)
    cell = np.asarray(cell, dtype=float).reshape(3, 3)
    pbc = tuple(bool(flag) for flag in pbc)
    search_cell = cell if np.any(cell != 0.0) else 1000.0 * np.eye(3)
    if backend == "matscipy":
        from matscipy.neighbours import neighbour_list

        i, j, unit = neighbour_list("ijS", positions=positions, cell=search_cell, pbc=pbc, cutoff=float(cutoff))
    elif backend == "ase":
        i, j, unit = primitive_neighbor_list(
            "ijS",
            pbc,
            search_cell,
            positions,
            float(cutoff),
            self_interaction=True,
            use_scaled_positions=False,
        )
    elif backend == "vesin":
        import vesin

        finder = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
        i, j, unit = finder.compute(positions, search_cell, list(pbc), quantities="ijS")
    else:
        raise ValueError(f"backend must be 'matscipy', 'ase' or 'vesin', got {backend!r}.")
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    unit = np.asarray(unit, dtype=np.int64).reshape(-1, 3)
    same_image_self = (i == j) & np.all(unit == 0, axis=1)
    keep = ~same_image_self
    i, j, unit = i[keep], j[keep], unit[keep]
    edge_index = np.stack([i, j]) if len(i) else np.zeros((2, 0), dtype=np.int64)
    unit_shifts = unit.astype(float)
    shifts = unit_shifts @ search_cell
    return edge_index, shifts, unit_shifts


def make_cace_batch(
    atoms_list: Union[Atoms, Sequence[Atoms]],
    cutoff: float,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    backend: str = "matscipy",
    with_labels: bool = False,
    include_num_graphs: bool = False,
) -> Dict[str, torch.Tensor]:
    """The dict a CACE model receives for a batch of ``ase.Atoms``.

    Equivalent to ``AtomicData.from_atoms`` on each structure, CACE's
    ``DataLoader`` collation, then ``Batch.to_dict()`` (upstream:
    ``cace/data/atomic_data.py`` and ``cace/tools/torch_geometric/``).

    Keys (N atoms, E edges, B structures):

    * ``atomic_numbers`` (N,) int64.
    * ``positions`` (N, 3) float, Å.
    * ``cell`` (3B, 3) float, Å.  Each structure contributes its 3x3 cell
      (rows = lattice vectors; zeros for a molecule) and the blocks are
      concatenated along dim 0, so consumers call ``cell.view(-1, 3, 3)``.
    * ``batch`` (N,) int64, structure index of each atom, sorted.
    * ``ptr`` (B + 1,) int64, ``ptr[b]`` is the first atom of structure b.
      CACE derives the number of structures as ``ptr.numel() - 1``.
    * ``edge_index`` (2, E) int64, global atom indices (each structure's
      indices shifted by the atoms before it); row 0 sends, row 1 receives.
    * ``shifts`` (E, 3) float, Å, ``unit_shifts @ cell`` of the edge's structure.
    * ``unit_shifts`` (E, 3) float holding integers: lattice translation of the
      receiver's image.

    Args:
        atoms_list: one structure or a sequence of them.
        cutoff: neighbour cut-off, Å.  For a real model use
            ``model.representation.cutoff`` (what ``CACECalculator`` does).
        dtype: floating dtype; CACE uses ``torch.get_default_dtype()``.
        device: where to put the tensors.
        backend: neighbour search, ``"ase"`` or ``"vesin"``.
        with_labels: also add ``energy`` (B,), ``forces`` (N, 3) and ``stress``
            (B, 3, 3) read from ``atoms.info["energy"]``, ``atoms.arrays["forces"]``
            and ``atoms.info["stress"]`` (Voigt or 3x3), when every structure has them.
        include_num_graphs: add an int64 0-d ``num_graphs`` entry.  CACE's own
            dict has no such key (it is a Batch attribute); off by default.
    """
    if isinstance(atoms_list, Atoms):
        atoms_list = [atoms_list]
    atoms_list = list(atoms_list)
    if not atoms_list:
        raise ValueError("make_cace_batch needs at least one structure.")
    dtype = dtype or torch.get_default_dtype()

    numbers, positions, cells, batch, ptr = [], [], [], [], [0]
    edges, shifts, unit_shifts = [], [], []
    offset = 0
    for index, atoms in enumerate(atoms_list):
        n = len(atoms)
        pos = np.asarray(atoms.get_positions(), dtype=float)
        cell = np.asarray(atoms.get_cell(), dtype=float).reshape(3, 3)
        edge_index, edge_shift, edge_unit = cace_style_neighbours(
            pos, cell, atoms.get_pbc(), cutoff, backend=backend
        )
        numbers.append(np.asarray(atoms.get_atomic_numbers(), dtype=np.int64))
        positions.append(pos)
        cells.append(cell)
        batch.append(np.full(n, index, dtype=np.int64))
        edges.append(edge_index + offset)
        shifts.append(edge_shift)
        unit_shifts.append(edge_unit)
        offset += n
        ptr.append(offset)

    def floats(array) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array, dtype=float), dtype=dtype, device=device)

    def longs(array) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array, dtype=np.int64), dtype=torch.long, device=device)

    data: Dict[str, torch.Tensor] = {
        "atomic_numbers": longs(np.concatenate(numbers)),
        "positions": floats(np.concatenate(positions)),
        "cell": floats(np.concatenate(cells, axis=0)),
        "batch": longs(np.concatenate(batch)),
        "ptr": longs(ptr),
        "edge_index": longs(np.concatenate(edges, axis=1)),
        "shifts": floats(np.concatenate(shifts, axis=0)),
        "unit_shifts": floats(np.concatenate(unit_shifts, axis=0)),
    }
    if include_num_graphs:
        data["num_graphs"] = torch.tensor(len(atoms_list), dtype=torch.long, device=device)
    if with_labels:
        if all("energy" in atoms.info for atoms in atoms_list):
            data["energy"] = floats([float(atoms.info["energy"]) for atoms in atoms_list])
        if all("forces" in atoms.arrays for atoms in atoms_list):
            data["forces"] = floats(np.concatenate([atoms.arrays["forces"] for atoms in atoms_list]))
        if all("stress" in atoms.info for atoms in atoms_list):
            data["stress"] = floats(np.stack([_stress_matrix(atoms.info["stress"]) for atoms in atoms_list]))
    return data


def _stress_matrix(stress) -> np.ndarray:
    """3x3 stress from a 3x3 array or ASE Voigt order (xx, yy, zz, yz, xz, xy)."""
    stress = np.asarray(stress, dtype=float)
    if stress.shape == (3, 3):
        return stress
    xx, yy, zz, yz, xz, xy = stress.reshape(6)
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def refresh_shifts(data: Dict[str, torch.Tensor]) -> torch.Tensor:
    """(E, 3) Cartesian edge shifts recomputed from ``unit_shifts`` and the current cell.

    CACE's representation reads ``data["shifts"]`` and never looks at the cell
    itself, so after straining the cell (stress) the shifts must be rebuilt
    from ``unit_shifts``; CACE's ``Preprocess`` does this for its own stress.
    An adapter whose cell may carry gradients should always call this.
    """
    sender = data["edge_index"][0]
    cells = data["cell"].reshape(-1, 3, 3)
    return torch.einsum("ea,eab->eb", data["unit_shifts"].to(cells.dtype), cells[data["batch"][sender]])


def _number_of_structures(data: Dict[str, torch.Tensor]) -> int:
    ptr = data.get("ptr")
    if ptr is not None:
        return int(ptr.numel()) - 1
    batch = data.get("batch")
    if batch is not None and batch.numel() > 0:
        return int(batch.max()) + 1
    return 1


# ----------------------------------------------------------------------------
# Model pieces, named after the CACE modules whose role they play
# ----------------------------------------------------------------------------


class Preprocess(nn.Module):
    """Role of ``cace.modules.Preprocess``: set up a strain for stress/virials.

    With ``compute_stress`` or ``compute_virials`` it creates a zero (B, 3, 3)
    ``displacement`` that requires grad, applies its symmetric part to the
    positions and cells, rebuilds ``shifts`` from ``unit_shifts`` and writes
    ``positions``, ``cell`` (now (B, 3, 3), as CACE's ``get_symmetric_displacement``
    returns it), ``shifts`` and ``displacement`` back into the dict.
    Otherwise it only sets ``data["displacement"] = None``.  It mutates and
    returns the same dict, as CACE's does.
    """

    def forward(
        self,
        data: Dict[str, torch.Tensor],
        compute_stress: bool = False,
        compute_virials: bool = False,
    ) -> Dict[str, torch.Tensor]:
        if not (compute_stress or compute_virials):
            data["displacement"] = None
            return data
        positions = data["positions"]
        n_structures = _number_of_structures(data)
        displacement = torch.zeros(
            (n_structures, 3, 3), dtype=positions.dtype, device=positions.device, requires_grad=True
        )
        strain = 0.5 * (displacement + displacement.transpose(-1, -2))
        batch = data["batch"]
        data["positions"] = positions + torch.einsum("ni,nij->nj", positions, strain[batch])
        cells = data["cell"].reshape(-1, 3, 3)
        data["cell"] = cells + torch.matmul(cells, strain)
        data["shifts"] = refresh_shifts(data)
        data["displacement"] = displacement
        return data


class CaceContractRepresentation(nn.Module):
    """Role of ``cace.representations.Cace`` (``cace/representations/cace_representation.py``).

    Reads from the input dict: ``atomic_numbers``, ``positions``,
    ``edge_index``, ``shifts``, ``batch`` (may be None), ``cell`` and, if
    present, ``displacement``.  It never reads ``unit_shifts``: geometry comes
    from ``positions[receiver] - positions[sender] + shifts``.

    Returns a *new* dict with exactly :data:`CACE_REPRESENTATION_OUTPUT_KEYS`:

    * ``positions``, ``cell``, ``displacement`` passed through unchanged (the
      same tensor objects, so autograd w.r.t. them still works downstream);
    * ``batch`` (N,) int64 (zeros if the input had None);
    * ``node_feats`` of shape
      ``(N, n_radial_basis, n_angular_sym, n_atom_basis**2, num_message_passing + 1)``.

    Axis meaning in CACE: radial channels after its learnable radial mixing;
    rotation-invariant angular combinations (see
    :func:`cace_angular_combinations`); element channels from the outer product
    of sender and receiver element embeddings; one entry per message-passing
    stage (the initial features plus one per layer).  Here the same axes are
    filled with simpler invariants: element-weighted Gaussian radial moments
    ``M_l = sum_j g(r_ij) fc(r_ij) e_ij u_ij^{(x)l}`` fully contracted into
    scalars, and a cutoff-weighted neighbour average per extra layer.

    Args:
        zs: atomic numbers the model knows (CACE one-hot encodes these).
        n_atom_basis: element-embedding width; channel axis is its square.
        cutoff: Å.
        n_radial_basis: radial axis length.
        max_l, max_nu: set the angular axis length as in CACE.
        num_message_passing: extra stages on the last axis.
        avg_num_neighbors: divides neighbour sums, as CACE's normalisation does.
        seed: seed of a private generator for the initial weights (unlike CACE,
            the global torch RNG is left alone).
    """

    def __init__(
        self,
        zs: Sequence[int],
        n_atom_basis: int = 2,
        cutoff: float = 4.0,
        n_radial_basis: int = 6,
        max_l: int = 2,
        max_nu: int = 3,
        num_message_passing: int = 1,
        avg_num_neighbors: float = 10.0,
        seed: int = 0,
    ):
        super().__init__()
        self.zs = [int(z) for z in zs]
        self.nz = len(self.zs)
        self.n_atom_basis = int(n_atom_basis)
        self.n_edge_channels = self.n_atom_basis**2
        self.cutoff = float(cutoff)
        self.n_radial_basis = int(n_radial_basis)
        self.max_l = int(max_l)
        self.max_nu = int(max_nu)
        self.num_message_passing = int(num_message_passing)
        self.avg_num_neighbors = float(avg_num_neighbors)
        self.slots = cace_angular_combinations(self.max_l, self.max_nu)
        self.n_angular_sym = len(self.slots)

        lookup = torch.full((max(self.zs) + 1,), -1, dtype=torch.long)
        for position, z in enumerate(self.zs):
            lookup[z] = position
        self.register_buffer("element_index", lookup, persistent=False)

        generator = torch.Generator().manual_seed(seed)
        scale = 1.0 / math.sqrt(self.n_atom_basis)
        self.sender_embedding = nn.Parameter(
            scale * torch.randn(self.nz, self.n_atom_basis, generator=generator) + 1.0
        )
        self.receiver_embedding = nn.Parameter(
            scale * torch.randn(self.nz, self.n_atom_basis, generator=generator) + 1.0
        )
        self.register_buffer("centres", torch.linspace(0.0, self.cutoff, self.n_radial_basis))
        self.width = self.cutoff / max(self.n_radial_basis, 1)

    @property
    def feature_dim(self) -> int:
        stages = self.num_message_passing + 1
        return self.n_radial_basis * self.n_angular_sym * self.n_edge_channels * stages

    def _one_hot(self, atomic_numbers: torch.Tensor) -> torch.Tensor:
        """Element one-hot (N, nz) with the quirks of CACE's ``NodeEncoder`` (``cace/modules/type.py``).

        * an atomic number not in ``zs`` but below ``max(zs)`` raises
          ValueError (CACE has done so since 2024); one above ``max(zs)`` fails
          with an IndexError from the lookup table;
        * the one-hot is built in torch's *default* dtype and then multiplied
          with the embedding weights, so calling a float64 model while the
          default dtype is float32 raises a dtype error, as CACE does.
        """
        indices = self.element_index[atomic_numbers]
        if (indices < 0).any():
            raise ValueError(f"Atomic numbers out of range: {atomic_numbers[indices < 0].tolist()}")
        one_hot = torch.zeros(indices.shape + (self.nz,), device=atomic_numbers.device)
        return one_hot.scatter_(-1, indices.unsqueeze(-1), 1.0)

    def _cutoff_function(self, r: torch.Tensor) -> torch.Tensor:
        inside = r < self.cutoff
        smooth = 0.5 * (torch.cos(math.pi * r / self.cutoff) + 1.0)
        return torch.where(inside, smooth, torch.zeros_like(r))

    def _invariants(self, moments: List[torch.Tensor]) -> torch.Tensor:
        """(N, R, S, C) scalars from moment tensors M_l of shape (N, R, 3**l, C)."""
        n, r, _, c = moments[0].shape
        columns = []
        for slot in self.slots:
            if slot == (0,):
                columns.append(moments[0][:, :, 0, :])
            elif len(slot) == 1:
                (l,) = slot
                columns.append((moments[l] ** 2).sum(dim=2))
            elif len(slot) == 2:
                l1, l2 = slot
                joint = moments[l1 + l2].reshape(n, r, 3**l1, 3**l2, c)
                columns.append(torch.einsum("nrac,nrbc,nrabc->nrc", moments[l1], moments[l2], joint))
            else:
                l1, l2, dl = slot
                left = moments[l1 + dl].reshape(n, r, 3**l1, 3**dl, c)
                right = moments[l2 + dl].reshape(n, r, 3**l2, 3**dl, c)
                columns.append(
                    torch.einsum("nrac,nrbc,nrakc,nrbkc->nrc", moments[l1], moments[l2], left, right)
                )
        return torch.stack(columns, dim=2)

    def forward(self, data: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        positions = data["positions"]
        n_nodes = positions.shape[0]
        batch = data.get("batch")
        if batch is None:
            batch = torch.zeros(n_nodes, dtype=torch.long, device=positions.device)
        sender, receiver = data["edge_index"][0], data["edge_index"][1]

        vectors = positions[receiver] - positions[sender] + data["shifts"].to(positions.dtype)
        lengths = torch.linalg.norm(vectors, dim=-1)
        directions = vectors / (lengths.unsqueeze(-1) + 1e-9)
        envelope = self._cutoff_function(lengths)
        gaussians = torch.exp(-0.5 * ((lengths.unsqueeze(-1) - self.centres) / self.width) ** 2)
        radial = gaussians * envelope.unsqueeze(-1)  # (E, R)

        one_hot = self._one_hot(data["atomic_numbers"])
        sender_emb = torch.mm(one_hot, self.sender_embedding)[sender]
        receiver_emb = torch.mm(one_hot, self.receiver_embedding)[receiver]
        channels = (sender_emb.unsqueeze(-1) * receiver_emb.unsqueeze(-2)).reshape(-1, self.n_edge_channels)

        weight = (radial.unsqueeze(-1) * channels.unsqueeze(1)) / self.avg_num_neighbors  # (E, R, C)
        powers = [torch.ones_like(lengths).unsqueeze(-1)]  # u^(x)0, (E, 1)
        for _ in range(self.max_l):
            powers.append((powers[-1].unsqueeze(-1) * directions.unsqueeze(1)).reshape(lengths.shape[0], -1))
        # Sums over edges use index_put(accumulate=True): on the pinned torch CPU build,
        # float64 index_add/scatter_add on these 4-D blocks can take ~50 ms with two
        # OpenMP threads (about 10 µs with one), which made the adapter tests crawl.
        moments = []
        for power in powers:
            edge_terms = weight.unsqueeze(2) * power.unsqueeze(1).unsqueeze(-1)  # (E, R, 3**l, C)
            shape = (n_nodes,) + tuple(edge_terms.shape[1:])
            moments.append(
                torch.zeros(shape, dtype=edge_terms.dtype, device=edge_terms.device).index_put(
                    (receiver,), edge_terms, accumulate=True
                )
            )

        stages = [self._invariants(moments)]
        hop = (envelope / self.avg_num_neighbors).reshape(-1, 1, 1, 1)
        for _ in range(self.num_message_passing):
            previous = stages[-1]
            gathered = torch.zeros_like(previous).index_put((receiver,), hop * previous[sender], accumulate=True)
            stages.append(previous + gathered)
        node_feats = torch.stack(stages, dim=-1)

        return {
            "positions": positions,
            "cell": data["cell"],
            "displacement": data.get("displacement"),
            "batch": batch,
            "node_feats": node_feats,
        }


def _mlp_widths(n_in: int, n_out: int, n_hidden: Union[None, int, Sequence[int]], n_layers: int) -> List[int]:
    """Layer widths of CACE's read-out MLP: halving from n_in (None), rectangular (int) or as listed."""
    if n_hidden is None:
        widths = [n_in]
        while len(widths) < n_layers:
            widths.append(max(n_out, widths[-1] // 2))
        return widths + [n_out]
    hidden = [int(n_hidden)] * (n_layers - 1) if isinstance(n_hidden, int) else [int(h) for h in n_hidden]
    return [n_in] + hidden + [n_out]


class Atomwise(nn.Module):
    """Role of ``cace.modules.Atomwise``: per-atom MLP on flattened features, summed per structure.

    Reads ``data[feature_key]`` (default ``"node_feats"``), flattens it to
    (N, F), maps it to (N, n_out) with an MLP whose layer widths follow
    ``n_hidden``/``n_layers`` as CACE's do (plus a linear map of the features
    with ``add_linear_nn``) and writes ``data[output_key]`` as (B,) when
    ``n_out == 1`` (else (B, n_out)); ``aggregation_mode="avg"`` divides by the
    atom count; ``post_process`` is applied to the aggregated result; with
    ``per_atom_output_key`` the (N, n_out) per-atom values are written too.
    With ``n_in=None`` the layers (``outnet``, ``linear_nn``) are built on the
    first call, in torch's default dtype and from the global RNG, as CACE does.
    Residual and batch-norm variants are not reproduced.
    """

    def __init__(
        self,
        n_in: Optional[int] = None,
        n_out: int = 1,
        n_hidden: Union[None, int, Sequence[int]] = None,
        n_layers: int = 2,
        bias: bool = True,
        activation=functional.silu,
        aggregation_mode: Optional[str] = "sum",
        feature_key: str = "node_feats",
        output_key: str = "energy",
        per_atom_output_key: Optional[str] = None,
        descriptor_output_key: Optional[str] = None,
        residual: bool = False,
        use_batchnorm: bool = False,
        add_linear_nn: bool = False,
        post_process=None,
    ):
        super().__init__()
        if residual or use_batchnorm:
            raise ValueError("the stand-in Atomwise has no residual or batch-norm variant; leave them False.")
        if aggregation_mode is None and per_atom_output_key is None:
            raise ValueError("with aggregation_mode=None set per_atom_output_key, or nothing is returned.")
        self.n_in, self.n_out, self.n_hidden, self.n_layers = n_in, int(n_out), n_hidden, int(n_layers)
        self.bias, self.activation, self.aggregation_mode = bias, activation, aggregation_mode
        self.feature_key, self.output_key = feature_key, output_key
        self.per_atom_output_key, self.descriptor_output_key = per_atom_output_key, descriptor_output_key
        self.residual, self.use_batchnorm = residual, use_batchnorm
        self.add_linear_nn, self.post_process = add_linear_nn, post_process
        self.model_outputs = [key for key in (output_key, per_atom_output_key, descriptor_output_key) if key]
        self.outnet: Optional[nn.ModuleList] = None
        self.linear_nn: Optional[nn.Linear] = None
        if n_in is not None:
            self._build(int(n_in))

    def _build(self, n_in: int) -> None:
        widths = _mlp_widths(n_in, self.n_out, self.n_hidden, self.n_layers)
        self.outnet = nn.ModuleList(nn.Linear(a, b, bias=self.bias) for a, b in zip(widths[:-1], widths[1:]))
        if self.add_linear_nn:
            self.linear_nn = nn.Linear(n_in, self.n_out, bias=self.bias)

    def forward(
        self,
        data: Dict[str, torch.Tensor],
        training: bool = False,
        output_index: Optional[int] = None,
    ) -> Dict[str, torch.Tensor]:
        features = flatten_node_feats(data[self.feature_key])
        if self.outnet is None:
            self.n_in = features.shape[1]
            self._build(self.n_in)
            self.to(features.device)
        if features.shape[1] != self.n_in:
            raise ValueError(f"expected {self.n_in} features per atom, got {features.shape[1]}.")
        hidden = features
        for index, layer in enumerate(self.outnet):
            hidden = layer(hidden)
            if index < len(self.outnet) - 1:
                hidden = self.activation(hidden)
        per_atom = hidden + self.linear_nn(features) if self.linear_nn is not None else hidden
        if self.per_atom_output_key is not None:
            data[self.per_atom_output_key] = per_atom
        if self.descriptor_output_key is not None:
            data[self.descriptor_output_key] = features
        if self.aggregation_mode is None:
            return data
        batch = data["batch"]
        n_structures = int(batch.max()) + 1 if batch.numel() else 1
        total = per_atom.new_zeros((n_structures, self.n_out)).index_add(0, batch, per_atom)
        if self.aggregation_mode == "avg":
            total = total / torch.bincount(batch, minlength=n_structures).unsqueeze(-1)
        total = total.squeeze(-1)
        if self.post_process is not None:
            total = self.post_process(total)
        data[self.output_key] = total[:, output_index] if output_index is not None else total
        return data


class Forces(nn.Module):
    """Role of ``cace.modules.Forces``: derivatives of an energy already in the dict.

    * forces (N, 3) = -dE/d``data["positions"]`` (the positions tensor the
      representation passed through), stored under ``forces_key``;
    * if a strain ``displacement`` is present and stress or virials are
      wanted: virials (B, 3, 3) = -dE/d``displacement`` under ``virials_key``,
      and, with ``calc_stress``, stress (B, 3, 3) = +dE/d``displacement`` / V
      (ASE sign convention) under ``stress_key``.  V is the cell's triple
      product; structures without a cell get zero stress here (CACE would divide by 0).

    ``training=True`` keeps the graph (``create_graph``) for force losses.
    """

    def __init__(
        self,
        calc_forces: bool = True,
        calc_stress: bool = True,
        energy_key: str = "energy",
        forces_key: str = "forces",
        stress_key: str = "stress",
        virials_key: str = "virials",
    ):
        super().__init__()
        self.calc_forces = calc_forces
        self.calc_stress = calc_stress
        self.energy_key = energy_key
        self.forces_key = forces_key
        self.stress_key = stress_key
        self.virial_key = virials_key
        self.model_outputs = ([forces_key] if calc_forces else []) + ([stress_key] if calc_stress else [])
        self.required_derivatives = ["positions"] if (calc_forces or calc_stress) else []

    def forward(
        self,
        data: Dict[str, torch.Tensor],
        training: bool = False,
        output_index: Optional[int] = None,
    ) -> Dict[str, torch.Tensor]:
        energy = data[self.energy_key]
        if output_index is not None and energy.dim() == 2:
            energy = energy[:, output_index]
        positions = data["positions"]
        displacement = data.get("displacement")
        inputs = [positions] + ([displacement] if displacement is not None else [])
        grads = torch.autograd.grad(
            [energy],
            inputs,
            grad_outputs=[torch.ones_like(energy)],
            retain_graph=training,
            create_graph=training,
            allow_unused=True,
        )
        d_positions = grads[0] if grads[0] is not None else torch.zeros_like(positions)
        if self.calc_forces:
            data[self.forces_key] = -d_positions
        if displacement is not None:
            d_strain = grads[1] if grads[1] is not None else torch.zeros_like(displacement)
            data[self.virial_key] = -d_strain
            if self.calc_stress:
                cells = data["cell"].reshape(-1, 3, 3)
                volume = torch.einsum("bi,bi->b", cells[:, 0], torch.cross(cells[:, 1], cells[:, 2], dim=1))
                safe = torch.where(volume.abs() > 1e-12, volume, torch.ones_like(volume))
                stress = d_strain / safe.view(-1, 1, 1)
                data[self.stress_key] = torch.where(
                    (volume.abs() > 1e-12).view(-1, 1, 1), stress, torch.zeros_like(stress)
                )
        return data


class CaceContractModel(nn.Module):
    """Stand-in for ``cace.models.atomistic.NeuralNetworkPotential`` built around a CACE representation.

    Same attributes an adapter would look for: ``representation`` (with
    ``cutoff``, ``zs``, ``n_atom_basis``, ``n_radial_basis``, ``max_l``,
    ``max_nu``, ``num_message_passing``), ``input_modules``, ``output_modules``,
    ``model_outputs`` and ``required_derivatives``.

    ``forward(data, training=False, compute_stress=False, compute_virials=False,
    output_index=None)`` runs, in CACE's order:

    1. ``requires_grad_`` on every ``required_derivatives`` entry of the input
       dict (``"positions"``), in place, as CACE does;
    2. input modules (:class:`Preprocess`), stress forced on when the stress key
       is among the outputs;
    3. the representation, which *replaces* the dict by its own five keys;
    4. output modules (:class:`Atomwise` then :class:`Forces`);
    5. returns only the ``model_outputs`` keys, e.g. ``CACE_energy`` (B,),
       ``CACE_forces`` (N, 3) and, with ``calc_stress``, ``CACE_stress`` (B, 3, 3).
       ``node_feats`` is not returned; call ``model.representation`` for it.

    Unlike CACE's classes, this one keeps its constructor arguments in
    ``config`` (a JSON-able dict), so ``CaceContractModel(**model.config)``
    rebuilds an identical architecture; the latent-lr adapter saves hosts that
    are not from the ``cace`` package this way.
    """

    def __init__(
        self,
        zs: Sequence[int],
        cutoff: float = 4.0,
        n_atom_basis: int = 2,
        n_radial_basis: int = 6,
        max_l: int = 2,
        max_nu: int = 3,
        num_message_passing: int = 1,
        avg_num_neighbors: float = 10.0,
        n_hidden: int = 16,
        energy_key: str = "CACE_energy",
        forces_key: str = "CACE_forces",
        stress_key: str = "CACE_stress",
        virials_key: str = "CACE_virials",
        per_atom_energy_key: Optional[str] = None,
        calc_forces: bool = True,
        calc_stress: bool = False,
    ):
        super().__init__()
        self.config = dict(
            zs=[int(z) for z in zs],
            cutoff=float(cutoff),
            n_atom_basis=int(n_atom_basis),
            n_radial_basis=int(n_radial_basis),
            max_l=int(max_l),
            max_nu=int(max_nu),
            num_message_passing=int(num_message_passing),
            avg_num_neighbors=float(avg_num_neighbors),
            n_hidden=int(n_hidden),
            energy_key=energy_key,
            forces_key=forces_key,
            stress_key=stress_key,
            virials_key=virials_key,
            per_atom_energy_key=per_atom_energy_key,
            calc_forces=bool(calc_forces),
            calc_stress=bool(calc_stress),
        )
        self.representation = CaceContractRepresentation(
            zs,
            n_atom_basis=n_atom_basis,
            cutoff=cutoff,
            n_radial_basis=n_radial_basis,
            max_l=max_l,
            max_nu=max_nu,
            num_message_passing=num_message_passing,
            avg_num_neighbors=avg_num_neighbors,
        )
        self.input_modules = nn.ModuleList([Preprocess()])
        atomwise = Atomwise(
            self.representation.feature_dim,
            n_hidden=int(n_hidden),
            output_key=energy_key,
            per_atom_output_key=per_atom_energy_key,
        )
        modules: List[nn.Module] = [atomwise]
        if calc_forces or calc_stress:
            modules.append(
                Forces(
                    calc_forces=calc_forces,
                    calc_stress=calc_stress,
                    energy_key=energy_key,
                    forces_key=forces_key,
                    stress_key=stress_key,
                    virials_key=virials_key,
                )
            )
        self.output_modules = nn.ModuleList(modules)
        self.energy_key = energy_key
        self.model_outputs: List[str] = []
        self.required_derivatives: List[str] = []
        for module in self.output_modules:
            for key in getattr(module, "model_outputs", []):
                if key not in self.model_outputs:
                    self.model_outputs.append(key)
            for key in getattr(module, "required_derivatives", []):
                if key not in self.required_derivatives:
                    self.required_derivatives.append(key)

    def forward(
        self,
        data: Dict[str, torch.Tensor],
        training: bool = False,
        compute_stress: bool = False,
        compute_virials: bool = False,
        output_index: Optional[int] = None,
    ) -> Dict[str, torch.Tensor]:
        for key in self.required_derivatives:
            tensor = data.get(key)
            if tensor is not None and not tensor.requires_grad:
                tensor.requires_grad_(True)
        if any(key in self.model_outputs for key in ("stress", "CACE_stress")) or any(
            getattr(m, "calc_stress", False) for m in self.output_modules
        ):
            compute_stress = True
        for module in self.input_modules:
            data = module(data, compute_stress=compute_stress, compute_virials=compute_virials)
        data = self.representation(data)
        for module in self.output_modules:
            data = module(data, training=training, output_index=output_index)
        return {key: data[key] for key in self.model_outputs}


# ----------------------------------------------------------------------------
# Self-check
# ----------------------------------------------------------------------------


def _edge_set(data: Dict[str, torch.Tensor]) -> set:
    rows = torch.cat([data["edge_index"].T.double(), data["unit_shifts"].double()], dim=1)
    return {tuple(int(round(v)) for v in row.tolist()) for row in rows}


def _self_check() -> None:
    from ase.build import bulk, molecule

    torch.set_default_dtype(torch.float64)
    rng = np.random.default_rng(0)
    crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    crystal.rattle(0.05, seed=1)
    crystal.set_cell(crystal.cell.array @ (np.eye(3) + 0.02 * rng.standard_normal((3, 3))), scale_atoms=True)
    water = molecule("H2O")
    water.center(vacuum=2.0)
    water.set_cell(np.zeros((3, 3)))
    water.pbc = False
    structures = [crystal, water]
    cutoff = 4.0

    data = make_cace_batch(structures, cutoff)
    n_atoms, n_structures = len(crystal) + len(water), len(structures)
    for key in CACE_INPUT_KEYS:
        assert key in data, key
    assert data["positions"].shape == (n_atoms, 3) and data["positions"].dtype == torch.float64
    assert data["atomic_numbers"].dtype == torch.long and data["batch"].dtype == torch.long
    assert data["cell"].shape == (3 * n_structures, 3)
    assert data["ptr"].tolist() == [0, len(crystal), n_atoms]
    assert data["edge_index"].shape[0] == 2 and data["edge_index"].dtype == torch.long
    assert data["shifts"].shape == data["unit_shifts"].shape == (data["edge_index"].shape[1], 3)
    water_edges = data["batch"][data["edge_index"][0]] == 1
    assert int(data["edge_index"][:, water_edges].min()) >= len(crystal)
    assert torch.allclose(refresh_shifts(data), data["shifts"])
    assert _edge_set(data) == _edge_set(make_cace_batch(structures, cutoff, backend="vesin"))

    model = CaceContractModel(zs=[1, 8, 11, 17], cutoff=cutoff, max_l=3, max_nu=4, calc_stress=True)
    rep = model.representation
    features = rep(make_cace_batch(structures, cutoff))["node_feats"]
    expected = (n_atoms, rep.n_radial_basis, cace_n_angular_sym(3, 4), rep.n_atom_basis**2, 2)
    assert tuple(features.shape) == expected, features.shape
    assert flatten_node_feats(features).shape == (n_atoms, cace_feature_dim(rep))
    # angular-axis lengths CACE itself tabulates for (max_l, max_nu)
    for (max_l, max_nu), size in {(1, 4): 2, (2, 3): 4, (3, 3): 6, (3, 4): 7, (4, 4): 13, (5, 4): 22}.items():
        assert cace_n_angular_sym(max_l, max_nu) == size, (max_l, max_nu)

    out = model(make_cace_batch(structures, cutoff))
    assert set(out) == {"CACE_energy", "CACE_forces", "CACE_stress"}, set(out)
    assert out["CACE_energy"].shape == (n_structures,)
    assert out["CACE_forces"].shape == (n_atoms, 3)
    assert out["CACE_stress"].shape == (n_structures, 3, 3)
    assert torch.all(out["CACE_stress"][1] == 0)

    # invariance: rotate + translate the molecule, permute nothing
    rotated = water.copy()
    rotated.rotate(37.0, (1.0, 2.0, 0.5), center="COM")
    rotated.translate((0.3, -1.2, 2.0))
    f0 = rep(make_cace_batch([water], cutoff))["node_feats"]
    f1 = rep(make_cace_batch([rotated], cutoff))["node_feats"]
    assert torch.allclose(f0, f1, atol=1e-10), (f0 - f1).abs().max()

    # NodeEncoder behaviour kept: an unknown Z below max(zs) raises ValueError ...
    fluorine = water.copy()
    fluorine.numbers[0] = 9  # F is not in zs=[1, 8, 11, 17]
    try:
        rep(make_cace_batch([fluorine], cutoff))
        raise AssertionError("expected a ValueError for an unknown element, as in CACE")
    except ValueError:
        pass
    # ... and the one-hot follows the default dtype, so a float64 model fails under float32.
    torch.set_default_dtype(torch.float32)
    try:
        rep(make_cace_batch([water], cutoff, dtype=torch.float64))
        raise AssertionError("expected a dtype error, as in CACE")
    except RuntimeError:
        pass
    finally:
        torch.set_default_dtype(torch.float64)

    # forces = -dE/dx by central differences (crystal only)
    energy_only = CaceContractModel(zs=[1, 8, 11, 17], cutoff=cutoff, max_l=3, max_nu=4, calc_forces=False)
    energy_only.load_state_dict(model.state_dict(), strict=False)
    forces = model(make_cace_batch([crystal], cutoff))["CACE_forces"]
    h = 1e-5
    for atom, axis in [(0, 0), (3, 2), (6, 1)]:
        plus, minus = crystal.copy(), crystal.copy()
        plus.positions[atom, axis] += h
        minus.positions[atom, axis] -= h
        e_plus = energy_only(make_cace_batch([plus], cutoff))["CACE_energy"].item()
        e_minus = energy_only(make_cace_batch([minus], cutoff))["CACE_energy"].item()
        assert abs(-(e_plus - e_minus) / (2 * h) - forces[atom, axis].item()) < 1e-6

    # stress = (1/V) dE/d(strain) by central differences of a symmetric strain
    stress = model(make_cace_batch([crystal], cutoff))["CACE_stress"][0]
    volume = crystal.get_volume()
    for a, b in [(0, 0), (1, 2), (2, 1)]:
        strain = np.zeros((3, 3))
        strain[a, b] += 0.5 * h
        strain[b, a] += 0.5 * h
        energies = []
        for sign in (1.0, -1.0):
            strained = crystal.copy()
            strained.set_cell(crystal.cell.array @ (np.eye(3) + sign * strain), scale_atoms=True)
            energies.append(energy_only(make_cace_batch([strained], cutoff))["CACE_energy"].item())
        numeric = (energies[0] - energies[1]) / (2 * h) / volume
        assert abs(numeric - stress[a, b].item()) < 1e-7, (a, b, numeric, stress[a, b].item())

    print(
        "cace_contract self-check passed:",
        f"node_feats {tuple(features.shape)},",
        f"F = {cace_feature_dim(rep)},",
        f"energies {out['CACE_energy'].detach().tolist()}",
    )


if __name__ == "__main__":
    _self_check()
