"""A wrapped model as a TorchSim model: batched MD and relaxation of many structures.

    import torch_sim as ts
    from latent_lr.torchsim import TorchSimModel
    ts_model = TorchSimModel(model)                       # model from latent_lr.wrap / load
    state = ts.initialize_state(list_of_atoms, ts_model.device, ts_model.dtype)
    relaxed = ts.optimize(state, ts_model, optimizer=ts.optimizers.fire)
    final = ts.integrate(state, ts_model, integrator=ts.nvt_langevin, n_steps=1000,
                         temperature=300, timestep=0.001)  # ps (TorchSim metal units)

Every call evaluates the whole TorchSim batch (all its structures) in one
forward pass of the model, the engine's many-small-structures path.  Units are
TorchSim's metal units: Å, eV, eV/Å, stress in eV/Å³ with ASE's sign
(σ = (1/V) ∂E/∂ε).  TorchSim states carry one ``pbc`` flag for the whole
batch: all structures periodic (cell from the state) or all open.  Net charges
(e) and uniform external fields (V/Å) per structure come from the
constructor, or from ``state.charge`` / ``state.external_field`` where a
state has them.  Per-structure values given to the constructor must match
the batch; ``ts.optimize`` drops converged structures from its batch, so give
it one value for all structures (or a state that carries ``charge``).  Only
this module imports ``torch_sim``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch_sim.models.interface import ModelInterface
from torch_sim.state import SimState

from .data import AtomsBatch
from .electrostatics import EngineState
from .errors import UserInputError
from .model import LongRangeModel
from .spin import SPIN_KEY, check_spin_fits_electrons
from .spin import total_spin as total_spin_of

#: A per-structure quantity: one value for every structure, or a (B,) / (B, 3) tensor.
PerStructure = Union[float, Sequence[float], torch.Tensor]


class TorchSimModel(ModelInterface):
    """TorchSim's model interface around a wrapped model.

    Args:
        model: a model from :func:`latent_lr.wrap` or :func:`latent_lr.load`.
        total_charge: net charge, e: a number for every structure or (B,) per structure
            (default: ``state.charge`` where present, else 0).
        external_field: uniform field, V/Å: (3,) for every structure or (B, 3)
            (default: ``state.external_field`` where present, else none).
        compute_stress: return ``stress`` (B, 3, 3), eV/Å³ (periodic batches only;
            zeros for open ones).
        total_spin: total spin 2S_z = N↑ − N↓ (an integer): a number for every structure or (B,)
            per structure (default 0); read only by a model with ``spin_channel``.

    Outputs of a call: ``energy`` (B,) eV, ``forces`` (N, 3) eV/Å, ``stress``
    (B, 3, 3) eV/Å³ when computed, and ``charges`` (N,) e (latent charges).
    """

    def __init__(
        self,
        model: LongRangeModel,
        *,
        total_charge: Optional[PerStructure] = None,
        external_field: Optional[PerStructure] = None,
        compute_stress: bool = True,
        total_spin: Optional[PerStructure] = None,
    ):
        super().__init__()
        if not isinstance(model, LongRangeModel):
            raise UserInputError("TorchSimModel takes a model from latent_lr.wrap() or latent_lr.load().")
        self.model = model.eval()
        self._device = model.device
        self._dtype = model.dtype
        self._compute_stress = compute_stress
        self._compute_forces = True
        self._memory_scales_with = "n_atoms_x_density"
        self.total_charge = total_charge
        self.external_field = external_field
        for value in [] if total_spin is None else torch.as_tensor(total_spin).reshape(-1).tolist():
            total_spin_of({SPIN_KEY: value}, [], float("nan"), where="TorchSimModel(total_spin=...)")
        self.total_spin = total_spin
        #: This model's engine state (PME keeps its meshes along a run); never shared.
        self.engine_state = EngineState()

    def batch(self, state: Union[SimState, dict[str, Any]]) -> AtomsBatch:
        """The TorchSim state as an :class:`~latent_lr.AtomsBatch` (row-vector cells, zeros when open)."""
        if isinstance(state, dict):
            state = SimState(**state)
        n_systems = state.n_systems
        as_float = dict(dtype=self._dtype, device=self._device)
        periodic = bool(state.pbc)
        cell = state.row_vector_cell.to(**as_float)
        data = AtomsBatch(
            positions=state.positions.to(**as_float),
            numbers=state.atomic_numbers.to(device=self._device, dtype=torch.long),
            cell=cell if periodic else torch.zeros_like(cell),
            pbc=torch.full((n_systems, 3), periodic, dtype=torch.bool, device=self._device),
            batch=state.system_idx.to(device=self._device, dtype=torch.long),
            total_charge=self._per_structure(
                "total_charge", self.total_charge, getattr(state, "charge", None), (n_systems,)
            ),
            external_field=self._per_structure(
                "external_field", self.external_field, getattr(state, "external_field", None), (n_systems, 3)
            ),
            total_spin=self._per_structure("total_spin", self.total_spin, None, (n_systems,)),
        )
        if self.total_spin is not None and self.model.reads_spin:
            self._check_spins(data)
        return data

    @staticmethod
    def _check_spins(data: AtomsBatch) -> None:
        """Each structure's 2S_z against its Σ Z − Q electrons (parity and size), a one-line error."""
        assert data.total_spin is not None and data.total_charge is not None
        zeros = torch.zeros(data.n_structures, dtype=torch.long, device=data.numbers.device)
        sums = zeros.index_add(0, data.batch, data.numbers).tolist()
        for index, (spin, atomic_number_sum, charge) in enumerate(
            zip(data.total_spin.tolist(), sums, data.total_charge.tolist())
        ):
            try:
                check_spin_fits_electrons(round(spin), atomic_number_sum, charge, f"TorchSimModel(total_spin=...), structure {index}")
            except ValueError as error:
                raise UserInputError(str(error)) from None

    def _per_structure(
        self, name: str, given: Optional[PerStructure], from_state: Optional[torch.Tensor], shape: tuple[int, ...]
    ) -> torch.Tensor:
        """``given`` (or the state's value, or zeros) broadcast to ``shape``, in the model's dtype."""
        value = given if given is not None else from_state
        if value is None:
            return torch.zeros(shape, dtype=self._dtype, device=self._device)
        tensor = torch.as_tensor(value, dtype=self._dtype, device=self._device)
        try:
            return tensor.expand(shape).clone()
        except RuntimeError:
            raise UserInputError(
                f"{name} has shape {tuple(tensor.shape)}, which does not fit this batch of {shape[0]} "
                f"structures; give one value for all or {shape} values."
            ) from None

    def forward(self, state: Union[SimState, dict[str, Any]], **kwargs: Any) -> dict[str, torch.Tensor]:
        """Energy (B,) eV, forces (N, 3) eV/Å, stress (B, 3, 3) eV/Å³ and latent charges (N,) e."""
        data = self.batch(state)
        periodic = bool(data.pbc.all())
        out = self.model(
            data, compute_forces=True, compute_stress=self._compute_stress and periodic,
            engine_state=self.engine_state,
        )
        result = {"energy": out["energy"], "forces": out["forces"]}
        if self._compute_stress:
            result["stress"] = out["stress"] if periodic else data.cell.new_zeros(data.n_structures, 3, 3)
        if "charges" in out:
            result["charges"] = out["charges"]
        return result


__all__ = ["PerStructure", "TorchSimModel"]
