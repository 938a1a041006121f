"""latent-lr: learned long-range electrostatics for short-range ML potentials."""

from .adapters.radial import RadialPotential
from .backbone import Backbone
from .calculator import Calculator
from .config import LongRangeConfig
from .data import AtomsBatch
from .derivatives import forces_and_stress
from .electrostatics import coulomb_energy
from .electrostatics.linear_solve import ConvergenceError, solve_spd
from .electrostatics.qeq import equilibrate_charges
from .host_files import load_host
from .long_range import LongRangeModule
from .model import LongRangeModel
from .properties import born_effective_charges, dipole_moment, polarization
from .qeq import QeqChargeHead
from .serialization import load, save
from .sign_convention import SignDecision, apply_sign_convention
from .units import COULOMB_CONSTANT
from .wrap import wrap

__version__ = "0.1.0"


__all__ = [
    "AtomsBatch",
    "Backbone",
    "COULOMB_CONSTANT",
    "Calculator",
    "ConvergenceError",
    "LongRangeConfig",
    "LongRangeModel",
    "LongRangeModule",
    "QeqChargeHead",
    "RadialPotential",
    "SignDecision",
    "apply_sign_convention",
    "born_effective_charges",
    "coulomb_energy",
    "dipole_moment",
    "equilibrate_charges",
    "forces_and_stress",
    "load",
    "load_host",
    "polarization",
    "save",
    "solve_spd",
    "wrap",
    "__version__",
]
