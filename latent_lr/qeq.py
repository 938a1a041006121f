"""Qeq charge model: learned electronegativities χ_i and hardnesses J_i, then charge equilibration.

The physics and the solvers are in :mod:`latent_lr.electrostatics.qeq`; this
module holds only the learned part.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from .charges import MAX_ATOMIC_NUMBER, ChargeModel, feature_mlp
from .config import LongRangeConfig
from .data import AtomsBatch
from .electrostatics import EngineState
from .electrostatics.deferred_qeq import deferred_equilibration
from .electrostatics.linear_solve import DEFAULT_RTOL
from .electrostatics.qeq import PRECONDITIONERS, SOLVERS, equilibrate_charges, qeq_energy

#: Smallest hardness J (eV/e²) the head can predict, on top of the Gaussian self-energy.
HARDNESS_FLOOR = 0.1

#: Eval mode's default CG tolerance per unit engine accuracy: the solver's relative force error (≈ 5 rtol,
#: benchmarks/RESULTS.md §15.6) then stays below the engine's own.
MD_TOLERANCE_PER_ACCURACY = 0.1

#: Initial hardness J (eV/e²) of every element before training.
INITIAL_HARDNESS = 1.0


class QeqChargeHead(ChargeModel):
    """Learned χ_i, J_i from invariant features, then charge equilibration.

    χ_i = MLP_χ(h_i) + b_χ(Z_i) (eV/e); J_i = softplus(MLP_J(h_i) + b_J(Z_i)) +
    :data:`HARDNESS_FLOOR` (eV/e²), initialised near :data:`INITIAL_HARDNESS`.

    Args:
        feature_dim: F.
        hidden_dim: hidden width of both MLPs (0: linear).
        element_baseline: add learned per-element offsets b_χ(Z), b_J(Z).
        solver: ``"auto"``, ``"dense"`` or ``"cg"`` (see :func:`equilibrate_charges`).
        hardness_floor: smallest J, eV/e² (> 0).
        warm_start: start each CG solve from the engine state's last charges of the
            same structure identity (:mod:`latent_lr.electrostatics.warm_start`).
        preconditioner: CG preconditioner, ``"blocks"``, ``"kspace"`` or ``"jacobi"`` (see :func:`equilibrate_charges`).
        extrapolation: eval mode: degree of the extrapolated warm start
            (:mod:`latent_lr.electrostatics.warm_start`); training uses the last solution.
        md_rtol: eval mode: CG tolerance (None: :data:`MD_TOLERANCE_PER_ACCURACY` × the engine accuracy;
            training uses the dtype default).

    In training mode the charges carry their implicit derivatives from the forward
    pass (energy, forces and charge losses share them); in eval mode (MD,
    inference) derivatives are deferred (:mod:`latent_lr.electrostatics.deferred_qeq`):
    forces by Hellmann–Feynman, charge and higher derivatives only when asked for.
    """

    def __init__(
        self,
        feature_dim: int,
        hidden_dim: int = 32,
        element_baseline: bool = True,
        solver: str = "auto",
        hardness_floor: float = HARDNESS_FLOOR,
        warm_start: bool = True,
        preconditioner: str = "blocks",
        extrapolation: int = 0,
        md_rtol: Optional[float] = None,
    ):
        super().__init__()
        self.extrapolation = int(extrapolation)
        self.md_rtol = md_rtol
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"qeq_preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}.")
        self.warm_start = bool(warm_start)
        self.preconditioner = preconditioner
        if solver not in SOLVERS:
            raise ValueError(f"qeq_solver must be one of {SOLVERS}, got {solver!r}.")
        if not hardness_floor > 0:
            raise ValueError(f"hardness_floor must be > 0 eV/e² to keep Qeq convex, got {hardness_floor}.")
        self.solver = solver
        self.hardness_floor = hardness_floor
        self.electronegativity_net = feature_mlp(feature_dim, hidden_dim)
        self.hardness_net = feature_mlp(feature_dim, hidden_dim)
        offset = math.log(math.expm1(max(INITIAL_HARDNESS - hardness_floor, 1e-3)))
        output_layer = self.hardness_net[-1] if isinstance(self.hardness_net, nn.Sequential) else self.hardness_net
        assert isinstance(output_layer, nn.Linear), "feature_mlp ends with a Linear layer"
        nn.init.constant_(output_layer.bias, offset)
        if element_baseline:
            self.electronegativity_baseline: Optional[nn.Embedding] = nn.Embedding(MAX_ATOMIC_NUMBER + 1, 1)
            self.hardness_baseline: Optional[nn.Embedding] = nn.Embedding(MAX_ATOMIC_NUMBER + 1, 1)
            nn.init.zeros_(self.electronegativity_baseline.weight)
            nn.init.zeros_(self.hardness_baseline.weight)
        else:
            self.electronegativity_baseline = self.hardness_baseline = None

    @classmethod
    def from_config(cls, feature_dim: int, config: LongRangeConfig) -> "QeqChargeHead":
        return cls(
            feature_dim, config.hidden_dim, config.element_baseline, config.qeq_solver,
            warm_start=config.solver_warm_start, preconditioner=config.qeq_preconditioner,
            extrapolation=config.solver_extrapolation, md_rtol=config.qeq_md_rtol,
        )

    def eval_tolerance(self, accuracy: float, dtype: torch.dtype) -> float:
        """The CG tolerance of eval-mode solves: ``md_rtol``, or accuracy-tied, never below the dtype default."""
        if self.md_rtol is not None:
            return self.md_rtol
        return max(MD_TOLERANCE_PER_ACCURACY * accuracy, DEFAULT_RTOL.get(dtype, 1e-6))

    def parameters_per_atom(self, features: torch.Tensor, numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(χ (N,) eV/e, J (N,) eV/e²) before any field shift."""
        chi = self.electronegativity_net(features).squeeze(-1)
        raw_hardness = self.hardness_net(features).squeeze(-1)
        if self.electronegativity_baseline is not None and self.hardness_baseline is not None:  # set together
            chi = chi + self.electronegativity_baseline(numbers).squeeze(-1)
            raw_hardness = raw_hardness + self.hardness_baseline(numbers).squeeze(-1)
        return chi, nn.functional.softplus(raw_hardness) + self.hardness_floor

    def forward(
        self,
        features: torch.Tensor,
        data: AtomsBatch,
        smearing: torch.Tensor,
        accuracy: float = 1e-6,
        engine_state: Optional[EngineState] = None,
        charge_sign: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: features (N, F), the batch, σ (Å), Ewald accuracy, the sign gauge (±1; multiplies χ, so
        neutral charges without a field flip with it). Returns (charges (N,) e, energy (B,) eV)."""
        chi, hardness = self.parameters_per_atom(features, data.numbers)
        if charge_sign is not None:
            chi = chi * charge_sign.to(chi.dtype)
        shifted = chi
        field = data.external_field
        # A zero field that requires grad (the polarisability ∂μ/∂E at E = 0) still needs the shift.
        if field is not None and (field.requires_grad or bool((field != 0).any())):
            shifted = chi - (data.positions * field.to(chi.dtype)[data.batch]).sum(1)
        geometry = (data.positions, data.cell, data.pbc, data.batch)
        solve = None if engine_state is None else engine_state.solutions.begin(
            "qeq", data.numbers, data.batch, data.n_structures, chi, warm=self.warm_start,
            extrapolation=0 if self.training else self.extrapolation, positions=data.positions,
        )
        options: dict[str, Any] = dict(
            accuracy=accuracy, solver=self.solver, state=engine_state, initial=None if solve is None else solve.initial,
            statistics=None if solve is None else solve.statistics, preconditioner=self.preconditioner,
        )
        if self.training:
            # Energy, forces and charge losses differentiated together share one implicit graph.
            charges = equilibrate_charges(shifted, hardness, *geometry, data.total_charge, smearing, **options)
            energy = qeq_energy(charges, chi, hardness, *geometry, smearing, accuracy, engine_state)
        else:
            # MD and inference: forces by Hellmann–Feynman, charge derivatives only when asked for.
            charges, energy = deferred_equilibration(
                shifted, hardness, *geometry, data.total_charge, smearing, **options,
                rtol=self.eval_tolerance(accuracy, chi.dtype),
            )
            if shifted is not chi:  # the reported energy excludes the field term −Σ q r·E_ext
                energy = energy + charges.new_zeros(data.n_structures).index_add(0, data.batch, (chi - shifted) * charges)
        if solve is not None:
            solve.finish(charges)
        return charges, energy
