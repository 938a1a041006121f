"""NequIP (nequip 0.19) adapter.

Features: the 0e node-feature channels after every ``ConvNetLayer``, in layer
order.  Host energy: NequIP's total energy (eV; per-type scales/shifts, ZBL).
The adapter builds NequIP's float64 ``AtomicDataDict`` from positions and cell
as given (so NequIP's edge vectors carry latent-lr's strain) and runs the
energy network's modules one by one, skipping ``ForceStressOutput``.  Hosts:
eager ``GraphModel`` objects (nequip builders, ``ModelFromCheckpoint``).

Options: ``chemical_species_to_atom_type_map`` (as nequip's, for type names
that are not chemical symbols) and ``config`` (nequip's model config, needed to
save hosts this adapter did not build; it records the config on those it builds).

Side effects: ``import nequip`` runs with the environment restored; builders run
with nequip's global state marked initialised instead of calling its
``set_global_state()`` (which reseeds and sets dtype, environment and e3nn
settings process-wide), and everything is put back afterwards.
Tested with nequip 0.19.1, e3nn 0.6.0, torch 2.13 (CPU).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from latent_lr.backbone import Backbone, isolated_global_state
from latent_lr.data import AtomsBatch
from latent_lr.neighbors import radius_graph

from .common import atomic_number, chemical_symbol, is_element_symbol, require_json, restored_environment
from .common import scalar_slices, species_lookup

with isolated_global_state(), restored_environment():
    import e3nn
    import nequip
    import nequip.model
    from e3nn import o3
    from nequip.data import AtomicDataDict
    from nequip.nn import ConvNetLayer, ForceStressOutput, GraphModel, SequentialGraphNetwork
    from nequip.utils import global_state as _nequip_global_state

#: nequip model builders build_host may call (config "_target_").
BUILDERS = {f"nequip.model.{n}": getattr(nequip.model, n) for n in ("NequIPGNNModel", "PresetNequIPGNNModel", "FullNequIPGNNModel")}

#: default_host's small model (nequip.model.NequIPGNNModel arguments).
DEFAULT_OPTIONS = dict(
    model_dtype="float64", r_max=5.0, num_layers=2, l_max=1, parity=False, num_features=16,
    radial_mlp_depth=1, radial_mlp_width=32, num_bessels=8, polynomial_cutoff_p=6,
    avg_num_neighbors=20.0, per_type_energy_scales=1.0, per_type_energy_shifts=0.0,
)

#: e3nn settings nequip's set_global_state applies (torch >= 2.10).
_E3NN_SETTINGS = dict(specialized_code=True, optimize_einsums=True, jit_mode="eager")


@contextlib.contextmanager
def _nequip_builder_state() -> Iterator[None]:
    """Let nequip's model builders run without nequip's process-wide set-up (see module doc)."""
    with isolated_global_state(), restored_environment():
        was_initialised = _nequip_global_state._GLOBAL_STATE_INITIALIZED
        e3nn_settings = e3nn.get_optimization_defaults()
        try:
            if not was_initialised:
                e3nn.set_optimization_defaults(**_E3NN_SETTINGS)
                _nequip_global_state._GLOBAL_STATE_INITIALIZED = True
            yield
        finally:
            _nequip_global_state._GLOBAL_STATE_INITIALIZED = was_initialised
            e3nn.set_optimization_defaults(**e3nn_settings)


def _energy_network(host: nn.Module) -> "SequentialGraphNetwork":
    network = host.model if isinstance(host, GraphModel) else None
    network = network.func if isinstance(network, ForceStressOutput) else network
    if not isinstance(network, SequentialGraphNetwork):
        raise ValueError(
            f"the NequIP adapter takes an eager nequip GraphModel (GraphModel -> [ForceStressOutput ->] "
            f"SequentialGraphNetwork, from nequip.model builders or ModelFromCheckpoint), got "
            f"{type(host).__name__}; compiled or modified nequip models are not supported."
        )
    return network


def _check_targets(value: Any, where: str = "config") -> None:
    """Refuse non-nequip ``_target_`` entries (hydra would import and call them)."""
    target = value.get("_target_") if isinstance(value, dict) else None
    if target is not None and not str(target).startswith("nequip."):
        raise ValueError(f"{where} names _target_ {target!r}; only nequip classes are allowed.")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        _check_targets(item, f"{where}[{key!r}]")


class NequipBackbone(Backbone):
    """Adapter for nequip's ``GraphModel``; options as in the module docstring."""

    label = "NequIP"
    name = "nequip"

    def __init__(
        self,
        host: nn.Module,
        chemical_species_to_atom_type_map: Optional[dict[str, str]] = None,
        config: Optional[dict[str, Any]] = None,
    ):
        super().__init__(host)
        network = _energy_network(host)
        built = getattr(host, "_latent_lr_config", None) or {}  # recorded by build_host
        self.model_config = copy.deepcopy(config if config is not None else built.get("model"))
        type_names = [str(name) for name in host.type_names]
        species_map = chemical_species_to_atom_type_map or built.get("chemical_species_to_atom_type_map")
        if species_map is None:
            not_elements = [name for name in type_names if not is_element_symbol(name)]
            if not_elements:
                raise ValueError(
                    f"type names {not_elements} of this nequip model are not chemical symbols; pass "
                    "adapter_options={'chemical_species_to_atom_type_map': {'Cu': 'my_Cu', ...}}."
                )
            species_map = {name: name for name in type_names}
        bad = {k: v for k, v in species_map.items() if not is_element_symbol(k) or v not in type_names}
        if bad:
            raise ValueError(
                f"chemical_species_to_atom_type_map entries {bad} need chemical symbols mapped to the "
                f"model's type names {type_names}."
            )
        self.species_map = dict(species_map)
        numbers = [atomic_number(symbol) for symbol in species_map]
        types = [type_names.index(name) for name in species_map.values()]
        self.register_buffer("element_index", species_lookup(numbers, types), persistent=False)
        self.feature_slices = {
            name: scalar_slices(o3.Irreps(module.irreps_out[AtomicDataDict.NODE_FEATURES_KEY]))
            for name, module in network.named_children()
            if isinstance(module, ConvNetLayer)
        }
        self._r_max = float(host.metadata["r_max"])

    @property
    def feature_dim(self) -> int:
        return sum(part.stop - part.start for parts in self.feature_slices.values() for part in parts)

    @property
    def cutoff(self) -> float:
        return self._r_max

    @property
    def known_elements(self) -> list[int]:
        return sorted(atomic_number(symbol) for symbol in self.species_map)

    def forward(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        edge_index, unit_shifts = radius_graph(data, self.cutoff)
        field = torch.float64  # nequip's data are float64 for every model dtype
        inputs = {
            AtomicDataDict.POSITIONS_KEY: data.positions.to(field),
            AtomicDataDict.EDGE_INDEX_KEY: edge_index,
            AtomicDataDict.EDGE_CELL_SHIFT_KEY: unit_shifts.to(field),
            AtomicDataDict.CELL_KEY: data.cell.to(field),
            AtomicDataDict.BATCH_KEY: data.batch,
            AtomicDataDict.NUM_NODES_KEY: data.n_atoms,
            AtomicDataDict.ATOM_TYPE_KEY: self.element_index[data.numbers],
        }
        features = []
        with isolated_global_state():
            for name, module in _energy_network(self.host).named_children():
                inputs = module(inputs)
                features.extend(inputs[AtomicDataDict.NODE_FEATURES_KEY][:, part] for part in self.feature_slices.get(name, ()))
        dtype = data.positions.dtype
        return inputs[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1).to(dtype), torch.cat(features, dim=1).to(dtype)

    def host_config(self) -> dict[str, Any]:
        if self.model_config is None:
            raise ValueError(
                "this nequip model's hyper-parameters are unknown (it was not built by latent-lr); "
                "wrap it with adapter_options={'config': <the model block of its nequip config, "
                "with _target_ and seed, model_dtype, type_names, r_max, ...>}."
            )
        config = {"model": copy.deepcopy(self.model_config), "chemical_species_to_atom_type_map": dict(self.species_map)}
        require_json(config, "the nequip model config")
        return config

    @classmethod
    def build_host(cls, config: dict[str, Any]) -> nn.Module:
        model_config = dict(config["model"])
        _check_targets(model_config)
        target = model_config.pop("_target_", None)
        if target not in BUILDERS:
            raise ValueError(f"unsupported nequip model builder {target!r}; supported: {sorted(BUILDERS)}.")
        model_config.pop("compile_mode", None)  # the adapter runs the eager modules
        with _nequip_builder_state():
            host = BUILDERS[target](**model_config)
        host._latent_lr_config = copy.deepcopy(dict(config))  # the host's build recipe (see module doc)
        return host

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "NequipBackbone":
        host = config["host"]
        return cls(cls.build_host(host), host["chemical_species_to_atom_type_map"], host["model"])

    @classmethod
    def default_host(cls, species: Sequence[int], **options: Any) -> nn.Module:
        """A small random ``NequIPGNNModel`` (``options`` override its arguments).

        ``seed`` defaults to a draw from torch's global generator (``torch.manual_seed`` makes it reproducible).
        """
        symbols = [chemical_symbol(z) for z in sorted({int(z) for z in species})]
        settings = dict(DEFAULT_OPTIONS, **options, type_names=symbols)
        if "seed" not in settings:  # drawn only when not given
            settings["seed"] = int(torch.randint(0, 2**31 - 1, ()).item())
        model = {"_target_": "nequip.model.NequIPGNNModel", **settings}
        require_json(model, "NequIP host options")
        return cls.build_host({"model": model, "chemical_species_to_atom_type_map": {s: s for s in symbols}})
