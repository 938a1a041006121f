"""latent-lr: learned long-range electrostatics for short-range ML potentials."""

from .electrostatics import coulomb_energy
from .units import COULOMB_CONSTANT

__version__ = "0.1.0"
__all__ = ["coulomb_energy", "COULOMB_CONSTANT", "__version__"]
