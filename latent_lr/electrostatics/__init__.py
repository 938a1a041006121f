"""Differentiable electrostatics: pure functions of positions, charges, cell,
pbc and batch.  Knows nothing about learning."""

from .coulomb import coulomb_energy

__all__ = ["coulomb_energy"]
