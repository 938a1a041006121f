"""Collections of training frames that know their sizes without being read.

A :class:`FrameSet` is a sequence of :class:`~latent_lr.training.dataset.Frame`
(``len``, ``frames[i]``, ``frames[a:b]``, iteration) plus ``n_atoms``, the (S,)
atom counts, and ``species()``, the elements present, both available without
reading positions or labels.  An extended-XYZ file is read into memory
(:class:`FrameList`); a file written by ``latent-lr prepare-data`` is read on
demand (:class:`~latent_lr.training.store.FrameStore`); several files form one
:class:`ConcatFrames`; a split is a :class:`FrameSubset` of indices.

:func:`~latent_lr.training.data_files.open_frames` turns what the user typed after ``--train`` (one path or
several; a prepared HDF5 file, a folder of shards, a glob, or extended XYZ)
into one :class:`FrameSet` (:mod:`latent_lr.training.data_files`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Iterator, Union, overload

import numpy as np

from .dataset import Frame

#: Frame indices: a sequence or an integer array.
Indices = Union[Sequence[int], np.ndarray]

#: Frames read per block when iterating over a whole set.
ITERATION_BLOCK = 1024


class FrameSet(Sequence[Frame]):
    """A sequence of frames with their atom counts known up front (see the module docstring)."""

    @property
    @abstractmethod
    def n_atoms(self) -> np.ndarray:
        """(S,) int64 atoms per structure."""

    @abstractmethod
    def species(self) -> set[int]:
        """Atomic numbers present in the set."""

    @abstractmethod
    def frame(self, index: int) -> Frame:
        """Frame ``index`` (0 <= index < len)."""

    def frames(self, indices: Indices) -> list[Frame]:
        """Frames at ``indices`` (subclasses may read them in one go)."""
        return [self.frame(int(i)) for i in indices]

    def label_mask(self, name: str) -> np.ndarray:
        """(S,) bool: which structures carry label ``name`` (a :class:`Frame` field: energy, forces, ...).

        Data-parallel training needs it for the whole set up front (a step's loss terms and
        counts depend on all ranks' structures); this default reads every frame once,
        subclasses that know it without reading override it.
        """
        return np.array([getattr(frame, name) is not None for frame in self], dtype=bool)

    def __len__(self) -> int:
        return len(self.n_atoms)

    @overload
    def __getitem__(self, index: int) -> Frame: ...

    @overload
    def __getitem__(self, index: slice) -> list[Frame]: ...

    def __getitem__(self, index: Union[int, slice]) -> Union[Frame, list[Frame]]:
        if isinstance(index, slice):
            return self.frames(range(*index.indices(len(self))))
        position = int(index)
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"frame {index} out of range for {len(self)} frames")
        return self.frame(position)

    def __iter__(self) -> Iterator[Frame]:
        for start in range(0, len(self), ITERATION_BLOCK):
            yield from self.frames(range(start, min(start + ITERATION_BLOCK, len(self))))


class FrameList(FrameSet):
    """Frames held in memory (an extended-XYZ file read whole)."""

    def __init__(self, frames: Sequence[Frame]):
        self._frames = list(frames)
        self._n_atoms = np.array([len(f.atoms) for f in self._frames], dtype=np.int64)

    @property
    def n_atoms(self) -> np.ndarray:
        return self._n_atoms

    def species(self) -> set[int]:
        return {int(z) for f in self._frames for z in f.atoms.numbers}

    def frame(self, index: int) -> Frame:
        return self._frames[index]


class ConcatFrames(FrameSet):
    """Several frame sets one after the other."""

    def __init__(self, parts: Sequence[FrameSet]):
        self.parts = list(parts)
        self._n_atoms = np.concatenate([p.n_atoms for p in self.parts]) if self.parts else np.zeros(0, np.int64)
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])

    @property
    def n_atoms(self) -> np.ndarray:
        return self._n_atoms

    def species(self) -> set[int]:
        return set().union(*(p.species() for p in self.parts))

    def frame(self, index: int) -> Frame:
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.parts[part].frame(index - int(self._starts[part]))

    def label_mask(self, name: str) -> np.ndarray:
        return np.concatenate([p.label_mask(name) for p in self.parts]) if self.parts else np.zeros(0, dtype=bool)

    def frames(self, indices: Indices) -> list[Frame]:
        """Each part reads its own frames in one call (block reads for prepared files)."""
        positions = np.asarray(indices, dtype=np.int64)
        owners = np.searchsorted(self._starts, positions, side="right") - 1
        found: dict[int, Frame] = {}
        for part in np.unique(owners):
            where = np.flatnonzero(owners == part)
            local = positions[where] - self._starts[part]
            found.update(zip(where.tolist(), self.parts[int(part)].frames(local)))
        return [found[k] for k in range(len(positions))]


class FrameSubset(FrameSet):
    """The frames of ``base`` at ``indices``, in that order (a training or validation split)."""

    def __init__(self, base: FrameSet, indices: Indices):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self._n_atoms = base.n_atoms[self.indices]

    @property
    def n_atoms(self) -> np.ndarray:
        return self._n_atoms

    def species(self) -> set[int]:
        """The elements of ``base`` (a superset of the subset's own; a split's parts together cover the base)."""
        return self.base.species()

    def frame(self, index: int) -> Frame:
        return self.base.frame(int(self.indices[index]))

    def frames(self, indices: Indices) -> list[Frame]:
        return self.base.frames(self.indices[np.asarray(indices, dtype=np.int64)])

    def label_mask(self, name: str) -> np.ndarray:
        return self.base.label_mask(name)[self.indices]


class BatchReader:
    """Batches of a frame set by index lists; each batch's frames are read when the iteration reaches it."""

    def __init__(self, frames: FrameSet, batches: Sequence[Sequence[int]]):
        self.frame_set = frames
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[Frame]]:
        for batch in self.batches:
            yield self.frame_set.frames(batch)
