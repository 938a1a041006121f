"""Differentiable electrostatics: pure functions of positions, charges, cell,
pbc and batch (and an explicit :class:`EngineState` for history-dependent
choices such as PME's kept mesh).  Knows nothing about learning.

Besides the Coulomb energy and field, the pure solvers that the learned heads
use live here: charge equilibration (:func:`equilibrate_charges`), induced
dipoles (:func:`one_step_induction`, :func:`self_consistent_induction`) and
the batched SPD solve with implicit gradients (:func:`solve_spd`).
"""

from .coulomb import coulomb_energy
from .field import electric_field
from .induction import one_step_induction, self_consistent_induction
from .linear_solve import ConvergenceError, solve_spd
from .qeq import equilibrate_charges, qeq_energy
from .setup_cache import clear_setup_cache
from .state import EngineState

__all__ = [
    "ConvergenceError",
    "EngineState",
    "clear_setup_cache",
    "coulomb_energy",
    "electric_field",
    "equilibrate_charges",
    "one_step_induction",
    "qeq_energy",
    "self_consistent_induction",
    "solve_spd",
]
