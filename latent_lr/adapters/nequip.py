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

Side effects: ``import nequip`` runs with the environment restored and the host
runs inside :func:`~latent_lr.backbone.isolated_global_state`; hosts are built
by :mod:`latent_lr.adapters.nequip_host` without nequip's process-wide set-up.
Tested with nequip 0.19.1, e3nn 0.6.0, torch 2.13 (CPU).
"""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from latent_lr.backbone import Backbone, isolated_global_state
from latent_lr.data import AtomsBatch
from latent_lr.errors import UserInputError
from latent_lr.neighbors import radius_graph
from latent_lr.safe_pickle import is_torch_package, load_trusted, needs_trust

from . import nequip_host
from .common import atomic_number, is_element_symbol, require_json, restored_environment, scalar_slices, species_lookup

with isolated_global_state(), restored_environment():
    from e3nn import o3
    from nequip.data import AtomicDataDict
    from nequip.nn import ConvNetLayer, ForceStressOutput, GraphModel, SequentialGraphNetwork

#: Key of the state_dict prefix of a NequIP training checkpoint's only model (``model.<key>.``).
SOLE_MODEL_KEY = "sole_model"

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


class NequipBackbone(Backbone):
    """Adapter for nequip's ``GraphModel``; options as in the module docstring."""

    label = "NequIP"
    name = "nequip"
    element_index: torch.Tensor  # buffer (Z_max + 1,): atomic number -> nequip atom type, -1 unknown

    def __init__(self, host: nn.Module, chemical_species_to_atom_type_map: Optional[dict[str, str]] = None,
                 config: Optional[dict[str, Any]] = None):
        super().__init__(host)
        network = _energy_network(host)
        graph_model: Any = host  # a nequip GraphModel (checked just above); nequip is untyped
        built = getattr(host, nequip_host.RECIPE_ATTRIBUTE, None) or {}  # recorded by build_host
        self.model_config = copy.deepcopy(config if config is not None else built.get("model"))
        type_names = [str(name) for name in graph_model.type_names]
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
        self._r_max = float(graph_model.metadata["r_max"])

    @property
    def feature_dim(self) -> int:
        return sum(part.stop - part.start for parts in self.feature_slices.values() for part in parts)

    @property
    def cutoff(self) -> float:
        return self._r_max

    @property
    def known_elements(self) -> list[int]:
        return sorted(atomic_number(symbol) for symbol in self.species_map)

    @property
    def receptive_field(self) -> float:
        """Convolution layers × r_max, Å."""
        return len(self.feature_slices) * self._r_max

    def forward(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, features = self._run(data)
        dtype = data.positions.dtype
        return outputs[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1).to(dtype), features

    def per_atom_energies(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """NequIP's per-atom energies (N,) eV (scales, shifts and ZBL included) and the features (N, F)."""
        outputs, features = self._run(data)
        return outputs[AtomicDataDict.PER_ATOM_ENERGY_KEY].reshape(-1).to(data.positions.dtype), features

    def _run(self, data: AtomsBatch) -> tuple[dict[str, Any], torch.Tensor]:
        """NequIP's output dictionary and the features (N, F) in ``data.positions``' dtype."""
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
        features: list[torch.Tensor] = []
        with isolated_global_state():
            for name, module in _energy_network(self.host).named_children():
                inputs = module(inputs)
                features.extend(inputs[AtomicDataDict.NODE_FEATURES_KEY][:, part] for part in self.feature_slices.get(name, ()))
        return inputs, torch.cat(features, dim=1).to(data.positions.dtype)

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
        return nequip_host.build_host(config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "NequipBackbone":
        host = config["host"]
        return cls(cls.build_host(host), host["chemical_species_to_atom_type_map"], host["model"])

    @classmethod
    def default_host(cls, species: Sequence[int], **options: Any) -> nn.Module:
        """A small random ``NequIPGNNModel`` (see :func:`latent_lr.adapters.nequip_host.default_config`)."""
        return nequip_host.build_host(nequip_host.default_config(species, **options))

    @classmethod
    def load_host_file(cls, path: Path, trust_pickle: bool = False, payload: Optional[object] = None) -> nn.Module:
        """A nequip host from a 0.19 training checkpoint (``.ckpt``) or, with ``trust_pickle``, a ``nequip-package`` archive.

        Checkpoints load weights-only: the model block of their
        ``hyper_parameters`` rebuilds the host through nequip's own builders
        (``nequip.model.*`` targets only) and the weights come from ``state_dict``.
        """
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if is_torch_package(archive.namelist()):
                    return _host_from_package(path, trust_pickle)
        checkpoint = payload
        if not isinstance(checkpoint, dict):
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # objects beyond tensors and containers
                if not trust_pickle:
                    raise needs_trust(path, "it holds Python objects beyond weights and settings") from error
                checkpoint = load_trusted(path)
        model_config = checkpoint["hyper_parameters"]["model"]
        return _host_from_weights(path, model_config, checkpoint["state_dict"], prefix="model.")


def _host_from_weights(path: Path, model_config: dict[str, Any], state: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """Build the host ``model_config`` describes and load its weights from ``state`` (keys ``prefix<model>.<name>``)."""
    models = sorted({key[len(prefix):].split(".")[0] for key in state if key.startswith(prefix)})
    if len(models) != 1:
        raise UserInputError(f"{path} holds {len(models)} models ({models}); latent-lr wraps one nequip model.")
    strip = f"{prefix}{models[0]}."
    try:
        host = nequip_host.build_host({"model": copy.deepcopy(dict(model_config)), "chemical_species_to_atom_type_map": None})
    except ValueError as error:
        raise UserInputError(f"{path}: {error} (a model fine-tuned from another file cannot be rebuilt; give that file)") from error
    host.load_state_dict({key[len(strip):]: value for key, value in state.items() if key.startswith(strip)})
    return host


def _host_from_package(path: Path, trust_pickle: bool) -> nn.Module:
    """A nequip-package archive: its packaged model's weights in a host rebuilt from the archive's config."""
    if not trust_pickle:
        raise needs_trust(path, "a nequip-package archive carries its own copy of nequip's code, which loading imports and runs "
                          "(or give the training checkpoint it was packaged from, which loads without that)")
    with isolated_global_state(), restored_environment():
        from nequip.model.saved_models.package import ModelFromPackage
        from omegaconf import OmegaConf

        packaged = ModelFromPackage(str(path))
        importer = torch.package.PackageImporter(str(path))
        config: Any = OmegaConf.to_container(OmegaConf.create(importer.load_text("model", "config.yaml")), resolve=True)
    model_config = config["training_module"]["model"]
    inner = "model." if isinstance(packaged, nn.ModuleDict) else f"model.{SOLE_MODEL_KEY}."
    state = {inner + key: value for key, value in packaged.state_dict().items()}
    return _host_from_weights(path, model_config, state, prefix="model.")
