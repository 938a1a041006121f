"""NequIP (nequip 0.19) adapter.

Features: the invariant (0e) channels of the node features after every
``ConvNetLayer``, concatenated in layer order (the last layer's output, which
is all scalars, is what NequIP's energy read-out sees; parity-odd 0o channels
of ``parity=True`` models are left out because they change sign under
reflection).  Host energy: NequIP's total energy per structure, in eV,
including its per-type energy scales and shifts and any pair potential (ZBL).

How the host is run: the adapter builds NequIP's ``AtomicDataDict`` itself
(``pos``, ``edge_index`` (row 0 centre, row 1 neighbour), ``edge_cell_shift``,
``cell`` (B, 3, 3), ``batch``, ``num_atoms``, ``atom_types``) from the
:class:`~latent_lr.data.AtomsBatch`, with positions and cell as given, so
NequIP's own edge vectors ``pos[j] - pos[i] + edge_cell_shift @ cell`` carry
latent-lr's strain.  It then runs the modules of the energy network (the
``SequentialGraphNetwork`` inside ``GraphModel -> ForceStressOutput``) one by
one, skipping ``ForceStressOutput``: latent-lr differentiates the total energy
itself, so there is no second force computation and no double backward.  As
in NequIP, the data fields are float64 whatever the model dtype; energy and
features are returned in the positions' dtype.

Hosts: ``GraphModel`` objects from nequip's model builders
(``nequip.model.NequIPGNNModel``, ``PresetNequIPGNNModel``,
``FullNequIPGNNModel``) or from ``nequip.model.ModelFromCheckpoint`` (eager
mode).  Compiled (``nequip-compile``) and packaged (``nequip-package``) models
are not supported.  Type names must be chemical symbols unless
``adapter_options={"chemical_species_to_atom_type_map": {"Cu": "my_Cu", ...}}``
is given (same meaning as in nequip's ``ChemicalSpeciesToAtomTypeMapper``).

Saving: :meth:`NequipBackbone.host_config` is nequip's own model config (the
``model:`` block of a nequip training config, ``_target_`` plus builder
arguments) and the species map.  Hosts built by :meth:`default_host` or
:meth:`build_host` carry it; for other hosts pass it as
``adapter_options={"config": {"_target_": "nequip.model.NequIPGNNModel", ...}}``.

Tested with nequip 0.19.1, e3nn 0.6.0, torch 2.13 (CPU).

Side effects handled:

* ``import nequip`` imports lightning, which sets
  ``PYTORCH_NVML_BASED_CUDA_CHECK``, and torch inductor, which sets
  ``TORCHINDUCTOR_CACHE_DIR``; the import runs with the environment restored
  afterwards.
* nequip's model builders refuse to run before
  ``nequip.utils.global_state.set_global_state()``, which reseeds Python's,
  NumPy's and torch's random generators, sets torch's default dtype to float64,
  sets environment variables, TorchScript fusion, e3nn, torch._dynamo and
  multiprocessing settings process-wide.  The adapter does not call it: while
  a host is built it marks nequip's global state as initialised (and applies
  the e3nn optimisation settings nequip would), then puts the flag and e3nn's
  settings back.  The builder itself seeds inside an RNG-isolating context
  and sets the default dtype only during the build.
* Everything runs inside :func:`latent_lr.backbone.isolated_global_state`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Any, Iterator, Optional, Sequence

import torch
from ase.data import atomic_numbers as ATOMIC_NUMBERS
from ase.data import chemical_symbols as CHEMICAL_SYMBOLS
from torch import nn

from latent_lr.backbone import Backbone, isolated_global_state, reject_unknown_elements
from latent_lr.data import AtomsBatch
from latent_lr.neighbors import radius_graph


@contextlib.contextmanager
def _restored_environment() -> Iterator[None]:
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


with isolated_global_state(), _restored_environment():
    import e3nn
    import nequip
    import nequip.model
    from e3nn import o3
    from nequip.data import AtomicDataDict
    from nequip.nn import ConvNetLayer, ForceStressOutput, GraphModel, SequentialGraphNetwork
    from nequip.utils import global_state as _nequip_global_state

#: nequip model builders build_host may call (config "_target_").
BUILDERS = {
    f"nequip.model.{name}": getattr(nequip.model, name)
    for name in ("NequIPGNNModel", "PresetNequIPGNNModel", "FullNequIPGNNModel")
}

#: default_host's small model (nequip.model.NequIPGNNModel arguments).
DEFAULT_OPTIONS = dict(
    model_dtype="float64",
    r_max=5.0,
    num_layers=2,
    l_max=1,
    parity=False,
    num_features=16,
    radial_mlp_depth=1,
    radial_mlp_width=32,
    num_bessels=8,
    polynomial_cutoff_p=6,
    avg_num_neighbors=20.0,
    per_type_energy_scales=1.0,
    per_type_energy_shifts=0.0,
)

#: e3nn settings nequip's set_global_state applies (torch >= 2.10).
_E3NN_SETTINGS = dict(specialized_code=True, optimize_einsums=True, jit_mode="eager")


@contextlib.contextmanager
def _nequip_builder_state() -> Iterator[None]:
    """Let nequip's model builders run without nequip's process-wide set-up (see module doc)."""
    with isolated_global_state(), _restored_environment():
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


def _scalar_slices(irreps: "o3.Irreps") -> list[slice]:
    slices, offset = [], 0
    for multiplicity, irrep in o3.Irreps(irreps):
        width = multiplicity * irrep.dim
        if irrep.l == 0 and irrep.p == 1:
            slices.append(slice(offset, offset + width))
        offset += width
    return slices


def _energy_network(host: nn.Module) -> "SequentialGraphNetwork":
    if not isinstance(host, GraphModel):
        raise ValueError(
            f"the NequIP adapter takes a nequip GraphModel (from nequip.model builders or "
            f"ModelFromCheckpoint in eager mode), got {type(host).__name__}."
        )
    network = host.model
    if isinstance(network, ForceStressOutput):
        network = network.func
    if not isinstance(network, SequentialGraphNetwork):
        raise ValueError(
            f"expected GraphModel -> [ForceStressOutput ->] SequentialGraphNetwork, found "
            f"{type(network).__name__} inside; compiled or modified nequip models are not supported."
        )
    return network


def _check_targets(value: Any, where: str = "config") -> None:
    """Refuse non-nequip ``_target_`` entries (hydra would import and call them)."""
    if isinstance(value, dict):
        target = value.get("_target_")
        if target is not None and not str(target).startswith("nequip."):
            raise ValueError(f"{where} names _target_ {target!r}; only nequip classes are allowed.")
        for key, item in value.items():
            _check_targets(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_targets(item, f"{where}[{index}]")


class NequipBackbone(Backbone):
    """Adapter for nequip's ``GraphModel`` (NequIP GNN models).

    Args:
        host: the nequip model.
        chemical_species_to_atom_type_map: ``{chemical symbol: type name}``;
            default: the host's saved map, else the identity on its type names.
        config: nequip model config (``_target_`` + builder arguments) that
            rebuilds ``host``, needed by :func:`latent_lr.save` for hosts not
            built by this adapter.
    """

    name = "nequip"

    def __init__(
        self,
        host: nn.Module,
        chemical_species_to_atom_type_map: Optional[dict[str, str]] = None,
        config: Optional[dict[str, Any]] = None,
    ):
        super().__init__(host)
        network = _energy_network(host)
        saved = getattr(host, "_latent_lr_config", None) or {}
        self.model_config = copy.deepcopy(config if config is not None else saved.get("model"))
        type_names = [str(name) for name in host.type_names]
        if not type_names:
            raise ValueError("this nequip GraphModel has no type_names; build it with a nequip model builder.")
        species_map = chemical_species_to_atom_type_map or saved.get("chemical_species_to_atom_type_map")
        if species_map is None:
            not_elements = [name for name in type_names if name not in ATOMIC_NUMBERS]
            if not_elements:
                raise ValueError(
                    f"type names {not_elements} of this nequip model are not chemical symbols; pass "
                    "adapter_options={'chemical_species_to_atom_type_map': {'Cu': 'my_Cu', ...}}."
                )
            species_map = {name: name for name in type_names}
        lookup = torch.full((119,), -1, dtype=torch.long)
        for symbol, type_name in species_map.items():
            if symbol not in ATOMIC_NUMBERS or type_name not in type_names:
                raise ValueError(
                    f"chemical_species_to_atom_type_map entry {symbol!r}: {type_name!r} needs a chemical "
                    f"symbol and one of the model's type names {type_names}."
                )
            lookup[ATOMIC_NUMBERS[symbol]] = type_names.index(type_name)
        self.species_map = dict(species_map)
        self.atomic_numbers = sorted(ATOMIC_NUMBERS[symbol] for symbol in species_map)
        self.register_buffer("element_index", lookup, persistent=False)
        self.feature_slices = {
            name: _scalar_slices(module.irreps_out[AtomicDataDict.NODE_FEATURES_KEY])
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

    def check_elements(self, numbers: torch.Tensor) -> None:
        reject_unknown_elements(numbers, self.atomic_numbers, "NequIP")

    def forward(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        edge_index, unit_shifts = radius_graph(data, self.cutoff)
        field_dtype = torch.float64  # nequip's data are float64 for every model dtype
        inputs = {
            AtomicDataDict.POSITIONS_KEY: data.positions.to(field_dtype),
            AtomicDataDict.EDGE_INDEX_KEY: edge_index,
            AtomicDataDict.EDGE_CELL_SHIFT_KEY: unit_shifts.to(field_dtype),
            AtomicDataDict.CELL_KEY: data.cell.to(field_dtype),
            AtomicDataDict.BATCH_KEY: data.batch,
            AtomicDataDict.NUM_NODES_KEY: data.n_atoms,
            AtomicDataDict.ATOM_TYPE_KEY: self.element_index[data.numbers],
        }
        features = []
        with isolated_global_state():
            for name, module in _energy_network(self.host).named_children():
                inputs = module(inputs)
                for part in self.feature_slices.get(name, ()):
                    features.append(inputs[AtomicDataDict.NODE_FEATURES_KEY][:, part])
        dtype = data.positions.dtype
        energy = inputs[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1).to(dtype)
        return energy, torch.cat(features, dim=1).to(dtype)

    def host_config(self) -> dict[str, Any]:
        if self.model_config is None:
            raise ValueError(
                "this nequip model's hyper-parameters are unknown (it was not built by latent-lr); "
                "wrap it with adapter_options={'config': <the model block of its nequip config, "
                "with _target_ and seed, model_dtype, type_names, r_max, ...>}."
            )
        config = {
            "model": copy.deepcopy(self.model_config),
            "chemical_species_to_atom_type_map": dict(self.species_map),
        }
        json.dumps(config)  # must be JSON-serialisable
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
        host._latent_lr_config = copy.deepcopy(dict(config))
        return host

    @classmethod
    def default_host(cls, species: Sequence[int], **options: Any) -> nn.Module:
        """A small random NequIP model; ``options`` are ``NequIPGNNModel`` arguments.

        The builder's ``seed`` defaults to a draw from torch's global generator,
        so ``torch.manual_seed`` before this call makes the model reproducible.
        """
        species = sorted({int(z) for z in species})
        unknown = [z for z in species if not 0 < z < len(CHEMICAL_SYMBOLS)]
        if unknown:
            raise ValueError(f"atomic numbers {unknown} are not elements.")
        symbols = [CHEMICAL_SYMBOLS[z] for z in species]
        settings = dict(DEFAULT_OPTIONS, **options)
        if "seed" not in settings:
            settings["seed"] = int(torch.randint(0, 2**31 - 1, ()).item())
        settings["type_names"] = symbols
        model = {"_target_": "nequip.model.NequIPGNNModel", **settings}
        try:
            json.dumps(model)
        except TypeError as error:
            raise ValueError(f"NequIP host options must be JSON values ({error}).") from error
        return cls.build_host({"model": model, "chemical_species_to_atom_type_map": {s: s for s in symbols}})
