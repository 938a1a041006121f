"""Differentiable electrostatics: pure functions of positions, charges, cell,
pbc and batch (and an explicit :class:`EngineState` for history-dependent
choices such as PME's kept mesh).  Knows nothing about learning."""

from .coulomb import coulomb_energy
from .setup_cache import clear_setup_cache
from .state import EngineState

__all__ = ["EngineState", "clear_setup_cache", "coulomb_energy"]
