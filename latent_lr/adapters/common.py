"""Helpers shared by the backbone adapters.

Everything here is independent of any backbone package (no e3nn, mace, nequip,
chgnet or cace import), so every adapter can use it: edge shifts from integer
cell offsets, selection of the invariant (0e) channels of e3nn-style irreps,
an element table and atomic-number lookups, feature capture by a forward hook,
conversion of constructor arguments to JSON, and an environment guard for
packages that set environment variables on import.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from ase.data import atomic_numbers as _ATOMIC_NUMBERS
from ase.data import chemical_symbols as _CHEMICAL_SYMBOLS
from torch import nn

#: Chemical symbol of each atomic number (index 0 is the placeholder ``"X"``), 119 entries.
CHEMICAL_SYMBOLS: tuple[str, ...] = tuple(_CHEMICAL_SYMBOLS)
#: Number of entries of the element table (atomic numbers 0..118).
N_ELEMENTS = len(CHEMICAL_SYMBOLS)


def edge_shifts(unit_shifts: torch.Tensor, cell: torch.Tensor, structure: torch.Tensor) -> torch.Tensor:
    """Cartesian image offsets of edges, S_e = n_e @ cell[b_e], in Å.

    Computed in torch from the (possibly strained, gradient-carrying) cell, so
    strain reaches every edge vector r_j - r_i + S_e.

    Args:
        unit_shifts: (E, 3) integer image offsets (any dtype; cast to the cell's).
        cell: (B, 3, 3) Å, rows are lattice vectors.
        structure: (E,) long, the structure index of each edge (of its sender).

    Returns:
        (E, 3) Å, in the cell's dtype.
    """
    return torch.einsum("ea,eab->eb", unit_shifts.to(cell.dtype), cell[structure])


def scalar_slices(irreps: Iterable[Any]) -> list[slice]:
    """Slices of the invariant (0e) channels of an e3nn-style irreps layout.

    Parity-odd scalars (0o) are left out: they change sign under reflection.

    Args:
        irreps: iterable of ``(multiplicity, irrep)`` pairs whose irreps have
            ``l``, ``p`` and ``dim`` (e.g. an ``e3nn.o3.Irreps``).

    Returns:
        slices into a feature vector of width ``sum(multiplicity * irrep.dim)``.
    """
    slices, offset = [], 0
    for multiplicity, irrep in irreps:
        width = int(multiplicity) * int(irrep.dim)
        if irrep.l == 0 and irrep.p == 1:
            slices.append(slice(offset, offset + width))
        offset += width
    return slices


def scalar_index(layers: Sequence[Iterable[Any]]) -> torch.Tensor:
    """Column indices of the 0e channels of features concatenated layer by layer.

    Args:
        layers: one e3nn-style irreps layout per concatenated block, in order.

    Returns:
        (F,) long tensor of column indices.
    """
    index: list[int] = []
    offset = 0
    for irreps in layers:
        pairs = list(irreps)
        for part in scalar_slices(pairs):
            index.extend(range(offset + part.start, offset + part.stop))
        offset += sum(int(multiplicity) * int(irrep.dim) for multiplicity, irrep in pairs)
    return torch.tensor(index, dtype=torch.long)


def atomic_number(symbol: str) -> int:
    """Atomic number of a chemical symbol; ValueError if it is not one."""
    if symbol not in _ATOMIC_NUMBERS or symbol == "X":
        raise ValueError(f"{symbol!r} is not a chemical symbol (e.g. 'H', 'Na').")
    return int(_ATOMIC_NUMBERS[symbol])


def is_element_symbol(name: str) -> bool:
    """Whether ``name`` is a chemical symbol ('H' ... 'Og')."""
    return name in _ATOMIC_NUMBERS and name != "X"


def chemical_symbol(number: int) -> str:
    """Chemical symbol of an atomic number 1..118; ValueError otherwise."""
    if not 0 < int(number) < N_ELEMENTS:
        raise ValueError(f"atomic number {number} is not an element (1..{N_ELEMENTS - 1}).")
    return CHEMICAL_SYMBOLS[int(number)]


def species_lookup(atomic_numbers: Sequence[int], indices: Sequence[int] | None = None) -> torch.Tensor:
    """Table from atomic number to a host's species (type) index, -1 where unknown.

    Use it as ``table[data.numbers]`` (register it as a non-persistent buffer
    so it follows the model's device).

    Args:
        atomic_numbers: the atomic numbers the host knows.
        indices: the host's index of each; default ``0, 1, ...`` in the given order.

    Returns:
        (119,) long tensor.
    """
    numbers = [int(z) for z in atomic_numbers]
    bad = [z for z in numbers if not 0 < z < N_ELEMENTS]
    if bad:
        raise ValueError(f"atomic numbers {bad} are not elements (1..{N_ELEMENTS - 1}).")
    table = torch.full((N_ELEMENTS,), -1, dtype=torch.long)
    values = range(len(numbers)) if indices is None else [int(i) for i in indices]
    table[torch.tensor(numbers, dtype=torch.long)] = torch.tensor(list(values), dtype=torch.long)
    return table


@contextlib.contextmanager
def captured_output(module: nn.Module) -> Iterator[list[Any]]:
    """Collect ``module``'s forward outputs while the block runs (hook removed afterwards).

    Example::

        with captured_output(host.layers[-1]) as outputs:
            host(inputs)
        features = outputs[-1]
    """
    outputs: list[Any] = []
    handle = module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def to_json(value: Any, as_string: tuple[type, ...] = ()) -> Any:
    """A JSON-serialisable copy of a constructor argument (recursively).

    Classes and named functions become their ``__name__``; tensors, arrays and
    NumPy scalars become Python lists/numbers; tuples become lists.

    Args:
        value: the value to convert.
        as_string: types written as ``str(value)`` (e.g. ``e3nn.o3.Irreps``),
            checked before anything else.
    """
    if as_string and isinstance(value, as_string):
        return str(value)
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [to_json(item, as_string) for item in value]
    if isinstance(value, dict):
        return {key: to_json(item, as_string) for key, item in value.items()}
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__
    return value


def require_json(value: Any, what: str) -> None:
    """Raise ValueError if ``value`` cannot be written as JSON (``what`` names it)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be JSON values (numbers, strings, lists, dicts): {error}.") from error


@contextlib.contextmanager
def restored_environment() -> Iterator[None]:
    """Undo every change to ``os.environ`` made inside the block (some packages set variables on import)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
