"""On-disk training data: ``latent-lr prepare-data`` writes HDF5 files, :class:`FrameStore` reads them lazily.

**Why HDF5 (h5py) and not LMDB.**  A structure is a handful of typed numeric
arrays (positions, numbers, forces, ...).  HDF5 stores each as one chunked,
typed column: no per-record serialisation (LMDB keeps byte strings, so every
structure would be pickled or packed by hand), a column such as ``n_atoms`` is
read without touching positions (what the size-balanced sampler needs), and the
file is self-describing and portable (``h5ls``, ``h5dump``, h5py, any HDF5
reader).  LMDB's advantage, many concurrent readers on one memory map, matters
little here: each process opens its own read-only handle.

**Layout** (attribute ``format = "latent-lr-frames"``, ``version = 1``); S
structures, N atoms in all; per-atom columns are concatenated in structure
order::

    n_atoms       (S,)       int64    atoms per structure
    numbers       (N,)       uint8    atomic numbers
    positions     (N, 3)     float64  Å
    cell          (S, 3, 3)  float64  Å, lattice vectors as rows (zeros if none)
    pbc           (S, 3)     bool
    info_length   (S,)       int64    bytes of each structure's info JSON
    info          (B,)       uint8    the structures' scalar info entries as UTF-8 JSON, concatenated
    source_file   (S,)       int32    index into attribute ``sources`` (input files)
    source_index  (S,)       int64    0-based frame index in that input file
    energy        (S,)       float64  eV        + has_energy  (S,) bool
    forces        (N, 3)     float64  eV/Å      + has_forces  (S,) bool
    dipole        (S, 3)     float64  e·Å       + has_dipole  (S,) bool
    charges       (N,)       float64  e         + has_charges (S,) bool
    bec           (N, 3, 3)  float64  e         + has_bec     (S,) bool
    total_charge  (S,)       float64  e
    total_spin    (S,)       int64    2S_z = N↑ − N↓ (only if a spin or multiplicity key was given)

A label column exists only if its key was given to ``prepare-data``
(attribute ``label_keys``: label -> key in the input files); ``has_*`` marks the
structures that carry it (missing values are stored as zeros).  Attribute
``species`` lists the atomic numbers present.

**Reading.**  Opening a file reads ``n_atoms`` and ``info_length`` (16 bytes per structure) and the
attributes; every frame is read when asked for.  The h5py handle is opened
lazily in the process that reads (and re-opened after a fork; pickling drops
it), so a store can be handed to worker processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import h5py
import numpy as np
from ase import Atoms
from tqdm.auto import tqdm

from ..errors import UserInputError, frame_location
from ..spin import SPIN_KEY
from .dataset import Frame, LabelKeys, iter_frames, require_labels
from .frame_sets import FrameSet, Indices

FORMAT = "latent-lr-frames"
VERSION = 1

#: Frames buffered in memory before they are appended to the file.
WRITE_BLOCK = 1024

#: label -> (trailing shape, per-atom?).
LABELS: dict[str, tuple[tuple[int, ...], bool]] = {
    "energy": ((), False),
    "forces": ((3,), True),
    "dipole": ((3,), False),
    "charges": ((), True),
    "bec": ((3, 3), True),
}

#: HDF5 chunk cache per dataset and open file (h5py's default, 1 MiB, would cost ~15 MiB per shard file
#: for no gain: frames are read at random, and whole blocks when iterating).
CHUNK_CACHE_BYTES = 128 * 1024

#: Rows per HDF5 chunk: small chunks keep a random frame read cheap (a chunk is the unit of I/O).
CHUNK_ROWS = {"structure": 1024, "atom": 1024, "byte": 16384}

_GEOMETRY: dict[str, tuple[tuple[int, ...], Any, str]] = {  # name -> (trailing shape, dtype, what a row is)
    "n_atoms": ((), np.int64, "structure"),
    "numbers": ((), np.uint8, "atom"),
    "positions": ((3,), np.float64, "atom"),
    "cell": ((3, 3), np.float64, "structure"),
    "pbc": ((3,), np.bool_, "structure"),
    "info_length": ((), np.int64, "structure"),
    "info": ((), np.uint8, "byte"),
    "source_file": ((), np.int32, "structure"),
    "source_index": ((), np.int64, "structure"),
    "total_charge": ((), np.float64, "structure"),
}


def _scalar_info(info: dict) -> bytes:
    """UTF-8 JSON of scalar info entries (numpy scalars as Python values)."""
    clean = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in info.items()}
    return json.dumps({k: v for k, v in clean.items() if isinstance(v, (bool, int, float, str))}).encode()


class _ShardWriter:
    """Appends frames to one HDF5 file, a block at a time; written as ``NAME.partial`` and renamed when closed."""

    def __init__(self, path: Path, keys: LabelKeys, sources: Sequence[str]):
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.labels = [name for name in LABELS if getattr(keys, name) is not None]
        self.file = h5py.File(self.partial, "w")
        self.file.attrs["format"] = FORMAT
        self.file.attrs["version"] = VERSION
        self.file.attrs["sources"] = json.dumps([str(s) for s in sources])
        label_keys = {name: getattr(keys, name) for name in (*self.labels, "total_charge") if getattr(keys, name)}
        self.spin_key = _spin_key(keys)
        columns = dict(_GEOMETRY)
        if self.spin_key is not None:
            label_keys["total_spin"] = self.spin_key
            columns["total_spin"] = ((), np.int64, "structure")
        self.file.attrs["label_keys"] = json.dumps(label_keys)
        for name in self.labels:
            shape, per_atom = LABELS[name]
            columns[name] = (shape, np.float64, "atom" if per_atom else "structure")
            columns["has_" + name] = ((), np.bool_, "structure")
        for name, (shape, dtype, row) in columns.items():
            chunks = (CHUNK_ROWS[row], *shape)
            self.file.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=chunks)
        self.species: set[int] = set()
        self.count = 0
        self.buffer: list[tuple[Frame, int]] = []

    def add(self, frame: Frame, source_file: int) -> None:
        self.buffer.append((frame, source_file))
        if len(self.buffer) >= WRITE_BLOCK:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        frames = [f for f, _ in self.buffer]
        info = [_scalar_info(f.info) for f in frames]
        values: dict[str, np.ndarray] = {
            "n_atoms": np.array([len(f.atoms) for f in frames], dtype=np.int64),
            "numbers": np.concatenate([f.atoms.numbers for f in frames]).astype(np.uint8),
            "positions": np.concatenate([f.atoms.positions for f in frames]),
            "cell": np.stack([f.atoms.cell.array for f in frames]),
            "pbc": np.stack([f.atoms.pbc for f in frames]),
            "info_length": np.array([len(text) for text in info], dtype=np.int64),
            "info": np.frombuffer(b"".join(info), dtype=np.uint8),
            "source_file": np.array([s for _, s in self.buffer], dtype=np.int32),
            "source_index": np.array([f.source[1] if f.source else -1 for f in frames], dtype=np.int64),
            "total_charge": np.array([f.total_charge for f in frames], dtype=np.float64),
        }
        if self.spin_key is not None:
            values["total_spin"] = np.array([f.total_spin for f in frames], dtype=np.int64)
        for name in self.labels:
            shape, per_atom = LABELS[name]
            present = [getattr(f, name) is not None for f in frames]
            filled = [
                np.asarray(getattr(f, name), dtype=np.float64).reshape((len(f.atoms),) * per_atom + shape)
                if ok else np.zeros((len(f.atoms),) * per_atom + shape)
                for f, ok in zip(frames, present)
            ]
            values[name] = np.concatenate(filled) if per_atom else np.stack(filled)
            values["has_" + name] = np.array(present, dtype=bool)
        for name, array in values.items():
            column = self.file[name]
            start = column.shape[0]
            column.resize(start + len(array), axis=0)
            column[start:] = array
        self.species.update(int(z) for z in np.unique(values["numbers"]))
        self.count += len(frames)
        self.buffer = []

    def close(self) -> None:
        self.flush()
        self.file.attrs["species"] = sorted(self.species)
        self.file.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


def _spin_key(keys: LabelKeys) -> Optional[str]:
    """How the total spins were read (``"spin"`` or ``"multiplicity mult"``, say), or None without a spin key."""
    if keys.total_spin:
        return keys.total_spin
    return f"multiplicity {keys.multiplicity}" if keys.multiplicity else None


def prepare_data(
    inputs: Sequence[Union[str, Path]],
    out: Union[str, Path],
    keys: LabelKeys,
    shard_size: Optional[int] = None,
    progress: bool = False,
) -> list[Path]:
    """Convert extended-XYZ files into the on-disk format (see the module docstring); return the files written.

    Without ``shard_size``, ``out`` is one HDF5 file holding every structure of
    ``inputs`` in order.  With ``shard_size`` = n, ``out`` is a folder of
    ``shard-00000.h5``, ``shard-00001.h5``, ... of n structures each (the last
    may hold fewer); shards of an earlier run with higher numbers are removed.
    Inputs are streamed: memory holds one block of frames, whatever the input's
    size.  Bad input (a missing file, a malformed or non-finite frame, a label
    key absent from a whole file) raises
    :class:`~latent_lr.errors.UserInputError` naming the file and frame.
    """
    if not inputs:
        raise UserInputError("prepare-data needs at least one input file.")
    if shard_size is not None and shard_size < 1:
        raise UserInputError(f"--shard-size must be at least 1, got {shard_size}.")
    target = Path(out)
    sources = [str(p) for p in inputs]
    if shard_size is not None:
        target.mkdir(parents=True, exist_ok=True)
    elif target.is_dir():
        raise UserInputError(f"{out} is a folder; name a file to write (or give --shard-size to write shards into it).")
    written: list[Path] = []
    writer: Optional[_ShardWriter] = None

    def next_path() -> Path:
        return target / f"shard-{len(written):05d}.h5" if shard_size is not None else target

    bar = tqdm(desc="prepare-data", unit="frame", disable=not progress)
    try:
        for file_index, path in enumerate(sources):
            count = 0
            any_energy = any_forces = False
            first_info: list[str] = []
            for frame in iter_frames(path, keys):
                if writer is None:
                    writer = _ShardWriter(next_path(), keys, sources)
                writer.add(frame, file_index)
                any_energy |= frame.energy is not None
                any_forces |= frame.forces is not None
                first_info = first_info or sorted(frame.info)
                count += 1
                bar.update(1)
                if shard_size is not None and writer.count + len(writer.buffer) >= shard_size:
                    writer.close()
                    written.append(writer.path)
                    writer = None
            if count == 0:
                raise UserInputError(f"{path} holds no structures; give a non-empty extended-XYZ file.")
            require_labels(path, keys, any_energy, any_forces, first_info)
        if writer is not None:
            writer.close()
            written.append(writer.path)
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    if shard_size is not None:
        for stale in target.glob("shard-*.h5"):
            if stale not in written:
                stale.unlink()
    return written


class FrameStore(FrameSet):
    """The structures of one prepared HDF5 file, read on demand (see the module docstring).

    ``keys`` selects the labels returned, as for an extended-XYZ file: a label
    whose key is None is left out; asking for one the file was prepared without
    is a :class:`~latent_lr.errors.UserInputError`.  Key names themselves were
    applied by ``prepare-data`` (attribute ``label_keys``).
    """

    def __init__(self, path: Union[str, Path], keys: LabelKeys):
        self.path = str(path)
        self._handle: Optional[h5py.File] = None
        self._columns: dict[str, h5py.Dataset] = {}
        self._pid = -1
        try:
            handle = self._file()
            if handle.attrs.get("format") != FORMAT:
                raise UserInputError(f"{self.path} is an HDF5 file but not one written by latent-lr prepare-data; convert the data with latent-lr prepare-data.")
            version = int(handle.attrs["version"])
            if version > VERSION:
                raise UserInputError(f"{self.path} has format version {version}, newer than this latent-lr reads ({VERSION}); upgrade latent-lr.")
            self._n_atoms = np.asarray(handle["n_atoms"][:], dtype=np.int64)
            self._info_starts = np.concatenate([[0], np.cumsum(handle["info_length"][:])])
            self._species = {int(z) for z in handle.attrs["species"]}
            prepared = json.loads(handle.attrs["label_keys"])
        except OSError as error:
            raise UserInputError(f"cannot read {self.path} ({error}); prepare it again with latent-lr prepare-data.") from error
        self._starts = np.concatenate([[0], np.cumsum(self._n_atoms)])
        self.with_spin = _spin_key(keys) is not None
        if self.with_spin and "total_spin" not in prepared:
            raise UserInputError(
                f"{self.path} was prepared without total spins; run latent-lr prepare-data again with "
                "--total-spin-key or --multiplicity-key, or leave both out."
            )
        self.labels = []
        for name in (*LABELS, "total_charge"):
            if getattr(keys, name) is None:
                continue
            if name not in prepared:
                raise UserInputError(
                    f"{self.path} was prepared without {name} labels; run latent-lr prepare-data again with "
                    f"--{name.replace('_', '-')}-key, or leave --{name.replace('_', '-')}-key out."
                )
            self.labels.append(name)
        if len(self) == 0:
            raise UserInputError(f"{self.path} holds no structures; prepare it from a non-empty extended-XYZ file.")

    def _file(self) -> h5py.File:
        """This process's read-only handle (opened on first use, again after a fork)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle = h5py.File(self.path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
            self._columns = {}
            self._pid = os.getpid()
        return self._handle

    def _column(self, name: str) -> h5py.Dataset:
        """A dataset of this process's handle (looked up once: a lookup costs more than a small read)."""
        handle = self._file()
        if name not in self._columns:
            self._columns[name] = handle[name]
        return self._columns[name]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"], state["_columns"], state["_pid"] = None, {}, -1
        return state

    @property
    def n_atoms(self) -> np.ndarray:
        return self._n_atoms

    def species(self) -> set[int]:
        return set(self._species)

    def frame(self, index: int) -> Frame:
        return self._read_block(index, index + 1)[0]

    def label_mask(self, name: str) -> np.ndarray:
        """(S,) bool from the file's ``has_<name>`` column, without reading the frames."""
        if name not in self.labels or name == "total_charge":
            return np.zeros(len(self), dtype=bool)
        try:
            return np.asarray(self._file()["has_" + name][:], dtype=bool)
        except (OSError, KeyError) as error:
            raise UserInputError(f"cannot read {self.path} ({error}); prepare it again with latent-lr prepare-data.") from error

    def frames(self, indices: Indices) -> list[Frame]:
        positions = np.asarray(indices, dtype=np.int64)
        if len(positions) == 0:
            return []
        first, last = int(positions.min()), int(positions.max())
        if len(positions) > 1 and last - first < 4 * len(positions):  # dense: read the covering block once
            block = self._read_block(first, last + 1)
            return [block[int(i) - first] for i in positions]
        return [self.frame(int(i)) for i in positions]

    def _read_block(self, first: int, stop: int) -> list[Frame]:
        """Frames first..stop-1, each column read once."""
        begin, end = int(self._starts[first]), int(self._starts[stop])
        try:
            per_atom = {name: self._column(name)[begin:end] for name in ("numbers", "positions")}
            per_structure = {name: self._column(name)[first:stop] for name in ("cell", "pbc")}
            if "total_charge" in self.labels:
                per_structure["total_charge"] = self._column("total_charge")[first:stop]
            if self.with_spin:
                per_structure["total_spin"] = self._column("total_spin")[first:stop]
            info_begin = int(self._info_starts[first])
            per_structure["info"] = bytes(self._column("info")[info_begin : int(self._info_starts[stop])])
            labels = {}
            for name in self.labels:
                if name == "total_charge":
                    continue
                rows = (begin, end) if LABELS[name][1] else (first, stop)
                labels[name] = (self._column(name)[rows[0] : rows[1]], self._column("has_" + name)[first:stop])
        except (OSError, KeyError) as error:
            raise UserInputError(
                f"{frame_location(self.path, first)}: cannot read the prepared file ({error}); prepare it again with latent-lr prepare-data."
            ) from error
        return [self._frame(first, k, per_atom, per_structure, labels) for k in range(stop - first)]

    def _frame(self, first: int, k: int, per_atom: dict, per_structure: dict, labels: dict) -> Frame:
        """Frame ``first + k`` from columns read for frames ``first, first + 1, ...``."""
        index = first + k
        start = int(self._starts[index] - self._starts[first])
        atoms_slice = slice(start, start + int(self._n_atoms[index]))
        pbc = per_structure["pbc"][k]
        atoms = Atoms(per_atom["numbers"][atoms_slice].astype(np.int64), per_atom["positions"][atoms_slice], cell=per_structure["cell"][k], pbc=pbc)
        total = float(per_structure["total_charge"][k]) if "total_charge" in self.labels else 0.0
        atoms.info["charge"] = total
        spin = int(per_structure["total_spin"][k]) if self.with_spin else 0
        if spin:
            atoms.info[SPIN_KEY] = spin
        values: dict[str, Any] = {}
        for name, (column, present) in labels.items():
            if present[k]:
                values[name] = column[atoms_slice] if LABELS[name][1] else column[k]
        energy = values.get("energy")
        info_begin = int(self._info_starts[index] - self._info_starts[first])
        info = per_structure["info"][info_begin : info_begin + int(self._info_starts[index + 1] - self._info_starts[index])]
        return Frame(
            atoms=atoms,
            energy=None if energy is None else float(energy),
            forces=values.get("forces"),
            dipole=values.get("dipole"),
            charges=values.get("charges"),
            bec=values.get("bec"),
            total_charge=total,
            total_spin=spin,
            info=json.loads(info),
            source=(self.path, index),
        )

