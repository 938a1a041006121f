"""What the user names after ``--train`` / ``--valid`` / ``--test``, as one :class:`FrameSet`.

Each entry is a file (a prepared HDF5 file from ``latent-lr prepare-data``, or
extended XYZ), a folder (its ``*.h5`` / ``*.hdf5`` shards, sorted by name) or
a glob pattern (its matches, sorted); several entries are concatenated in the
order given.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Sequence, Union

import h5py

from ..errors import UserInputError
from .dataset import LabelKeys, read_frames
from .frame_sets import ConcatFrames, FrameList, FrameSet
from .store import FrameStore

#: File endings of prepared shards looked for in a folder.
SHARD_SUFFIXES = (".h5", ".hdf5")


def data_paths(spec: Union[str, Sequence[str]]) -> list[str]:
    """The files named by ``spec``: paths, folders (their ``*.h5`` / ``*.hdf5`` shards, sorted) and globs (sorted)."""
    entries = [spec] if isinstance(spec, (str, Path)) else list(spec)
    paths: list[str] = []
    for entry in entries:
        text = str(entry)
        if Path(text).is_dir():
            shards = sorted(str(p) for p in Path(text).iterdir() if p.suffix in SHARD_SUFFIXES)
            if not shards:
                raise UserInputError(f"{text} is a folder without .h5 shards; give a file, or a folder written by latent-lr prepare-data.")
            paths.extend(shards)
        elif glob.has_magic(text) and not Path(text).exists():
            matches = sorted(glob.glob(text))
            if not matches:
                raise UserInputError(f"{text} matches no file; check the pattern.")
            paths.extend(matches)
        else:
            paths.append(text)
    if not paths:
        raise UserInputError("no data files given; name at least one file.")
    return paths


def is_prepared_file(path: Union[str, Path]) -> bool:
    """True for an HDF5 file (what ``latent-lr prepare-data`` writes)."""
    return bool(h5py.is_hdf5(path))  # False also for a missing or unreadable path


def open_frames(spec: Union[str, Sequence[str]], keys: LabelKeys) -> FrameSet:
    """One frame set from the files ``spec`` names (see :func:`data_paths`).

    Prepared HDF5 files are opened lazily (memory independent of their size);
    extended-XYZ files are read whole, as before.  Labels follow ``keys``: a
    prepared file holds the labels it was prepared with, and asking for one it
    lacks is an error.
    """
    parts: list[FrameSet] = []
    for path in data_paths(spec):
        parts.append(FrameStore(path, keys) if is_prepared_file(path) else FrameList(read_frames(path, keys)))
    return parts[0] if len(parts) == 1 else ConcatFrames(parts)
